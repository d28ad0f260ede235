"""The output directory: per-iteration stage outputs, each published atomically.

A stage output appears at its final path only when complete (write to a temporary
sibling, then rename), so a file that exists is always whole and a resumed job can
trust it.

    <output_dir>/run.json                parent MLflow run id (sppo.tracking)
    <output_dir>/manifest.json           per-stage status, outputs, hashes, run ids (sppo.manifest)
    <output_dir>/config.yaml             resolved config of the latest submission
    <output_dir>/iter-N/samples.parquet    prompt, candidates[K]
    <output_dir>/iter-N/judgments.parquet  prompt, candidates[K], win_matrix[K][K]
    <output_dir>/iter-N/pairs.parquet      SPPO training rows
    <output_dir>/iter-N/stage_metrics.json stage metrics, replayed into a fresh MLflow run
    <output_dir>/iter-N/train_history.json per-step training metrics (written after training)
    <output_dir>/iter-N/checkpoint/        consolidated HF checkpoint (safetensors) = pi_N
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_parquet(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


@dataclass(frozen=True)
class IterationDir:
    root: Path
    iteration: int

    @property
    def path(self) -> Path:
        return self.root / f"iter-{self.iteration}"

    @property
    def samples(self) -> Path:
        return self.path / "samples.parquet"

    @property
    def judgments(self) -> Path:
        return self.path / "judgments.parquet"

    @property
    def pairs(self) -> Path:
        return self.path / "pairs.parquet"

    @property
    def stage_metrics(self) -> Path:
        return self.path / "stage_metrics.json"

    @property
    def train_history(self) -> Path:
        return self.path / "train_history.json"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint"

    @property
    def trained(self) -> bool:
        """Training is done when both its checkpoint and its metric history were published."""
        return (self.checkpoint / "config.json").exists() and self.train_history.exists()

    def read_metrics(self) -> dict[str, float]:
        return json.loads(self.stage_metrics.read_text()) if self.stage_metrics.exists() else {}

    def add_metrics(self, metrics: dict[str, float]) -> None:
        atomic_write_text(self.stage_metrics, json.dumps({**self.read_metrics(), **metrics}, indent=2))

    def archive(self) -> Path | None:
        """Move this iteration's outputs aside (nothing is deleted); returns where they went."""
        if not self.path.exists():
            return None
        n = 1
        while (target := self.root / f"iter-{self.iteration}.superseded-{n}").exists():
            n += 1
        shutil.move(str(self.path), str(target))
        return target
