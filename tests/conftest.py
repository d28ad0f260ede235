"""Shared fixtures: one local Ray cluster per test session and the embedded tiny models.

Everything here is real (Ray, vLLM, DeepSpeed, PairRM, MLflow); nothing is mocked.
"""

from __future__ import annotations

import os
import re
import shutil

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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 API (moto's server) on a loopback port, for storage_uri=s3://... runs."""
    from tests.s3 import start_s3_server

    server = start_s3_server(str(tmp_path_factory.mktemp("s3") / "moto.log"))
    try:
        yield server
    finally:
        server.process.terminate()
        server.process.wait(timeout=30)


@pytest.fixture
def s3_bucket(s3_server, monkeypatch, request) -> str:
    """A fresh bucket, with this process's S3 client pointed at the server; its s3:// URI."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server.create_bucket(re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:50])


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
    # Ray's temp dir (sockets, session logs) lies outside pytest's tmp_path; kept only on failure.
    shutil.rmtree(stack.ray_temp_dir, ignore_errors=True)
