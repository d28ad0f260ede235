"""Shared fixtures: one local Ray cluster per test session and the embedded tiny models.

Everything here is real (Ray, vLLM, DeepSpeed, PairRM, MLflow); nothing is mocked.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """A local 2-CPU Ray cluster shared by the tests that need one."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_policy_dir() -> str:
    from sppo.tiny import resolve_model

    return resolve_model("tiny:policy")


@pytest.fixture(scope="session")
def tiny_pairrm_dir() -> str:
    from sppo.tiny import resolve_model

    return resolve_model("tiny:pairrm")


@pytest.fixture(scope="module")
def live_stack(tmp_path_factory):
    """A real Ray head (token auth) and MLflow server on free loopback ports, stopped by PID."""
    import psutil

    from sppo.localstack import LocalStack, free_port

    stack = LocalStack(tmp_path_factory.mktemp("stack"), ray_port=free_port(), dashboard_port=free_port(),
                       mlflow_port=free_port(), num_cpus=2)
    try:
        stack.start()
        yield stack
    finally:
        started = [pid for pids in stack.pids.values() for pid in pids]
        stack.stop()
    # `stop` ends exactly what `start` started: every recorded daemon is gone.
    assert started and not [pid for pid in started if psutil.pid_exists(pid)
                            and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
