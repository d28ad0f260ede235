"""Prompt sources and the per-iteration disjoint splits.

Iteration t (1-based) always gets split t-1 of a seeded shuffle of the de-duplicated source,
so its prompts are reproducible and never overlap another iteration's.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from sppo.config import PromptsConfig

BUILTIN_PREFIX = "builtin:"


class PromptSourceError(ValueError):
    """A prompt source that cannot be used; the message names the file or column."""


def load_prompts(cfg: PromptsConfig) -> list[str]:
    """All prompts of the source, in file order, with empty ones and duplicates dropped."""
    if cfg.source == "builtin:tiny":
        from sppo.tiny.policy import bundled_prompts

        raw = bundled_prompts()
    elif cfg.source.startswith(BUILTIN_PREFIX):
        raise PromptSourceError(f"prompts.source: unknown built-in set {cfg.source!r} (known: builtin:tiny)")
    else:
        raw = _read_column(Path(cfg.source), cfg.column)
    seen: set[str] = set()
    prompts = []
    for text in raw:
        if not isinstance(text, str) or not text.strip() or text in seen:
            continue
        seen.add(text)
        prompts.append(text)
    if not prompts:
        raise PromptSourceError(f"prompts.source {cfg.source}: no non-empty prompts")
    return prompts


def _read_column(path: Path, column: str) -> list:
    if not path.exists():
        raise PromptSourceError(f"prompts.source: file {path} does not exist")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows and column not in rows[0]:
            raise PromptSourceError(f"prompts.source {path}: no column {column!r} (prompts.column)")
        return [row.get(column) for row in rows]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if column not in table.column_names:
            raise PromptSourceError(f"prompts.source {path}: no column {column!r} (prompts.column)")
        return table.column(column).to_pylist()
    raise PromptSourceError(f"prompts.source {path}: unsupported file type (use .jsonl or .parquet)")


def split_prompts(prompts: list[str], num_splits: int, seed: int) -> list[list[str]]:
    """Cut prompts into `num_splits` disjoint parts of near-equal size that cover them all."""
    if num_splits < 1:
        raise ValueError("num_splits must be >= 1")
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    return [[prompts[i] for i in order[part::num_splits]] for part in range(num_splits)]


def iteration_prompts(cfg: PromptsConfig, iteration: int) -> list[str]:
    """The prompts of 1-based `iteration`: its own split, capped at `per_iteration`."""
    splits = split_prompts(load_prompts(cfg), cfg.num_splits, cfg.seed)
    if not 1 <= iteration <= len(splits):
        raise ValueError(f"iteration {iteration} has no split (prompts.num_splits={cfg.num_splits})")
    split = splits[iteration - 1]
    return split[: cfg.per_iteration] if cfg.per_iteration else split
