"""A live Ray head + MLflow server and the helpers that submit jobs to it and read MLflow's REST API.

Shared by the end-to-end and fault-injection tests through the session fixture `live_stack`
(the servers `make demo` started in the fixture `demo`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from sppo.devtools.localstack import LocalStack

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# Planted in the job's environment; none may reach MLflow or the job log.
SECRETS = {
    "HF_TOKEN": "hf_plantedSecretToken0451",
    "AWS_SECRET_ACCESS_KEY": "plantedAwsSecret0451",
    "AWS_ACCESS_KEY_ID": "AKIAPLANTED0451",
    "MLFLOW_TRACKING_PASSWORD": "plantedMlflowPassword0451",
    "SPPO_TEST_API_KEY": "plantedApiKey0451",
}


def client_env(stack: LocalStack, **extra: str) -> dict[str, str]:
    """This process's environment for a Ray client of `stack`: token auth on, with the token the
    stack's head was started with (the demo's lies in its own empty home)."""
    token = {"RAY_AUTH_TOKEN_PATH": str(stack.auth_token_path)} if stack.auth_token_path else {}
    return {**os.environ, "RAY_AUTH_MODE": "token", **token, **extra}


def submit_command(stack: LocalStack, output_dir: Path, *args: str, config: str = "configs/tiny.yaml",
                   job_env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """`ray job submit` of the tiny config, as `make demo` does, and the environment to run it in.
    job_env: extra variables for the job's driver and actors."""
    env = client_env(stack)
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": stack.mlflow_url, "HF_HUB_OFFLINE": "1", **SECRETS,
                                **(job_env or {})}}
    cmd = [
        str(VENV_BIN / "ray"), "job", "submit", "--address", stack.dashboard_url, "--working-dir", str(REPO),
        "--runtime-env-json", json.dumps(runtime_env), "--",
        "python", "-m", "sppo.run", "--config", config, "--output-dir", str(output_dir), *args,
    ]
    return cmd, env


def submit(stack: LocalStack, output_dir: Path, *args: str, config: str = "configs/tiny.yaml",
           job_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd, env = submit_command(stack, output_dir, *args, config=config, job_env=job_env)
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=1200)
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


def assert_one_finished_iteration_and_nothing_redone(stack: LocalStack, out: Path, published: dict) -> dict:
    """After a re-submission of a 1-iteration run: every stage `published` (manifest entries from
    before it) is as it was, and the parent holds one FINISHED `iter-1` run, which is returned."""
    stages = json.loads((out / "manifest.json").read_text())["iterations"]["1"]["stages"]
    assert all(stages[name] == entry for name, entry in published.items())  # nothing redone
    record = json.loads((out / "run.json").read_text())
    runs = nested_runs(stack, record["experiment_id"], record["parent_run_id"])
    assert list(runs) == ["iter-1"] and runs["iter-1"]["info"]["status"] == "FINISHED"
    return runs["iter-1"]


def wait_for_a_training_step(stack: LocalStack, out: Path, job: subprocess.Popen) -> None:
    """Until the iteration run this job opened has logged an optimizer step: the training
    workers are then in their loop. (Their `run_train_fn` title is too short-lived to wait for:
    Ray Train runs the loop in a thread after that call returns.)"""
    while not (out / "run.json").exists():
        assert job.poll() is None, "the job ended before it opened its MLflow run"
        time.sleep(0.1)
    record = json.loads((out / "run.json").read_text())
    while True:
        assert job.poll() is None, "the job ended before its first training step was logged"
        running = rest(stack, "runs/search", body={
            "experiment_ids": [record["experiment_id"]], "run_view_type": "ACTIVE_ONLY",
            "filter": f"tags.mlflow.parentRunId = '{record['parent_run_id']}' and attributes.status = 'RUNNING'",
        }).get("runs", [])
        if any(rest(stack, "metrics/get-history", {"run_id": run["info"]["run_id"], "metric_key": "train/loss"})
               .get("metrics") for run in running):
            return
        time.sleep(0.05)
