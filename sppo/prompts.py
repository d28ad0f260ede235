"""Prompt sources and the per-iteration disjoint splits.

Iteration t (1-based) gets either its ready-made split (a source or split name with "{t}",
e.g. split "train_iteration_{t}" of snorkelai/Snorkel-Mistral-PairRM-DPO-Dataset) or part
t-1 of a seeded shuffle of the whole source; either way its prompts are reproducible and
never overlap another iteration's.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from sppo.config import PromptsConfig

BUILTIN_PREFIX = "builtin:"
HUB_PREFIX = "hf:"
ITERATION_MARK = "{t}"


class PromptSourceError(ValueError):
    """A prompt source that cannot be used; the message names the file or column."""


def load_prompts(cfg: PromptsConfig, iteration: int | None = None) -> list[str]:
    """All prompts of the source (of `iteration`'s ready split, if it has them), in source
    order, with empty ones and duplicates dropped."""
    source, split = cfg.source, cfg.split
    if iteration is not None:
        source = source.replace(ITERATION_MARK, str(iteration))
        split = split.replace(ITERATION_MARK, str(iteration))
    if source == "builtin:tiny":
        from sppo.tiny.policy import bundled_prompts

        raw = bundled_prompts()
    elif source.startswith(BUILTIN_PREFIX):
        raise PromptSourceError(f"prompts.source: unknown built-in set {source!r} (known: builtin:tiny)")
    else:
        raw = _read_column(source, split, cfg.column)
    seen: set[str] = set()
    prompts = []
    for text in raw:
        if not isinstance(text, str) or not text.strip() or text in seen:
            continue
        seen.add(text)
        prompts.append(text)
    if not prompts:
        raise PromptSourceError(f"prompts.source {source}: no non-empty prompts")
    return prompts


def _read_column(source: str, split: str, column: str) -> list:
    if source.startswith(HUB_PREFIX):
        import datasets

        return _dataset_column(datasets.load_dataset(source[len(HUB_PREFIX):], split=split), source, column)
    path = Path(source)
    if not path.exists():
        raise PromptSourceError(f"prompts.source: {path} does not exist")
    if path.is_dir():
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise PromptSourceError(
                    f"prompts.source {path}: no split {split!r} (prompts.split); it has {sorted(loaded)}"
                )
            loaded = loaded[split]
        return _dataset_column(loaded, source, column)
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
    raise PromptSourceError(
        f"prompts.source {path}: unsupported (use .jsonl, .parquet, a saved-dataset directory or hf:<repo>)"
    )


def _dataset_column(dataset, source: str, column: str) -> list:
    if column not in dataset.column_names:
        raise PromptSourceError(
            f"prompts.source {source}: no column {column!r} (prompts.column); it has {dataset.column_names}"
        )
    return dataset[column]


def split_prompts(prompts: list[str], num_splits: int, seed: int) -> list[list[str]]:
    """Cut prompts into `num_splits` disjoint parts of near-equal size that cover them all."""
    if num_splits < 1:
        raise ValueError("num_splits must be >= 1")
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    return [[prompts[i] for i in order[part::num_splits]] for part in range(num_splits)]


def iteration_prompts(cfg: PromptsConfig, iteration: int) -> list[str]:
    """The prompts of 1-based `iteration`: its own split, capped at `per_iteration`."""
    if ITERATION_MARK in cfg.source or ITERATION_MARK in cfg.split:
        split = load_prompts(cfg, iteration)
    else:
        if not 1 <= iteration <= cfg.num_splits:
            raise ValueError(f"iteration {iteration} has no split (prompts.num_splits={cfg.num_splits})")
        split = split_prompts(load_prompts(cfg), cfg.num_splits, cfg.seed)[iteration - 1]
    return split[: cfg.per_iteration] if cfg.per_iteration else split
