"""Tracking against an MLflow server backed by a real PostgreSQL, as a team server runs it.

The test starts its own PostgreSQL (Debian's `postgresql` package, which `.ci/run` installs) in a
temporary directory on a free loopback port, and an MLflow server on top of it; it drives
`sppo.tracking.Tracker` through a job's whole tracking life and reads it back over the MLflow API
and straight from the database. PostgreSQL refuses to run as root: as root, its commands run as
the `postgres` user the package creates.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from sppo.devtools.localstack import free_port
from sppo.secrets import MASK
from sppo.run_directory import RunDirectory
from sppo.tracking import Tracker

INSTALL_HINT = ("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb): install Debian's "
                "package with `apt-get install -y postgresql`; .ci/run does this before `make test`")
DB_USER, DB_NAME = "mlflow", "mlflow"


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    if not found:
        pytest.fail(INSTALL_HINT)
    return Path(found[-1]).parent


def _as_db_owner(cmd: list[str]) -> list[str]:
    """PostgreSQL will not run as root: run its commands as the package's `postgres` user."""
    if os.geteuid() != 0:
        return cmd
    if shutil.which("runuser") is None:
        pytest.fail("running as root and `runuser` is missing: cannot start PostgreSQL as user postgres")
    return ["runuser", "-u", "postgres", "--", *cmd]


def _run(cmd: list[str], **kwargs) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def postgres_url():
    bin_dir = _pg_bin()
    # Not under pytest's tmp dir: that is private to root, and the server may run as postgres.
    root = Path(tempfile.mkdtemp(prefix="sppo-pg-"))
    data, password = root / "data", "pg-test-password-0451"
    (root / "pwfile").write_text(password + "\n")
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(root / "pwfile", "postgres")
    port = free_port()
    _run(_as_db_owner([str(bin_dir / "initdb"), "-D", str(data), "-U", DB_USER, "--pwfile", str(root / "pwfile"),
                       "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "--encoding=UTF8"]))
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root}"
    _run(_as_db_owner([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-o", options,
                       "-w", "-t", "60", "start"]))
    try:
        _run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", DB_USER, DB_NAME],
             env={**os.environ, "PGPASSWORD": password})
        yield f"postgresql+psycopg2://{DB_USER}:{password}@127.0.0.1:{port}/{DB_NAME}"
    finally:
        _run(_as_db_owner([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]))
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_on_postgres(postgres_url, tmp_path_factory):
    """An MLflow tracking server on the PostgreSQL store with a proxied artifact store, stopped by PID."""
    port, artifacts = free_port(), tmp_path_factory.mktemp("artifacts")
    log = tmp_path_factory.mktemp("mlflow-log") / "mlflow.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", f"--backend-store-uri={postgres_url}",
           f"--artifacts-destination={artifacts}", "--serve-artifacts", "--host=127.0.0.1", f"--port={port}",
           "--workers=1"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # the first start creates MLflow's schema in PostgreSQL
        while True:
            assert proc.poll() is None, f"MLflow server exited:\n{log.read_text()[-4000:]}"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, f"MLflow server did not answer:\n{log.read_text()[-4000:]}"
                time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _query(postgres_url: str, sql: str, *args) -> list[tuple]:
    import psycopg2

    dsn = postgres_url.replace("postgresql+psycopg2://", "postgresql://")
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_jobs_tracking_life_on_postgres(mlflow_on_postgres, postgres_url, tmp_path):
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "samples.parquet").write_bytes(b"PAR1 not really parquet, an artifact all the same")

    tracker = Tracker(mlflow_on_postgres, "sppo-postgres", RunDirectory(out))
    parent = tracker.start_parent("job", {"train.eta": 1000.0, "hub_token": "hf_should_not_be_stored"})
    one = tracker.start_iteration(1, {"iteration": 1, "sampling.k": 5})
    tracker.log_metrics(one, {"sampling/prompts": 48, "time/sampling_s": 3.5})
    tracker.log_history(one, [{"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": 1.5}])
    tracker.log_artifact(one, tmp_path / "samples.parquet", "data")
    tracker.log_artifacts(one, tmp_path / "checkpoint", "checkpoint")
    tracker.finish(one)
    interrupted = tracker.start_iteration(2, {"iteration": 2})  # a driver killed mid-iteration
    tracker.finish_parent("FAILED")

    again = Tracker(mlflow_on_postgres, "sppo-postgres", RunDirectory(out))  # the re-submitted job
    assert again.start_parent("job", {}) == parent
    assert {t: r.info.status for t, r in again.iteration_runs().items()} == {1: "FINISHED", 2: "RUNNING"}
    two = again.start_iteration(2, {"iteration": 2})
    again.log_metrics(two, {"pairs/rows": 40})
    again.finish(two)
    again.finish_parent("FINISHED")

    client = MlflowClient(mlflow_on_postgres)
    assert client.get_run(parent).info.status == "FINISHED"
    assert client.get_run(parent).data.params == {"train.eta": "1000.0", "hub_token": MASK}
    runs = again.iteration_runs()
    assert {t: r.info.run_id for t, r in runs.items()} == {1: one, 2: two}
    assert [(m.step, m.value) for m in client.get_metric_history(one, "train/loss")] == [(1, 2.0), (2, 1.5)]
    assert client.get_run(one).data.metrics["sampling/prompts"] == 48
    old = client.get_run(interrupted)
    assert old.info.status == "FAILED" and old.info.lifecycle_stage == "deleted"
    assert old.data.tags["sppo.replaced_by"] == two
    assert len(client.search_runs([again.experiment_id], run_view_type=ViewType.ALL)) == 4
    fetched = Path(client.download_artifacts(one, "checkpoint/config.json", str(tmp_path / "fetched")))
    assert json.loads(fetched.read_text()) == {"model_type": "llama"}
    assert [a.path for a in client.list_artifacts(one, "data")] == ["data/samples.parquet"]

    # The record is in PostgreSQL itself, not in some local file store.
    rows = _query(postgres_url, "SELECT run_uuid, status, lifecycle_stage FROM runs WHERE experiment_id = %s",
                  int(again.experiment_id))
    assert sorted(rows) == sorted([(parent, "FINISHED", "active"), (one, "FINISHED", "active"),
                                   (interrupted, "FAILED", "deleted"), (two, "FINISHED", "active")])
    steps = _query(postgres_url, "SELECT step, value FROM metrics WHERE run_uuid = %s AND key = 'train/loss' "
                   "ORDER BY step", one)
    assert steps == [(1, 2.0), (2, 1.5)]
