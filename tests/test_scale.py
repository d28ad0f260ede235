"""What must not grow faster than an iteration's work, at sizes that run in seconds (the scale
benchmark, `python -m bench --only scale`, measures 1,000 to 20,000 prompts), and a full disk
under any stage's output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from sppo.config import load_config
from sppo.pairs import training_rows
from sppo.run_directory import IterationDir, RunDirectory
from sppo.storage import atomic_write_parquet
from sppo.tracking import Tracker, sample_table


def _judged(n: int, k: int = 5, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """n distinct prompts, k candidates each, random win matrices; their SPPO pairs."""
    rng = np.random.default_rng(seed)
    judged, matrices = [], []
    for i in range(n):
        upper = np.triu(rng.uniform(0.05, 0.95, (k, k)), 1)
        matrix = upper + np.tril(1.0 - upper.T, -1) + np.eye(k) * 0.5
        matrices.append(matrix)
        judged.append({"prompt": f"prompt {i}: {rng.integers(1 << 30)}",
                       "candidates": [f"answer {j} to {i} " + "x" * int(rng.integers(10, 200)) for j in range(k)],
                       "off_policy": [False] * k, "win_matrix": matrix.tolist()})
    pairs = training_rows([r["prompt"] for r in judged], [r["candidates"] for r in judged], matrices,
                          [r["off_policy"] for r in judged])
    return judged, pairs


def _published(tmp_path: Path, n: int) -> IterationDir:
    it = RunDirectory(tmp_path / f"out-{n}").iteration(1)
    judged, pairs = _judged(n)
    atomic_write_parquet(it.judgments, judged)
    atomic_write_parquet(it.pairs, pairs)
    return it


def test_the_sample_table_holds_the_configured_prompts_whatever_the_iteration_size(tmp_path):
    small, large = _published(tmp_path, 300), _published(tmp_path, 3000)
    table = sample_table(large.judgments, large.pairs, rows=200)
    assert all(len(column) == 200 for column in table.values())
    # Each shown prompt's chosen and rejected are its own pairs row's.
    pairs = {r["prompt"]: r for r in pq.read_table(large.pairs).to_pylist()}
    for prompt, chosen, rejected in zip(table["prompt"], table["chosen"], table["rejected"], strict=True):
        assert (chosen, rejected) == (pairs[prompt]["chosen"], pairs[prompt]["rejected"])
    assert table["prompt"] == [r["prompt"] for r in pq.read_table(large.judgments).to_pylist()[:200]]
    assert len(sample_table(small.judgments, small.pairs, rows=5000)["prompt"]) == 300

    # What MLflow receives: the same size at 300 and at 3,000 prompts.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "exp", RunDirectory(tmp_path))
    tracker.start_parent("job", {})
    sizes = []
    for iteration, it in enumerate((small, large), start=1):
        run = tracker.start_iteration(iteration, {})
        tracker.log_table(run, sample_table(it.judgments, it.pairs, rows=200), "samples.json")
        artifact = MlflowClient(uri).download_artifacts(run, "samples.json", str(tmp_path / run))
        logged = json.loads(Path(artifact).read_text())
        assert len(logged["data"]) == 200
        sizes.append(Path(artifact).stat().st_size)
    assert 0.8 < sizes[1] / sizes[0] < 1.25, sizes


def test_the_default_sample_table_is_a_few_hundred_prompts():
    assert 100 <= load_config("configs/tiny.yaml").tracking.sample_table_rows <= 500


def _fill(disk: Path, leave: int) -> None:
    """Fill the filesystem but for about `leave` bytes."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "filler", "wb") as fh:
        fh.write(os.urandom(max(free - leave, 0)))


def test_a_full_disk_under_any_stage_output_names_the_file_and_publishes_nothing(tmp_path, small_disk):
    """The sampling, judging and pairs stages publish through `IterationRecord.publish`: an output
    that does not fit fails with its path and the disk error, leaves no partial file or temporary
    sibling behind, and the manifest does not count the stage as done. Judging and pairs run as
    the controller runs them (the rule judge runs in the driver)."""
    from sppo.controller import IterationRecord, judge_stage, pairs_stage
    from sppo.manifest import RunManifest

    disk = small_disk("1m")
    cfg = load_config("configs/tiny.yaml", {"output_dir": str(disk)})
    it = RunDirectory(disk).iteration(1)
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", RunDirectory(tmp_path / "tracking"))
    tracker.start_parent("job", {})
    rec = IterationRecord(tracker, RunManifest(RunDirectory(disk)), it, cfg, tracker.start_iteration(1, {}))
    # Random text does not compress: 40 prompts x 4 candidates of 2 kB, about 320 kB a file.
    rows = [{"prompt": f"prompt {i}", "candidates": [os.urandom(1000).hex() for _ in range(4)]} for i in range(40)]

    def attempt(stage: str, output: Path, run) -> None:
        metrics_before = it.stage_metrics.read_bytes() if it.stage_metrics.exists() else None
        _fill(disk, leave=64 * 1024)
        with pytest.raises(OSError, match="No space left on device") as failure:
            run()
        assert str(output) in str(failure.value)
        assert not output.exists() and not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}")]
        assert rec.manifest.stage(1, stage) is None
        assert (it.stage_metrics.read_bytes() if it.stage_metrics.exists() else None) == metrics_before
        (disk / "filler").unlink()

    attempt("sampling", it.samples, lambda: rec.publish(it.samples, rows, {"sampling/prompts": 40}))
    rec.publish(it.samples, rows, {"sampling/prompts": 40})
    attempt("judging", it.judgments, lambda: judge_stage(cfg, rec, judge=""))
    judge_stage(cfg, rec, judge="")
    attempt("pairs", it.pairs, lambda: pairs_stage(cfg, rec))
    pairs_stage(cfg, rec)  # with room again, the stage completes from the same inputs
    assert len(pq.read_table(it.pairs)) == 40 and rec.manifest.stage(1, "pairs")["status"] == "done"
