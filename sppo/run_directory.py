"""The run directory (`output_dir`): where everything of a run lives, and the one way the driver
publishes into it.

    <output_dir>/run.json                 parent MLflow run id (sppo.tracking)
    <output_dir>/manifest.json            per-stage status, outputs, hashes, run ids (sppo.manifest)
    <output_dir>/config.yaml              resolved config of the latest submission
    <output_dir>/iter-N/samples.parquet     prompt, candidates[K]
    <output_dir>/iter-N/judgments.parquet   prompt, candidates[K], win_matrix[K][K]
    <output_dir>/iter-N/pairs.parquet       SPPO training rows
    <output_dir>/iter-N/stage_metrics.json  stage metrics, replayed into a fresh MLflow run
    <output_dir>/iter-N/train_history.json  per-step training metrics (written after training)
    <output_dir>/iter-N/checkpoint/         consolidated HF checkpoint (safetensors) = pi_N
                                            (train.lora: adapter/, pi_N = the base + it)
    <output_dir>/iter-N/eval_samples.parquet    held-out samples of pi_N (iter-0: the base policy's)
    <output_dir>/iter-N/eval_judgments.parquet  pi_N against pi_{N-1} and pi_0 on them

A file appears at its path only when complete (`sppo.storage.write_then_replace`), so a file
that exists is whole and a resumed job can trust it. With `storage_uri` set, the run lives in
that shared storage (`mirror`, a `sppo.storage.SharedStorage`): `write_text` and `write_rows`
publish locally and then upload, explicitly, and output_dir is the driver's copy, made equal to
the storage at the start of every submission. The training workers write the checkpoint to the
storage themselves; `pull` brings it into the driver's copy.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from sppo.models import absolute_path
from sppo.policy import ADAPTER_CONFIG, ADAPTER_DIR
from sppo.storage import SharedStorage, atomic_write_parquet, atomic_write_text

RUN_FILE = "run.json"
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.yaml"


@dataclass(frozen=True)
class RunDirectory:
    root: Path
    mirror: SharedStorage | None = None

    @property
    def run_file(self) -> Path:
        return self.root / RUN_FILE

    @property
    def manifest_file(self) -> Path:
        return self.root / MANIFEST_FILE

    @property
    def config_file(self) -> Path:
        return self.root / CONFIG_FILE

    def iteration(self, t: int) -> IterationDir:
        return IterationDir(self, t)

    def write_text(self, path: Path, text: str) -> None:
        """Publish a text file under the run directory: whole or not at all, then to the mirror."""
        atomic_write_text(path, text)
        self._upload(path)

    def write_rows(self, path: Path, rows: list[dict]) -> None:
        """Publish rows as a parquet file under the run directory, as `write_text` does."""
        atomic_write_parquet(path, rows)
        self._upload(path)

    def _upload(self, path: Path) -> None:
        if self.mirror is not None:
            self.mirror.push(path)

    def pull(self, path: Path) -> None:
        """A directory the workers published to the mirror (a checkpoint), into the driver's copy."""
        if self.mirror is not None:
            self.mirror.pull(path)

    def for_workers(self, spec: str) -> str:
        """A model or directory as engines, judges and train workers on any node must be given it:
        with a mirror, its storage URI; without, output_dir is shared and paths serve. A relative
        path is made absolute here, where the config named it: an actor's working directory is
        not the driver's."""
        spec = absolute_path(spec)
        return self.mirror.worker_spec(spec) if self.mirror is not None else spec

    def archive(self, t: int) -> Path | None:
        """Move iteration t's outputs aside, here and in the mirror (nothing is deleted); returns
        where they went."""
        source = self.iteration(t).path
        if not source.exists():
            return None
        n = 1
        while (target := self.root / f"iter-{t}.superseded-{n}").exists():
            n += 1
        shutil.move(str(source), str(target))
        if self.mirror is not None:
            self.mirror.move(source, target)
        return target


@dataclass(frozen=True)
class IterationDir:
    run: RunDirectory
    iteration: int

    @property
    def root(self) -> Path:
        return self.run.root

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
    def eval_samples(self) -> Path:
        """Held-out samples of this iteration's policy (iteration 0: the base policy)."""
        return self.path / "eval_samples.parquet"

    @property
    def eval_judgments(self) -> Path:
        return self.path / "eval_judgments.parquet"

    @property
    def trained(self) -> bool:
        """Training is done when both its checkpoint (with train.lora, its adapter) and its metric
        history were published."""
        published = (self.checkpoint / "config.json").exists() or (self.checkpoint / ADAPTER_DIR / ADAPTER_CONFIG).exists()
        return published and self.train_history.exists()

    def read_metrics(self) -> dict[str, float]:
        return json.loads(self.stage_metrics.read_text()) if self.stage_metrics.exists() else {}

    def add_metrics(self, metrics: dict[str, float]) -> None:
        self.run.write_text(self.stage_metrics, json.dumps({**self.read_metrics(), **metrics}, indent=2))
