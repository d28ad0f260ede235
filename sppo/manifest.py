"""The run manifest: `<output_dir>/manifest.json`, rewritten atomically after every stage.

Per iteration and stage it records the status, the output paths, their content hashes, the
MLflow run id and a digest of the config fields the stage's result depends on. It alone decides
what a re-submitted job redoes (`redo_plan`): a stage is done when its entry exists, its
outputs still hash as recorded, the config fields it depends on are unchanged and none of the
stages it reads from (`STAGE_INPUTS`) is redone; every other stage runs again. So a changed
`eval.*` field redoes each iteration's evaluation and tracking, not its training. MLflow reports;
it does not decide.

It also keeps the run's lineage: the fields that, once changed, make earlier iterations belong
to another run (the policy, K, the judge, the prompt source). Continuing a run under a
different lineage is refused unless forced.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from sppo.config import RunConfig
from sppo.run_directory import RunDirectory

# Changing any of these makes the iterations already done answer a different question.
LINEAGE_FIELDS = (
    "policy.path", "sampling.k", "judge.kind", "judge.path", "judge.estimator", "judge.rule.",
    "prompts.source", "prompts.split", "prompts.column", "prompts.response_column", "prompts.num_splits",
    "prompts.seed", "prompts.eval_size", "prompts.eval_split",
)
# An iteration's stages, in the order they run.
STAGES = ("sampling", "judging", "pairs", "training", "evaluation", "tracking")
_SAMPLED_WITH = ("sampling.k", "sampling.temperature", "sampling.top_p", "sampling.max_tokens", "sampling.seed",
                 "sampling.max_model_len", "sampling.dtype")
_JUDGED_WITH = ("judge.kind", "judge.path", "judge.estimator", "judge.source_max_length", "judge.candidate_max_length",
                "judge.rule.")
# The config fields each stage's output depends on (besides its input files). Fields that change
# how a stage runs but not what it makes (resources, restarts, engine mode) are left out.
STAGE_FIELDS = {
    "sampling": ("policy.", "prompts.", *_SAMPLED_WITH, "train.max_prompt_length", "train.reference_logps"),
    "judging": (*_JUDGED_WITH, "prompts.response_column"),
    "pairs": ("train.reference_logps",),
    "training": ("train.",),
    "evaluation": ("prompts.", *_SAMPLED_WITH, *_JUDGED_WITH, "eval."),
    "tracking": (),
}
_RUN_ONLY_FIELDS = ("train.max_failures", "train.cpus_per_worker")
# The stages whose outputs each stage reads, as (iteration offset, stage): redoing one of them
# redoes it. Iteration t samples from and trains on top of pi_t (iteration t-1's training), and
# evaluates pi_{t+1} against pi_t; its tracking logs all of its outputs and names the champion
# among the evaluations so far (through iteration t-1's tracking).
STAGE_INPUTS = {
    "sampling": ((-1, "training"),),
    "judging": ((0, "sampling"),),
    "pairs": ((0, "sampling"), (0, "judging")),
    "training": ((0, "pairs"), (-1, "training")),
    "evaluation": ((0, "training"), (-1, "training")),
    "tracking": ((0, "sampling"), (0, "judging"), (0, "pairs"), (0, "training"), (0, "evaluation"),
                 (-1, "tracking")),
}


class LineageError(ValueError):
    """The config differs from the one the output directory was made with."""


def _pick(cfg: RunConfig, prefixes: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in cfg.flat().items() if any(k == p or (p.endswith(".") and k.startswith(p))
                                                        for p in prefixes)}


def stage_digest(cfg: RunConfig, stage: str) -> str:
    return digest({k: v for k, v in _pick(cfg, STAGE_FIELDS[stage]).items() if k not in _RUN_ONLY_FIELDS})


def digest(values: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Files written into an output directory by a later stage, which records them itself: the
# tracking stage's model card in the checkpoint.
_WRITTEN_LATER = {"checkpoint": ("README.md",)}


def content_hash(path: Path, exclude: tuple[str, ...] = ()) -> str:
    """sha256 of a file (as `sha256sum` prints it), or of a directory's files: their relative
    names and bytes, in name order, those named in `exclude` (relative paths) left out."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and str(p.relative_to(path)) not in exclude) \
        if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            h.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class RunManifest:
    def __init__(self, run: RunDirectory):
        self.run, self.root, self.path = run, run.root, run.manifest_file
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {
            "lineage": None, "iterations": {}}

    def check_lineage(self, cfg: RunConfig, force: bool = False) -> None:
        """Record the lineage on first use; refuse a changed one unless forced."""
        current = _pick(cfg, LINEAGE_FIELDS)
        recorded = self.data.get("lineage")
        if recorded is not None and recorded != current and not force:
            changed = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
            details = "; ".join(f"{k}: {recorded.get(k)!r} -> {current.get(k)!r}" for k in changed)
            raise LineageError(
                f"{self.path}: the config changes what earlier iterations were made from ({details}). "
                "Use a new --output-dir, or --force to continue with the new values anyway"
            )
        if recorded != current:  # unchanged: nothing is written (another driver may be writing)
            self.data["lineage"] = current
            self._save()

    def record_stage(self, iteration: int, stage: str, cfg: RunConfig, outputs: dict[str, Path],
                     mlflow_run_id: str) -> None:
        entry = self.data["iterations"].setdefault(str(iteration), {"stages": {}})
        entry["mlflow_run_id"] = mlflow_run_id
        entry["stages"][stage] = {
            "status": "done",
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "outputs": {name: str(p.relative_to(self.root)) for name, p in outputs.items()},
            "sha256": {name: content_hash(p, _WRITTEN_LATER.get(name, ())) for name, p in outputs.items()},
            "config_digest": stage_digest(cfg, stage),
            "mlflow_run_id": mlflow_run_id,
        }
        self._save()

    def stage(self, iteration: int, stage: str) -> dict[str, Any] | None:
        return self.data["iterations"].get(str(iteration), {}).get("stages", {}).get(stage)

    def vouches_for(self, iteration: int, stage: str, cfg: RunConfig) -> bool:
        """The stage is done: recorded, its outputs hash as they did then, and the config fields
        its result depends on are unchanged."""
        entry = self.stage(iteration, stage)
        if entry is None or entry.get("status") != "done" or entry.get("config_digest") != stage_digest(cfg, stage):
            return False
        for name, relative in entry["outputs"].items():
            path = self.root / relative
            if not path.exists() or content_hash(path, _WRITTEN_LATER.get(name, ())) != entry["sha256"].get(name):
                return False
        return True

    def redo_plan(self, cfg: RunConfig) -> dict[int, tuple[str, ...]]:
        """What a job on this output directory runs: for each iteration up to cfg.iterations that
        has anything to run, its stages in order (all of them for an iteration not yet begun).
        A stage runs when the manifest does not vouch for it or a stage it reads from runs
        (`STAGE_INPUTS`). Entries of the stages that run, in any recorded iteration, are dropped
        first: they describe outputs made from what is redone."""
        recorded = [int(key) for key in self.data["iterations"]]
        redo: set[tuple[int, str]] = set()
        for t in range(1, max([cfg.iterations, *recorded]) + 1):
            for stage in STAGES:
                # Inputs first: a stage whose input is redone is not hashed (a 7-9B checkpoint takes seconds).
                if any((t + offset, source) in redo for offset, source in STAGE_INPUTS[stage]) or \
                        not self.vouches_for(t, stage, cfg):
                    redo.add((t, stage))
        self._drop(redo)
        plan = {t: tuple(stage for stage in STAGES if (t, stage) in redo) for t in range(1, cfg.iterations + 1)}
        return {t: stages for t, stages in plan.items() if stages}

    def _drop(self, stages: set[tuple[int, str]]) -> None:
        changed = False
        for key, entry in list(self.data["iterations"].items()):
            recorded = entry.get("stages", {})
            for stage in [s for s in recorded if (int(key), s) in stages]:
                del recorded[stage]
                changed = True
            if not recorded:
                del self.data["iterations"][key]
                changed = True
        if changed:
            self._save()

    def forget(self, iteration: int) -> None:
        """An iteration that is redone from scratch (its outputs were moved aside)."""
        if self.data["iterations"].pop(str(iteration), None) is not None:
            self._save()

    def _save(self) -> None:
        self.run.write_text(self.path, json.dumps(self.data, indent=2, sort_keys=True))
