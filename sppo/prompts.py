"""Prompt sources and the per-iteration disjoint splits.

Iteration t (1-based) gets either its ready-made split (a source or split name with "{t}",
e.g. split "train_iteration_{t}" of snorkelai/Snorkel-Mistral-PairRM-DPO-Dataset) or part
t-1 of a seeded shuffle of the whole source; either way its prompts are reproducible and
never overlap another iteration's.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from sppo.config import PromptsConfig

BUILTIN_PREFIX = "builtin:"
HUB_PREFIX = "hf:"
ITERATION_MARK = "{t}"


class PromptSourceError(ValueError):
    """A prompt source that cannot be used; the message names the file or column."""


@dataclass
class PromptSelection:
    """An iteration's prompts and how many were dropped on the way, for MLflow."""

    prompts: list[str]
    counts: dict[str, int] = field(default_factory=dict)
    # For messages, not metrics: the iteration's split before the held-out, length and
    # per_iteration filters, and the parts a pooled source was cut into (None: ready-made splits).
    split_size: int = 0
    num_splits: int | None = None

    def _over_cap(self) -> int:
        c = self.counts
        return self.split_size - c.get("heldout_dropped", 0) - c.get("too_long_dropped", 0) - c["selected"]

    def _unusable(self) -> list[tuple[int, str]]:
        c = self.counts
        duplicates = c["duplicates_dropped"]
        return [(c["empty_dropped"], "empty"), (duplicates, _plural(duplicates, "duplicate"))]

    def summary(self, iteration: int, max_prompt_length: int) -> str:
        """The job log's line: how many prompts the iteration keeps, and why the others were left out."""
        c = self.counts
        # A pooled source's held-out set is taken before the cut; a ready split loses its own.
        heldout = c["heldout"] if self.num_splits else c["heldout_dropped"]
        left = _listed([(c.get("too_long_dropped", 0), _too_long(max_prompt_length)), *self._unusable(),
                        (heldout, "held out"), (self._over_cap(), f"over prompts.per_iteration={c['selected']}")])
        return f"iteration {iteration}: {c['selected']} prompts; " + (f"left out {left}" if left else "none left out")

    def shortage(self, iteration: int, max_prompt_length: int) -> str:
        """Where the source's prompts went, for the error when an iteration keeps too few."""
        c = self.counts
        dropped = _listed(self._unusable())
        had = f"{c['source_rows']} prompts" + (f" ({dropped} dropped)" if dropped else "")
        if self.num_splits:
            pool = c["source_rows"] - c["empty_dropped"] - c["duplicates_dropped"] - c["heldout"]
            size, extra = divmod(pool, self.num_splits)
            cut = f"the other {pool} are cut into {self.num_splits} splits (prompts.num_splits) of {size}"
            if extra:
                cut += f" or {size + 1}, iteration {iteration}'s of {self.split_size}"
            parts = [f"the source has {had}", f"the held-out set takes {c['heldout']} (prompts.eval_size)",
                     cut if pool else f"none are left for the {self.num_splits} splits (prompts.num_splits)"]
        else:
            parts = [f"iteration {iteration}'s split has {had}"]
            if c["heldout_dropped"]:
                parts.append(f"{c['heldout_dropped']} of them are held out (prompts.eval_split)")
        if c.get("too_long_dropped"):
            parts.append(f"{c['too_long_dropped']} of iteration {iteration}'s are {_too_long(max_prompt_length)}")
        if self._over_cap():
            parts.append(f"prompts.per_iteration caps it at {c['selected']}")
        return "; ".join(parts)


def _listed(counted: list[tuple[int, str]]) -> str:
    """'3 empty, 2 duplicates': the nonzero counts only."""
    return ", ".join(f"{n} {what}" for n, what in counted if n)


def _too_long(max_prompt_length: int) -> str:
    return f"too long (> train.max_prompt_length={max_prompt_length} tokens)"


def _plural(n: int, word: str) -> str:
    return word if n == 1 else word + "s"


def load_prompts(cfg: PromptsConfig, iteration: int | None = None, split: str | None = None) -> list[str]:
    """All prompts of the source (of `iteration`'s ready split, or of `split`), in source order,
    with empty ones and duplicates dropped."""
    return _load(cfg, iteration, split).prompts


def _load(cfg: PromptsConfig, iteration: int | None = None, split: str | None = None) -> PromptSelection:
    source, split = cfg.source, split or cfg.split
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
    prompts, empty = [], 0
    for row, text in enumerate(raw):
        if text is not None and not isinstance(text, str):
            raise PromptSourceError(f"prompts.source {source}: row {row} of column {cfg.column!r} (prompts.column) "
                                    f"holds a {type(text).__name__}, not a string")
        if text is None or not text.strip():
            empty += 1
        elif text not in seen:
            seen.add(text)
            prompts.append(text)
    if not prompts:
        raise PromptSourceError(f"prompts.source {source}: no non-empty prompts")
    counts = {"source_rows": len(raw), "empty_dropped": empty, "duplicates_dropped": len(raw) - empty - len(prompts)}
    return PromptSelection(prompts, counts)


def dataset_responses(cfg: PromptsConfig, iteration: int) -> dict[str, list[str]]:
    """prompt -> the source's own responses to it (prompts.response_column), for hybrid
    candidates; {} when no response column is configured. Each cell holds a string, a list of
    strings, or a list of records with a "response" (UltraFeedback's `completions`); empty
    responses are dropped."""
    if cfg.response_column is None:
        return {}
    source = cfg.source.replace(ITERATION_MARK, str(iteration))
    split = cfg.split.replace(ITERATION_MARK, str(iteration))
    if source.startswith(BUILTIN_PREFIX):
        raise PromptSourceError(f"prompts.response_column: the built-in prompt set {source!r} holds no responses")
    prompts = _read_column(source, split, cfg.column)
    cells = _read_column(source, split, cfg.response_column, "prompts.response_column")
    found: dict[str, list[str]] = {}
    for row, (prompt, cell) in enumerate(zip(prompts, cells)):
        texts = [] if cell is None else [cell] if isinstance(cell, str) else cell
        if isinstance(texts, list):  # UltraFeedback's completions: {"model": ..., "response": ...} records
            texts = [t["response"] if isinstance(t, dict) and "response" in t else t for t in texts]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise PromptSourceError(
                f"prompts.source {source}: column {cfg.response_column!r} (prompts.response_column), "
                f"row {row}: expected a string, a list of strings or of records with a 'response', "
                f"got {type(cell).__name__}"
            )
        if isinstance(prompt, str):
            found.setdefault(prompt, []).extend(t for t in texts if t.strip())
    return found


def _read_column(source: str, split: str, column: str, setting: str = "prompts.column") -> list:
    if source.startswith(HUB_PREFIX):
        import datasets

        try:
            loaded = datasets.load_dataset(source[len(HUB_PREFIX):], split=split)
        except Exception as err:  # datasets raises many kinds: offline, no such repo or split, ...
            raise PromptSourceError(f"prompts.source {source}: cannot load split {split!r} (prompts.split): "
                                    f"{type(err).__name__}: {err}") from err
        return _dataset_column(loaded, source, column, setting)
    path = Path(source)
    if not path.exists():
        raise PromptSourceError(f"prompts.source: {path} does not exist")
    if path.is_dir():
        import datasets

        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as err:  # not a saved dataset, or a damaged one
            raise PromptSourceError(f"prompts.source {path}: not a readable saved-dataset directory "
                                    f"(datasets.save_to_disk): {type(err).__name__}: {err}") from err
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise PromptSourceError(
                    f"prompts.source {path}: no split {split!r} (prompts.split); it has {sorted(loaded)}"
                )
            loaded = loaded[split]
        return _dataset_column(loaded, source, column, setting)
    if path.suffix == ".jsonl":
        rows = _read_jsonl(path)
        if rows and column not in rows[0]:
            raise PromptSourceError(f"prompts.source {path}: no column {column!r} ({setting})")
        return [row.get(column) for row in rows]
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as err:
            raise PromptSourceError(f"prompts.source {path}: not a readable parquet file: {err}") from err
        if column not in table.column_names:
            raise PromptSourceError(f"prompts.source {path}: no column {column!r} ({setting})")
        return table.column(column).to_pylist()
    raise PromptSourceError(
        f"prompts.source {path}: unsupported (use .jsonl, .parquet, a saved-dataset directory or hf:<repo>)"
    )


def _read_jsonl(path: Path) -> list[dict]:
    """One JSON object per non-empty line; a bad line is named by its number."""
    rows = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise PromptSourceError(f"prompts.source {path}: cannot read: {err}") from err
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptSourceError(f"prompts.source {path}, line {number}: not valid JSON ({err.msg})") from err
        if not isinstance(row, dict):
            raise PromptSourceError(f"prompts.source {path}, line {number}: expected a JSON object, "
                                    f"got a {type(row).__name__}")
        rows.append(row)
    return rows


def _dataset_column(dataset, source: str, column: str, setting: str) -> list:
    if column not in dataset.column_names:
        raise PromptSourceError(
            f"prompts.source {source}: no column {column!r} ({setting}); it has {dataset.column_names}"
        )
    return dataset[column]


def split_prompts(prompts: list[str], num_splits: int, seed: int) -> list[list[str]]:
    """Cut prompts into `num_splits` disjoint parts of near-equal size that cover them all."""
    if num_splits < 1:
        raise ValueError("num_splits must be >= 1")
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    return [[prompts[i] for i in order[part::num_splits]] for part in range(num_splits)]


def _ready_splits(cfg: PromptsConfig) -> bool:
    return ITERATION_MARK in cfg.source or ITERATION_MARK in cfg.split


def _seeded_sample(prompts: list[str], size: int, seed: int) -> list[str]:
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    return [prompts[i] for i in order[:size]]


def heldout_prompts(cfg: PromptsConfig, too_long=None) -> list[str]:
    """Evaluation prompts: never part of any iteration's training prompts. With `too_long`, those
    it rejects are left out, as they are from training."""
    if not _ready_splits(cfg):
        chosen = _seeded_sample(load_prompts(cfg), cfg.eval_size, cfg.seed)
    elif cfg.eval_split is None:
        chosen = []
    else:
        chosen = load_prompts(cfg, iteration=1, split=cfg.eval_split)
        if cfg.eval_size:
            chosen = _seeded_sample(chosen, cfg.eval_size, cfg.seed)
    if too_long is None or not chosen:
        return chosen
    fitting = [p for p in chosen if not too_long(p)]
    if not fitting:
        raise PromptSourceError(f"prompts: all {len(chosen)} held-out prompts (prompts.eval_size / eval_split) are "
                                "longer than train.max_prompt_length tokens")
    return fitting


def iteration_prompts(cfg: PromptsConfig, iteration: int, too_long=None) -> PromptSelection:
    """The prompts of 1-based `iteration`: its own split minus held-out prompts and those that
    `too_long(prompt)` rejects, capped at `per_iteration`; with the counts of each step."""
    heldout = set(heldout_prompts(cfg))
    if _ready_splits(cfg):
        loaded = _load(cfg, iteration)
        split, counts = loaded.prompts, loaded.counts
    else:
        if not 1 <= iteration <= cfg.num_splits:
            raise ValueError(f"iteration {iteration} has no split (prompts.num_splits={cfg.num_splits})")
        loaded = _load(cfg)
        pool = [p for p in loaded.prompts if p not in heldout]
        split, counts = split_prompts(pool, cfg.num_splits, cfg.seed)[iteration - 1], dict(loaded.counts)
    kept = [p for p in split if p not in heldout]
    counts["heldout_dropped"] = len(split) - len(kept)
    if too_long is not None:
        fitting = [p for p in kept if not too_long(p)]
        counts["too_long_dropped"] = len(kept) - len(fitting)
        if kept and not fitting:  # none left before the length filter: `PromptSelection.shortage` says why
            raise PromptSourceError(
                f"prompts.source {cfg.source}: all {len(kept)} prompts of iteration {iteration} are longer "
                "than train.max_prompt_length tokens"
            )
        kept = fitting
    selected = kept[: cfg.per_iteration] if cfg.per_iteration else kept
    counts["selected"] = len(selected)
    counts["heldout"] = len(heldout)
    return PromptSelection(selected, counts, len(split), None if _ready_splits(cfg) else cfg.num_splits)


def prompt_length_filter(tokenizer, max_prompt_length: int):
    """A predicate: is the prompt, rendered with the chat template, over max_prompt_length tokens?"""
    from sppo.chat import render_prompt_ids

    return lambda prompt: len(render_prompt_ids(tokenizer, [prompt])[0]) > max_prompt_length
