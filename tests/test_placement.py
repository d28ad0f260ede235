"""Before its first stage the job checks every stage against the live cluster: it adapts (kept
engines restarted per call) where that is safe, waits for an autoscaler that can grow the
cluster, and refuses what can never run; a stage whose actors Ray has not placed says so every
30 s and fails after timeouts.placement_s."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sppo.config import load_config
from sppo.plan import decide_placement, parse_node

REPO = Path(__file__).resolve().parents[1]


def config(name: str, **overrides):
    return load_config(REPO / "configs" / name, overrides)


def test_a_plan_that_fits_runs_as_configured():
    placement = decide_placement(config("tiny.yaml"), parse_node("CPU=3"))
    assert (placement.engine_mode, placement.notes, placement.problems) == ("resident", (), ())


def test_kept_engines_that_crowd_out_training_restart_per_call_instead():
    # The new user's case: `ray start --head` on 2 cores, the tiny default keeps 1 engine (1 CPU)
    # beside 2 training workers of 1 CPU each.
    placement = decide_placement(config("tiny.yaml"), parse_node("CPU=2"))
    assert placement.engine_mode == "restart" and placement.problems == ()
    [note] = placement.notes
    assert "the kept vLLM engines hold 1 CPU, 0 GPU" in note and "sampling.num_engines=1" in note
    assert "stage 'training' needs 2 x 1 CPU, 0 GPU" in note and "the cluster has 2 CPU, 0 GPU over 1 node(s)" in note
    assert "restart for each sampling call" in note and "sampling.engine_fallback=false" in note


def test_the_fallback_can_be_forbidden():
    placement = decide_placement(config("tiny.yaml", **{"sampling.engine_fallback": False}), parse_node("CPU=2"))
    [problem] = placement.problems
    assert "sampling.engine_fallback=false forbids" in problem and "stage 'training' needs 2 x 1 CPU" in problem


def test_gpu_engines_kept_beside_gpu_training_fall_back_too():
    # Resident engines on all 8 GPUs leave none to the 8 training workers: each fits alone.
    cfg = config("gemma-2-9b-it-sppo.yaml", **{"sampling.engine_mode": "resident"})
    placement = decide_placement(cfg, parse_node("CPU=96,GPU=8"))
    assert placement.engine_mode == "restart" and "stage 'training' needs 8 x 4 CPU, 1 GPU" in placement.notes[0]
    assert "stage 'judging' needs 1 x 4 CPU, 1 GPU" in placement.notes[0]


def test_a_stage_that_never_fits_a_fixed_cluster_is_refused():
    placement = decide_placement(config("tiny.yaml", **{"train.num_workers": 4}), parse_node("CPU=3"))
    [problem] = placement.problems
    assert problem.startswith("stage 'training' does not fit") and "train.num_workers=4" in problem
    gpus = decide_placement(config("gemma-2-9b-it-sppo.yaml"), parse_node("CPU=96,GPU=4"))
    assert any("stage 'training' does not fit" in p and "train.num_workers=8" in p for p in gpus.problems)


def test_a_cluster_that_can_grow_is_waited_for():
    cfg = config("gemma-2-9b-it-sppo.yaml")
    # 4 GPUs now, an autoscaler that may grow to 16: the job waits for nodes.
    placement = decide_placement(cfg, parse_node("CPU=96,GPU=4"), {"CPU": 192.0, "GPU": 16.0})
    assert placement.problems == () and placement.engine_mode == "restart"
    assert "its autoscaler can grow it to 192 CPU, 16 GPU" in placement.notes[0]
    assert "timeouts.placement_s=3600" in placement.notes[0]
    # Beyond what it can ever grow to: refused, against those limits.
    never = decide_placement(cfg, parse_node("CPU=96,GPU=4"), {"CPU": 192.0, "GPU": 6.0})
    assert never.problems and "does not fit" in never.problems[0]


def test_the_job_refuses_within_seconds_and_publishes_nothing(ray_cluster, tmp_path):
    """A training that needs more CPUs than the cluster (3) has: exit 2, one error line, no MLflow
    run, no iteration output."""
    store, out = tmp_path / "mlruns.db", tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
           "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "sppo.run", "--config", "configs/tiny.yaml", "--output-dir", str(out),
                           "--set", "train.num_workers=4"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    seconds = time.monotonic() - started
    # Ray's own lines (connecting to the cluster) go to stderr too, outside a Ray job.
    err = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert done.returncode == 2 and len(err) == 1, done.stderr
    assert err[0].startswith("error: stage 'training' does not fit") and "train.num_workers=4" in err[0]
    assert "can place 3 (3 CPU over 1 node(s)" in err[0]
    assert seconds < 30
    assert not list(out.glob("iter-*")) and not (out / "run.json").exists()
    assert not store.exists() or _runs(store) == 0


def _runs(store: Path) -> int:
    import sqlite3

    with sqlite3.connect(store) as db:
        return db.execute("select count(*) from runs").fetchone()[0]


def test_unplaced_actors_are_reported_every_interval_and_time_out(ray_cluster, caplog, monkeypatch):
    """An actor asking for more CPUs than any node has: the wait names it and the free resources,
    and ends after placement_s."""
    import ray

    from sppo import cluster
    from sppo.roles import Role

    monkeypatch.setattr(cluster, "PLACEMENT_REPORT_S", 1.0)
    role = Role("judging", "rule judge", 1, 64.0, 0.0, 0, {}, timeout_s=60.0, placement_s=7.0)

    @ray.remote
    class Big:
        def work(self) -> int:
            return 1

    actor = Big.options(num_cpus=role.cpus).remote()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="sppo"), pytest.raises(TimeoutError) as err:
        role.wait({actor.work.remote(): "big"}, describe=lambda _: "the big actor",
                  placement=role.actors_placement([actor]))
    ray.kill(actor)
    assert time.monotonic() - started < 15
    assert "Ray did not place 1 x rule judge (num_cpus=64, num_gpus=0) within timeouts.placement_s=7 s" in str(err.value)
    lines = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    assert len(lines) >= 2, lines
    assert "stage 'judging': waiting" in lines[0] and "1 x rule judge (num_cpus=64, num_gpus=0)" in lines[0]
    assert "of 3 CPU" in lines[0]


def test_placed_actors_are_not_reported(ray_cluster):
    import ray

    from sppo.roles import Role

    role = Role("judging", "rule judge", 1, 0.5, 0.0, 0, {}, placement_s=1.0)

    @ray.remote
    class Small:
        def __init__(self):
            time.sleep(4)  # placed, and starting as slowly as a vLLM engine: not a placement wait

        def work(self) -> int:
            return 1

    actor = Small.options(num_cpus=role.cpus).remote()
    watch = role.actors_placement([actor])
    time.sleep(1)
    assert watch.pending() == []
    assert ray.get(actor.work.remote()) == 1
    assert watch.pending() == []
    time.sleep(1.2)
    watch.check()  # placed: no timeout, however long the stage takes
    ray.kill(actor)
