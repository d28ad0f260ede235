"""End to end: a real Ray head and MLflow server, the job submitted with `ray job submit`.

Checks go through MLflow's REST API, as a user's tooling would see the record.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.live_stack import REPO, assert_no_secrets, nested_runs, rest, submit, submit_command

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_three_iterations_then_resume(live_stack, tmp_path):
    stack = live_stack
    output_dir = tmp_path / "run"
    first = submit(stack, output_dir, "--iters", "3")
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
    submit(stack, output_dir, "--iters", "3")
    assert {n: r["info"]["run_id"] for n, r in nested_runs(stack, record["experiment_id"],
                                                            record["parent_run_id"]).items()} == \
        {n: r["info"]["run_id"] for n, r in runs.items()}

    submit(stack, output_dir, "--iters", "3", "--resume-from", "3")
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


def _driver_of(output_dir) -> psutil.Process:
    """The job's driver: the `python -m sppo.run ... --output-dir <output_dir>` process."""
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if ("sppo.run" in cmd and str(output_dir) in cmd and "submit" not in cmd
                and Path(cmd[0]).name.startswith("python")):
            return proc
    raise AssertionError(f"no driver process for {output_dir}")


def test_driver_killed_during_training_continues_on_resubmit(live_stack, tmp_path):
    """SIGKILL the driver while it trains; the re-submitted job redoes only training."""
    stack, out = live_stack, tmp_path / "run"
    args = ("--iters", "1", "--set", "prompts.per_iteration=16")
    cmd, env = submit_command(stack, out, *args)
    job = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / "manifest.json"
    deadline = time.monotonic() + 900
    while not (manifest.exists() and "pairs" in json.loads(manifest.read_text())["iterations"].get("1", {})
               .get("stages", {})):
        assert job.poll() is None, "the job ended before its training stage"
        assert time.monotonic() < deadline, "pairs stage not reached in time"
        time.sleep(0.2)
    before = json.loads(manifest.read_text())["iterations"]["1"]["stages"]
    _driver_of(out).kill()
    assert job.wait(timeout=600) != 0  # the submission reports the failed job
    assert not (out / "iter-1" / "checkpoint").exists()
    killed_run = json.loads(manifest.read_text())["iterations"]["1"]["mlflow_run_id"]

    submit(stack, out, *args)
    after = json.loads(manifest.read_text())["iterations"]["1"]["stages"]
    for stage in ("sampling", "judging", "pairs"):
        assert after[stage] == before[stage], f"{stage} was redone"
    assert after["training"]["status"] == "done" and after["tracking"]["status"] == "done"
    assert (out / "iter-1" / "checkpoint" / "config.json").exists()

    record = json.loads((out / "run.json").read_text())
    runs = nested_runs(stack, record["experiment_id"], record["parent_run_id"])
    assert list(runs) == ["iter-1"] and runs["iter-1"]["info"]["status"] == "FINISHED"
    metrics = {m["key"] for m in runs["iter-1"]["data"]["metrics"]}
    assert {"sampling/candidates", "time/judging_s", "train/loss"} <= metrics  # replayed + retrained
    old = rest(stack, "runs/get", {"run_id": killed_run})["run"]
    assert old["info"]["status"] == "FAILED" and old["info"]["lifecycle_stage"] == "deleted"
