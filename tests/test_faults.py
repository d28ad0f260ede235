"""Fault injection on a real job: its driver is SIGKILLed inside each stage in turn.

A real Ray head and MLflow server (`live_stack`) run the tiny config submitted with `ray job
submit`. One uninterrupted run is the yardstick. A second run, in its own output directory, is
killed in sampling, judging, pair building, training and tracking, and re-submitted after each
kill. It must finish with the uninterrupted run's training rows, one `iter-1` run in MLflow,
and no stage done twice.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from sppo.devtools.faults import KILL_AT_ENV
from tests.live_stack import REPO, nested_runs, rest, submit, submit_command, wait_for_a_training_step
from tests.processes import descendants_titled, driver_of, wait_for_titled, wait_gone

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

# The PairRM judge runs in an actor, which the judging kill waits for.
CONFIG = "configs/tiny-pairrm.yaml"
# Three epochs (6 optimizer steps) leave the training kill a few seconds after the first step.
# A killed driver's lease on the output directory (sppo/lease.py) is taken over once unrenewed
# for timeouts.lease_s: 5 s here, less than a re-submission takes to reach it.
ARGS = ("--iters", "1", "--set", "prompts.per_iteration=16", "--set", "train.epochs=3",
        "--set", "timeouts.lease_s=5")


def _stages(out: Path) -> dict[str, dict]:
    manifest = out / "manifest.json"
    if not manifest.exists():
        return {}
    return json.loads(manifest.read_text())["iterations"].get("1", {}).get("stages", {})


def _submit_and_kill(stack, out: Path, *, when_running: str | None = None, when_training: bool = False,
                     kill_at: str | None = None, config: str = CONFIG, args: tuple[str, ...] = ARGS) -> None:
    """Submit the job; SIGKILL its driver once a worker titled `when_running` runs or once the
    training workers logged a step, or let the driver kill itself at the fault-injection point
    `kill_at`. The submission must fail."""
    cmd, env = submit_command(stack, out, *args, config=config, job_env={KILL_AT_ENV: kill_at} if kill_at else None)
    job = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if when_running:
            wait_for_titled(stack.pids["ray"], when_running, still_running=lambda: job.poll() is None)
        elif when_training:
            wait_for_a_training_step(stack, out, job)
        if when_running or when_training:
            driver_of(out).kill()
        assert job.wait(timeout=900) != 0, "the submission did not report the killed job"
    finally:
        if job.poll() is None:
            job.kill()
    # The dead driver's actors and workers go with it, freeing their CPUs for the next attempt.
    for title in ("ray::VLLMEngine", "ray::PairRMJudgeActor", "ray::RayTrainWorker"):
        left = wait_gone(descendants_titled(stack.pids["ray"], title))
        assert not left, f"{title} outlived its killed driver: {left}"


def test_driver_killed_in_every_stage_resumes_to_the_uninterrupted_result(live_stack, tmp_path):
    stack = live_stack
    uninterrupted, out = tmp_path / "uninterrupted", tmp_path / "killed"
    submit(stack, uninterrupted, *ARGS, config=CONFIG)

    kills = [  # (stage killed, how, outputs that must exist after the kill, that must not)
        ("sampling", {"when_running": "ray::VLLMEngine"}, [], ["samples.parquet"]),
        ("judging", {"when_running": "ray::PairRMJudgeActor"}, ["samples.parquet"], ["judgments.parquet"]),
        ("pairs", {"kill_at": "pairs"}, ["judgments.parquet"], ["pairs.parquet"]),
        ("training", {"when_training": True}, ["pairs.parquet"], ["checkpoint"]),
        ("tracking", {"kill_at": "tracking"}, ["checkpoint/config.json"], []),
    ]
    recorded: dict[str, dict] = {}  # each stage's manifest entry when it was first done
    for stage, how, present, absent in kills:
        _submit_and_kill(stack, out, **how)
        stages = _stages(out)
        assert stage not in stages, f"{stage} is recorded as done although its driver was killed in it"
        for name, entry in stages.items():
            assert recorded.setdefault(name, entry) == entry, f"{name} was redone after the kill in {stage}"
        for name in present:
            assert (out / "iter-1" / name).exists(), f"{name} missing after the kill in {stage}"
        for name in absent:
            assert not (out / "iter-1" / name).exists(), f"{name} published although {stage} was killed"

    submit(stack, out, *ARGS, config=CONFIG)
    stages = _stages(out)
    assert {"sampling", "judging", "pairs", "training", "tracking"} <= set(stages)
    for name, entry in recorded.items():
        assert stages[name] == entry, f"{name} was redone by the final submission"

    # With fixed seeds the interrupted run trained on exactly the uninterrupted run's rows.
    rows = pd.read_parquet(out / "iter-1" / "pairs.parquet").to_dict("records")
    expected = pd.read_parquet(uninterrupted / "iter-1" / "pairs.parquet").to_dict("records")
    assert rows == expected

    # MLflow: one live iter-1 run, FINISHED and complete; the five killed attempts are FAILED,
    # point at their replacement and are soft-deleted (restorable).
    record = json.loads((out / "run.json").read_text())
    runs = nested_runs(stack, record["experiment_id"], record["parent_run_id"])
    assert list(runs) == ["iter-1"] and runs["iter-1"]["info"]["status"] == "FINISHED"
    final_id = runs["iter-1"]["info"]["run_id"]
    metrics = {m["key"]: m["value"] for m in runs["iter-1"]["data"]["metrics"]}
    assert {"sampling/candidates", "time/judging_s", "pairs/rows", "train/loss"} <= set(metrics)  # replayed
    # The evaluation the attempt killed in tracking made is restored as it was, length control included.
    evaluated = {k: v for k, v in json.loads((out / "iter-1" / "stage_metrics.json").read_text()).items()
                 if k.startswith("eval/")}
    assert "eval/lc_win_rate_vs_base" in evaluated and {k: metrics[k] for k in evaluated} == evaluated
    listed = {f["path"] for f in rest(stack, "artifacts/list", {"run_id": final_id, "path": "data"})["files"]}
    assert {"data/samples.parquet", "data/judgments.parquet", "data/pairs.parquet"} <= listed
    assert rest(stack, "artifacts/list", {"run_id": final_id, "path": "checkpoint"})["files"]
    killed = rest(stack, "runs/search", body={
        "experiment_ids": [record["experiment_id"]],
        "filter": f"tags.mlflow.parentRunId = '{record['parent_run_id']}'",
        "run_view_type": "DELETED_ONLY",
    })["runs"]
    assert len(killed) == len(kills)
    for run in killed:
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert run["info"]["status"] == "FAILED" and tags["mlflow.runName"] == "iter-1"
        assert tags["sppo.replaced_by"] in {r["info"]["run_id"] for r in killed} | {final_id}


def test_a_lora_job_killed_while_training_resumes_from_the_previous_adapter(live_stack, tmp_path):
    """configs/tiny-lora.yaml: iteration 1 done, then a submission for 2 iterations killed once
    iteration 2's adapter (continuing adapter_1) took a training step; the re-submission redoes
    only training on, from base + adapter_1 again, and publishes adapter_2 alone, on the base."""
    out, config = tmp_path / "lora", "configs/tiny-lora.yaml"
    common = ("--set", "prompts.per_iteration=16", "--set", "train.epochs=3", "--set", "timeouts.lease_s=5")
    submit(live_stack, out, "--iters", "1", *common, config=config)
    _submit_and_kill(live_stack, out, when_training=True, config=config, args=("--iters", "2", *common))
    iteration_2 = json.loads((out / "manifest.json").read_text())["iterations"]["2"]["stages"]
    assert {"sampling", "judging", "pairs"} <= set(iteration_2) and "training" not in iteration_2
    assert not (out / "iter-2" / "checkpoint").exists()

    done = submit(live_stack, out, "--iters", "2", *common, config=config)
    assert "iteration 2: running training, evaluation, tracking (the manifest vouches" in done.stdout
    stages = json.loads((out / "manifest.json").read_text())["iterations"]["2"]["stages"]
    assert {name: stages[name] for name in ("sampling", "judging", "pairs")} == {
        name: iteration_2[name] for name in ("sampling", "judging", "pairs")}, "a stage before training was redone"
    record = json.loads((out / "run.json").read_text())
    runs = nested_runs(live_stack, record["experiment_id"], record["parent_run_id"])
    params = {p["key"]: p["value"] for p in runs["iter-2"]["data"]["params"]}
    assert params["policy.input"] == f"tiny:policy + adapter {out}/iter-1/checkpoint/adapter"
    checkpoint = out / "iter-2" / "checkpoint"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["README.md", "adapter"]
    adapter = json.loads((checkpoint / "adapter" / "adapter_config.json").read_text())
    assert "iter-" not in adapter["base_model_name_or_path"]

