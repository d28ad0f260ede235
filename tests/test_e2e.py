"""End to end: a real Ray head and MLflow server, the job submitted with `ray job submit`.

Checks go through MLflow's REST API, as a user's tooling would see the record.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest

from sppo.localstack import LocalStack

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
REPO = Path(__file__).resolve().parents[1]
# Planted in the job's environment; none may reach MLflow or the job log.
SECRETS = {
    "HF_TOKEN": "hf_plantedSecretToken0451",
    "AWS_SECRET_ACCESS_KEY": "plantedAwsSecret0451",
    "AWS_ACCESS_KEY_ID": "AKIAPLANTED0451",
    "MLFLOW_TRACKING_PASSWORD": "plantedMlflowPassword0451",
    "SPPO_TEST_API_KEY": "plantedApiKey0451",
}
VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = LocalStack(tmp_path_factory.mktemp("stack"), ray_port=_free_port(), dashboard_port=_free_port(),
                       mlflow_port=_free_port(), num_cpus=2)
    try:
        stack.start()
        yield stack
    finally:
        started = [pid for pids in stack.pids.values() for pid in pids]
        stack.stop()
    # `stop` ends exactly what `start` started: every recorded daemon is gone.
    assert started and not [pid for pid in started if psutil.pid_exists(pid)
                            and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


def submit(stack: LocalStack, output_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": stack.mlflow_url, "HF_HUB_OFFLINE": "1", **SECRETS}}
    cmd = [
        str(VENV_BIN / "ray"), "job", "submit", "--address", stack.dashboard_url, "--working-dir", str(REPO),
        "--runtime-env-json", json.dumps(runtime_env), "--",
        "python", "-m", "sppo.run", "--config", "configs/tiny.yaml", "--iters", "3",
        "--output-dir", str(output_dir), *extra,
    ]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"job failed:\n{done.stdout[-8000:]}\n{done.stderr[-4000:]}"
    return done


def assert_no_secrets(where: str, text: str) -> None:
    leaked = [name for name, value in SECRETS.items() if value in text]
    assert not leaked, f"secrets {leaked} appear in {where}"


def rest(stack: LocalStack, endpoint: str, params: dict | None = None, body: dict | None = None) -> dict:
    url = f"{stack.mlflow_url}/api/2.0/mlflow/{endpoint}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def nested_runs(stack: LocalStack, experiment_id: str, parent_id: str) -> dict[str, dict]:
    found = rest(stack, "runs/search", body={
        "experiment_ids": [experiment_id],
        "filter": f"tags.mlflow.parentRunId = '{parent_id}'",
        "run_view_type": "ACTIVE_ONLY",
        "max_results": 100,
    })
    runs = found.get("runs", [])
    names = [r["info"]["run_name"] for r in runs]
    assert len(names) == len(set(names)), f"duplicated nested runs: {names}"
    return {r["info"]["run_name"]: r for r in runs}


def test_three_iterations_then_resume(stack, tmp_path):
    output_dir = tmp_path / "run"
    first = submit(stack, output_dir)
    assert "SPPO finished" in first.stdout
    assert_no_secrets("the job log", first.stdout + first.stderr)

    record = json.loads((output_dir / "run.json").read_text())
    parent = rest(stack, "runs/get", {"run_id": record["parent_run_id"]})["run"]
    assert parent["info"]["status"] == "FINISHED"
    runs = nested_runs(stack, record["experiment_id"], record["parent_run_id"])
    assert sorted(runs) == ["iter-1", "iter-2", "iter-3"]

    from mlflow.artifacts import download_artifacts
    from transformers import AutoModelForCausalLM

    for name, run in runs.items():
        run_id = run["info"]["run_id"]
        assert run["info"]["status"] == "FINISHED"
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["sampling.k"] == "4" and params["train.eta"] == "20.0"
        loss = rest(stack, "metrics/get-history", {"run_id": run_id, "metric_key": "train/loss"})["metrics"]
        assert loss and all(isinstance(m["value"], float) for m in loss)
        metrics = {m["key"] for m in run["data"]["metrics"]}
        assert {"sampling/candidates", "sampling/generated_tokens", "pairs/mean_chosen_win_prob",
                "pairs/mean_rejected_win_prob", "time/training_s"} <= metrics
        listed = rest(stack, "artifacts/list", {"run_id": run_id, "path": "data"})["files"]
        assert {"data/pairs.parquet", "data/judgments.parquet"} <= {f["path"] for f in listed}
        local = download_artifacts(run_id=run_id, artifact_path="checkpoint", dst_path=str(tmp_path / name),
                                   tracking_uri=stack.mlflow_url)
        assert AutoModelForCausalLM.from_pretrained(local).num_parameters() > 0

    # Re-submitting the finished job redoes nothing; --resume-from 3 redoes only iteration 3.
    submit(stack, output_dir)
    assert {n: r["info"]["run_id"] for n, r in nested_runs(stack, record["experiment_id"],
                                                            record["parent_run_id"]).items()} == \
        {n: r["info"]["run_id"] for n, r in runs.items()}

    submit(stack, output_dir, "--resume-from", "3")
    after = nested_runs(stack, record["experiment_id"], record["parent_run_id"])
    assert sorted(after) == ["iter-1", "iter-2", "iter-3"]
    assert after["iter-1"]["info"]["run_id"] == runs["iter-1"]["info"]["run_id"]
    assert after["iter-2"]["info"]["run_id"] == runs["iter-2"]["info"]["run_id"]
    assert after["iter-3"]["info"]["run_id"] != runs["iter-3"]["info"]["run_id"]
    assert after["iter-3"]["info"]["status"] == "FINISHED"
    assert rest(stack, "runs/get", {"run_id": record["parent_run_id"]})["run"]["info"]["status"] == "FINISHED"
    assert (output_dir / "iter-3" / "checkpoint" / "config.json").exists()
    assert (output_dir / "iter-3.superseded-1" / "checkpoint" / "config.json").exists()

    # The MLflow store (database and artifacts) and the output directory hold no planted secret.
    for root in (stack.state_dir / "mlflow", output_dir):
        for path in root.rglob("*"):
            if path.is_file():
                assert_no_secrets(str(path), path.read_bytes().decode("latin-1"))
