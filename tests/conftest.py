"""Shared fixtures: `make demo` once per session (its servers serve every job test), one local
Ray cluster per session for the stage tests, and the embedded tiny models.

Everything here is real (Ray, vLLM, DeepSpeed, PairRM, MLflow); nothing is mocked.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest

if TYPE_CHECKING:
    from sppo.devtools.localstack import LocalStack

# `make test` runs the suite in two lanes (pytest-xdist). A session fixture is set up once in
# each lane that uses it, so the files whose tests share one (the demo's stack, the local Ray
# cluster) form one unit of work each, run by one lane: each fixture starts once, as in a single
# lane. (xdist's own `--dist loadgroup` groups nothing under pytest 9.2's structured node ids:
# pytest-dev/pytest-xdist#1386.)
LANES = {
    "demo-stack": ("test_cluster_faults.py", "test_e2e.py", "test_faults.py", "test_objectives_e2e.py",
                   "test_ray_jobs.py"),
    "local-ray-cluster": ("test_evaluation.py", "test_judging.py", "test_placement.py", "test_plan.py",
                          "test_reward_judge.py", "test_sampling.py", "test_training.py"),
}
LANE_FIXTURES = {"demo": "demo-stack", "live_stack": "demo-stack", "ray_cluster": "local-ray-cluster"}
_LANE_OF_FILE = {file: lane for lane, files in LANES.items() for file in files}


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class LaneScheduling(LoadScopeScheduling):
        """A lane's files as one unit of work; every other test a unit of its own."""

        def _split_scope(self, nodeid: str) -> str:
            return _LANE_OF_FILE.get(Path(nodeid.split("::", 1)[0]).name, nodeid)

    return LaneScheduling(config, log)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """`item.failed_call`: whether the test's own body failed, for fixtures that keep evidence then."""
    report = yield
    if report.when == "call":
        item.failed_call = report.failed
    return report


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Every test that needs a lane's fixture is in one of that lane's files (or it would set the
    fixture up in a second lane); and the longest work first, so that the lanes end together: the
    lanes' files, then the other slow tests (each starting its own stack or cluster), then the
    fast ones, each in collection order (durations: docs/testing.md)."""
    rank = {}
    for item in items:
        lane = _LANE_OF_FILE.get(item.path.name)
        if stray := {LANE_FIXTURES[name] for name in item.fixturenames if name in LANE_FIXTURES} - {lane}:
            raise pytest.UsageError(f"{item.nodeid} uses the {sorted(stray)} fixture: add its file to that "
                                    "lane in tests/conftest.py LANES")
        rank[item.nodeid] = 0 if lane else 1 if item.get_closest_marker("slow") else 2
    items.sort(key=lambda item: rank[item.nodeid])


_TERMINAL = None
LONG_TEST_S = 30
_SESSION_START = time.monotonic()


@pytest.hookimpl(trylast=True)  # after the terminal reporter has registered
def pytest_configure(config):
    global _TERMINAL
    _TERMINAL = config.pluginmanager.get_plugin("terminalreporter")


def pytest_runtest_logreport(report):
    """A line for each phase over LONG_TEST_S, with the suite's elapsed time, as it happens: CI
    keeps only the tail of a run it stops, and `--durations` prints only at the end. (In an xdist
    lane there is no terminal; the controller writes the line when the report reaches it.)"""
    if report.duration >= LONG_TEST_S and _TERMINAL is not None and not os.environ.get("PYTEST_XDIST_WORKER"):
        elapsed = (time.monotonic() - _SESSION_START) / 60
        _TERMINAL.write_line(f"[suite at {elapsed:.1f} min] {report.when} of {report.nodeid}: {report.duration:.0f} s")

@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by the tests that need one: 3 logical CPUs, as the local stack
    declares (a kept vLLM engine beside two training workers), on however many cores."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


# What a launcher sets for each process of a group of one (DeepSpeed's CPU accelerator reads LOCAL_RANK).
LAUNCHER_ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}


@contextlib.contextmanager
def launcher_env(**extra: str):
    saved = {name: os.environ.get(name) for name in {**LAUNCHER_ENV, **extra}}
    os.environ.update({**LAUNCHER_ENV, **extra})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def process_group_of_one():
    """This process as a torch.distributed group of one (gloo), once per session, as in a Ray
    Train worker: DeepSpeed keeps the first group it takes, so a second one in the same process
    breaks it ("Group ... is not registered")."""
    import torch.distributed as dist

    from sppo.devtools.localstack import free_port
    from sppo.training_recipe import init_deepspeed

    with launcher_env(MASTER_PORT=str(free_port())):
        dist.init_process_group("gloo", rank=0, world_size=1)
        init_deepspeed("gloo")
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def one_process_group(process_group_of_one):
    """The recipe runs here without Ray, in the group of one, with a launcher's environment
    while the module's tests run (not after: the servers and jobs of later tests in this process
    must not inherit a rank). Its device."""
    import torch

    with launcher_env():
        yield torch.device("cpu")


@pytest.fixture(scope="session")
def tiny_policy_dir() -> str:
    from sppo.tiny import resolve_model

    return resolve_model("tiny:policy")


@pytest.fixture(scope="session")
def tiny_pairrm_dir() -> str:
    from sppo.tiny import resolve_model

    return resolve_model("tiny:pairrm")


@pytest.fixture(params=[0o022, 0o077], ids=["umask-022", "umask-077"])
def umask(request):
    """The process's umask set to each of a shared and a private one; published files must follow it."""
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


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


@dataclass
class Demo:
    """What `make demo` left behind: its servers, its 3-iteration run and what it printed."""

    stack: LocalStack
    output_dir: Path
    home: Path
    log: str


@pytest.fixture()
def small_disk(tmp_path):
    """mount(size) -> a new directory on a tmpfs of that size ("256k", "1m"), for full-disk
    tests; unmounted after the test. The test is skipped where mounting needs root."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        disk = tmp_path / f"small-disk-{len(mounted)}"
        disk.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(disk)
        return disk

    yield mount
    for disk in mounted:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The README's first command, `make demo`, run as a new user runs it: in an empty home
    directory (no Ray token, no ~/.cache/sppo, nothing from earlier runs), its servers on free
    loopback ports, secrets planted in its environment. Fails the tests that use it if the
    demo fails. Its Ray head and MLflow server serve the whole session (`live_stack`); its run
    is the 3-iteration job that every test of the demo's record reads."""
    import psutil

    from sppo.devtools.localstack import LocalStack, free_port, free_port_ray_leaves_alone
    from tests.live_stack import REPO, SECRETS

    root = tmp_path_factory.mktemp("demo")
    home, output_dir = root / "home", root / "run"
    home.mkdir()
    # MLflow on a port Ray never picks itself, as the demo's 5000: the two servers start at once
    # (the other stacks of the suite take ports from the ephemeral range: one after the other).
    stack = LocalStack(root / "stack", ray_port=free_port(), dashboard_port=free_port(),
                       mlflow_port=free_port_ray_leaves_alone())
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_AUTH_TOKEN", "SPPO_", "HF_HOME", "XDG_"))}
    env.update(HOME=str(home), **SECRETS)
    cmd = ["make", "--no-print-directory", "-C", str(REPO), "demo", f"STATE_DIR={stack.state_dir}",
           f"OUTPUT_DIR={output_dir}", f"RAY_PORT={stack.ray_port}", f"DASHBOARD_PORT={stack.dashboard_port}",
           f"MLFLOW_PORT={stack.mlflow_port}"]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        log = done.stdout + done.stderr
        (root / "demo.log").write_text(log)
        assert done.returncode == 0, f"`make demo` failed on an empty home directory:\n{log[-8000:]}"
        # What `make demo` started and its token, for the tests that find its processes or submit.
        stack.load()
        yield Demo(stack, output_dir, home, log)
    finally:
        stack.load()
        started = [pid for pids in stack.pids.values() for pid in pids]
        stack.stop()
    # `make stop`'s code ends exactly what `make demo` started: every recorded daemon is gone.
    assert started and not [pid for pid in started if psutil.pid_exists(pid)
                            and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    # Ray's temp dir (sockets, session logs) lies outside pytest's tmp_path; kept only on failure.
    shutil.rmtree(stack.ray_temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def live_stack(demo):
    """The one real Ray head (token auth) and MLflow server of the test session: the demo's."""
    return demo.stack
