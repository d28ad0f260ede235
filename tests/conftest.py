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
