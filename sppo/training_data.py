"""Training data, the pure core: the pairs file read and checked, rows tokenized as sampling saw
them, batches collated, and the order in which each rank takes its rows. No Ray, no DeepSpeed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sppo.chat import render_prompt_ids
from sppo.config import TrainConfig

PAIR_COLUMNS = ("prompt", "chosen", "rejected", "chosen_probs", "chosen_probs_win", "chosen_probs_lose")
PROB_COLUMNS = ("chosen_probs", "chosen_probs_win", "chosen_probs_lose")
# train.reference_logps "sampler": each response's sampled token ids and log pi_t of each.
TOKEN_COLUMNS = ("chosen_token_ids", "chosen_token_logps", "rejected_token_ids", "rejected_token_logps")


def read_pairs(path: str | os.PathLike, sampled_tokens: bool = False) -> list[dict[str, Any]]:
    """Rows of a pairs.parquet file, checked: all columns present, probabilities in [0, 1];
    with sampled_tokens also the TOKEN_COLUMNS, one finite log-prob per token id."""
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"pairs file {path}: cannot read as parquet ({err})") from err
    columns = PAIR_COLUMNS + (TOKEN_COLUMNS if sampled_tokens else ())
    missing = [c for c in columns if c not in frame.columns]
    if missing and sampled_tokens and set(missing) <= set(TOKEN_COLUMNS):
        raise ValueError(f"pairs file {path}: missing columns {missing}, which train.reference_logps "
                         "'sampler' reads (the sampling stage writes them only in that mode)")
    if missing:
        raise ValueError(f"pairs file {path}: missing columns {missing}; has {list(frame.columns)}")
    if frame.empty:
        raise ValueError(f"pairs file {path}: no rows")
    for column in ("prompt", "chosen", "rejected"):
        bad = frame.index[~frame[column].map(lambda v: isinstance(v, str))]
        if len(bad):
            raise ValueError(f"pairs file {path}: column {column!r} must hold strings (row {bad[0]})")
    for column in PROB_COLUMNS:
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = frame.index[~values.between(0.0, 1.0)]  # NaN is not between
        if len(bad):
            raise ValueError(
                f"pairs file {path}: column {column!r} must be a probability in [0, 1] "
                f"(row {bad[0]}: {frame.loc[bad[0], column]!r})"
            )
    rows = frame[list(columns)].to_dict("records")
    for index, row in enumerate(rows):
        for column in PROB_COLUMNS:
            row[column] = float(row[column])
        for side in ("chosen", "rejected") if sampled_tokens else ():
            ids, logps = (list(row[f"{side}_token_{kind}"]) for kind in ("ids", "logps"))
            if not ids or len(ids) != len(logps) or not all(math.isfinite(v) for v in logps):
                raise ValueError(f"pairs file {path}: row {index}: {side}_token_logps must hold one finite "
                                 f"log-prob per token of {side}_token_ids ({len(logps)} for {len(ids)} tokens)")
            row[f"{side}_token_ids"], row[f"{side}_token_logps"] = [int(t) for t in ids], [float(v) for v in logps]
    return rows


@dataclass(frozen=True)
class EncodedSequence:
    input_ids: list[int]
    prompt_length: int  # tokens before the response; the loss covers the rest


@dataclass(frozen=True)
class EncodedPair:
    chosen: EncodedSequence
    rejected: EncodedSequence


def encode_sequence(
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    *,
    max_length: int,
    max_prompt_length: int,
    bos_token_id: int | None,
) -> EncodedSequence:
    """Prompt + response ids, cut to fit.

    A long prompt keeps its BOS and its end (the latest turn and the generation tag, which
    condition the response); a long response keeps its beginning, so a cut response has
    no EOS, as it should.
    """
    prompt = list(prompt_ids)
    if len(prompt) > max_prompt_length:
        head = prompt[:1] if bos_token_id is not None and prompt[0] == bos_token_id else []
        prompt = head + prompt[len(prompt) - (max_prompt_length - len(head)) :]
    response = list(response_ids)[: max_length - len(prompt)]
    return EncodedSequence(input_ids=prompt + response, prompt_length=len(prompt))


def encode_pairs(
    tokenizer, rows: Sequence[dict[str, Any]], *, max_length: int, max_prompt_length: int,
    sampled_tokens: bool = False,
) -> list[EncodedPair]:
    """Tokenize rows exactly as sampling saw them: chat-template prompt, response + EOS.

    With sampled_tokens the responses are the rows' {chosen,rejected}_token_ids as sampled (an
    EOS only where sampling stopped on one), and a prompt longer than max_prompt_length is an
    error: the sampler's log-probs were conditioned on the whole of it."""
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token_id: responses cannot be terminated")
    prompt_ids = render_prompt_ids(tokenizer, [row["prompt"] for row in rows])
    if sampled_tokens:
        response_ids = [row["chosen_token_ids"] for row in rows] + [row["rejected_token_ids"] for row in rows]
        eos = []
        if too_long := [i for i, ids in enumerate(prompt_ids) if len(ids) > max_prompt_length]:
            raise ValueError(f"row {too_long[0]}: the prompt has {len(prompt_ids[too_long[0]])} tokens, more "
                             f"than train.max_prompt_length ({max_prompt_length}); reference_logps 'sampler' "
                             "cannot cut it (its log-probs were conditioned on the whole prompt)")
    else:
        responses = [row["chosen"] for row in rows] + [row["rejected"] for row in rows]
        response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
        eos = [tokenizer.eos_token_id]

    def encode(prompt: list[int], response: list[int]) -> EncodedSequence:
        return encode_sequence(
            prompt,
            list(response) + eos,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            bos_token_id=tokenizer.bos_token_id,
        )

    chosen_ids, rejected_ids = response_ids[: len(rows)], response_ids[len(rows) :]
    return [
        EncodedPair(chosen=encode(prompt, chosen), rejected=encode(prompt, rejected))
        for prompt, chosen, rejected in zip(prompt_ids, chosen_ids, rejected_ids)
    ]


def collate_pairs(pairs: Sequence[EncodedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of 2B sequences: the B chosen first, then the B rejected."""
    sequences = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    width = max(len(s.input_ids) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    loss_mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for i, seq in enumerate(sequences):
        length = len(seq.input_ids)
        input_ids[i, :length] = torch.tensor(seq.input_ids)
        attention_mask[i, :length] = 1
        loss_mask[i, seq.prompt_length : length] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def steps_per_epoch(num_rows: int, cfg: TrainConfig) -> int:
    """Optimizer steps per epoch; the rows past the last full global batch are left out."""
    steps = num_rows // cfg.global_batch_size
    if steps == 0:
        raise ValueError(
            f"{num_rows} pairs are fewer than one global batch of {cfg.global_batch_size} "
            f"(train.per_device_batch_size x train.gradient_accumulation_steps x train.num_workers)"
        )
    return steps


def total_steps(num_rows: int, cfg: TrainConfig) -> int:
    """Optimizer steps of the whole training: train.epochs epochs, cut at train.max_steps."""
    steps = steps_per_epoch(num_rows, cfg) * cfg.epochs
    return steps if cfg.max_steps is None else min(steps, cfg.max_steps)


def epoch_rows(
    num_rows: int, *, epoch: int, seed: int, rank: int, world_size: int, rows_per_rank: int
) -> list[int]:
    """This rank's row indices for one epoch, in order.

    One seeded permutation per epoch; rank r takes every world_size-th index starting at r,
    so optimizer step s trains on the permutation's s-th global batch across all ranks.
    """
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(num_rows, generator=generator)
    mine = order[rank::world_size][:rows_per_rank]
    return mine.tolist()


def reference_chunk(num_rows: int, *, rank: int, world_size: int) -> list[int]:
    """Rows whose reference log-probs this rank computes: a contiguous chunk, padded with row 0.

    Every chunk has the same length because ZeRO-3 forwards are collective: all ranks must
    run the same number of them. Concatenating the chunks by rank and keeping the first
    num_rows entries restores file order.
    """
    size = math.ceil(num_rows / world_size)
    rows = list(range(rank * size, min(num_rows, (rank + 1) * size)))
    return rows + [0] * (size - len(rows))

