"""The MLflow server going away under a real job, on a Ray head and MLflow server of the test's
own (the tiny config submitted with `ray job submit`).

The MLflow server is SIGKILLed during training and started again 60 s later on the same store
and port; the job finishes with every training step in MLflow. Then, with
`tracking.outage_limit_s` 8 s, it is killed and left down: the job stops with a message naming
the tracking URI, and once the server is back a re-submission finishes the run, nothing lost,
one run per iteration.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from sppo.devtools.localstack import LocalStack, free_port
from tests.live_stack import (REPO, assert_one_finished_iteration_and_nothing_redone, nested_runs, rest, submit,
                              submit_command, wait_for_a_training_step)
from tests.processes import process_trees, wait_gone

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.cluster_faults]


OUTAGE_S = 60
# One iteration, 16 prompts; 8 epochs make its training long enough (16 steps) that the outage
# starts in the middle of it: the server is killed as soon as step 1 is in MLflow.
STEPS = 16
OUTAGE_ARGS = ("--iters", "1", "--set", "prompts.per_iteration=16", "--set", "prompts.eval_size=0",
               "--set", f"train.epochs={STEPS // 2}")
LIMIT_S = 8


@pytest.fixture
def own_stack(tmp_path_factory):
    """A Ray head and MLflow server of this test's own: their MLflow server is killed."""
    stack = LocalStack(tmp_path_factory.mktemp("outage"), ray_port=free_port(), dashboard_port=free_port(),
                       mlflow_port=free_port())
    with stack.running():
        yield stack


def _kill_mlflow(stack: LocalStack) -> None:
    procs = process_trees(stack.pids.get("mlflow", []))
    for proc in procs:
        proc.kill()
    assert procs and not wait_gone(procs, timeout_s=30)
    assert not stack.mlflow_running()


def _steps(stack: LocalStack, run: dict) -> list[int]:
    history = rest(stack, "metrics/get-history", {"run_id": run["info"]["run_id"], "metric_key": "train/loss"})
    return sorted(m["step"] for m in history["metrics"])


def test_an_mlflow_outage_is_waited_out_and_a_longer_one_stops_the_job_for_a_resubmission(own_stack, tmp_path):
    stack = own_stack
    out = tmp_path / "run"
    cmd, env = submit_command(stack, out, *OUTAGE_ARGS)
    job = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_a_training_step(stack, out, job)
        _kill_mlflow(stack)
        time.sleep(OUTAGE_S)
        stack.start()  # the same sqlite store, artifact root and port
        log, _ = job.communicate(timeout=900)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, log[-4000:]
    record = json.loads((out / "run.json").read_text())
    runs = nested_runs(stack, record["experiment_id"], record["parent_run_id"])
    assert list(runs) == ["iter-1"] and runs["iter-1"]["info"]["status"] == "FINISHED"
    for name, run in runs.items():  # every step logged during the outage reached MLflow, once
        assert _steps(stack, run) == list(range(1, STEPS + 1)), name

    # A longer outage than tracking.outage_limit_s: the job stops, then a re-submission continues.
    out = tmp_path / "stopped"
    limited = (*OUTAGE_ARGS, "--set", f"tracking.outage_limit_s={LIMIT_S}")
    cmd, env = submit_command(stack, out, *limited)
    job = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_a_training_step(stack, out, job)
        _kill_mlflow(stack)
        killed = time.monotonic()
        log, _ = job.communicate(timeout=900)
        stopped_in = time.monotonic() - killed
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert f"error: the MLflow tracking server {stack.mlflow_url} did not answer for tracking.outage_limit_s={LIMIT_S} s" \
        in log, log[-4000:]
    assert "submit the same command again to continue" in log
    print(f"stopped {stopped_in:.0f} s after the MLflow server went away")
    published = json.loads((out / "manifest.json").read_text())["iterations"]["1"]["stages"]
    assert {"sampling", "judging", "pairs"} <= set(published)  # what was published stays
    stack.start()
    again = submit(stack, out, *limited)
    assert "SPPO finished" in again.stdout
    run = assert_one_finished_iteration_and_nothing_redone(stack, out, published)
    assert _steps(stack, run) == list(range(1, STEPS + 1))  # the curve, replayed from train_history.json
