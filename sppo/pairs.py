"""From a prompt's K x K win-probability matrix to one SPPO training row.

P[i][j] estimates P(candidate i beats candidate j), with 0.5 on the diagonal.
mean_j P[i][j] (diagonal included, as the reference computes it) estimates
P(y_i beats pi_t): candidate i against a fresh sample from the current policy.

The pair is the highest- and the lowest-mean candidate. For a reward-model judge,
P[i][j] = sigmoid(r_i - r_j) and the row mean rises with r_i, so this is the max- vs
min-reward pair of the DPO-style recipes. Hybrid candidates (the dataset's own responses,
`hybrid_candidates`) are marked off-policy, and so are the chosen and rejected they become.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Pair:
    chosen: int
    rejected: int
    chosen_probs: float  # P[w][l]
    chosen_probs_win: float  # mean_j P[w][j] ~ P(y_w beats pi_t)
    chosen_probs_lose: float  # mean_j P[l][j] ~ P(y_l beats pi_t)


def select_pair(win_matrix: np.ndarray) -> Pair:
    """Chosen = highest mean win probability, rejected = lowest.

    Ties go to the lowest candidate index for both, so the choice is deterministic; when
    every candidate ties, rejected is the last index so that chosen != rejected.
    """
    p = np.asarray(win_matrix, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != p.shape[1] or p.shape[0] < 2:
        raise ValueError(f"win matrix must be K x K with K >= 2, got shape {p.shape}")
    mean_win = p.mean(axis=1)
    w = int(np.argmax(mean_win))
    l = int(np.argmin(mean_win))
    if w == l:
        l = p.shape[0] - 1 if w != p.shape[0] - 1 else 0
    return Pair(
        chosen=w,
        rejected=l,
        chosen_probs=float(p[w, l]),
        chosen_probs_win=float(mean_win[w]),
        chosen_probs_lose=float(mean_win[l]),
    )


def hybrid_candidates(
    sampled: list[list[str]], dataset: list[list[str]]
) -> tuple[list[list[str]], list[list[bool]]]:
    """Each prompt's sampled candidates followed by its dataset responses, and per candidate
    whether it is off-policy. A dataset response that is already a sampled candidate (or
    repeats another one) is left out, so no text is judged twice."""
    if len(sampled) != len(dataset):
        raise ValueError(f"length mismatch: {len(sampled)} sampled lists, {len(dataset)} dataset response lists")
    candidates, off_policy = [], []
    for own, offline in zip(sampled, dataset):
        extra = [r for n, r in enumerate(offline) if r not in own and r not in offline[:n]]
        candidates.append(list(own) + extra)
        off_policy.append([False] * len(own) + [True] * len(extra))
    return candidates, off_policy


def training_rows(
    prompts: list[str],
    candidates: list[list[str]],
    win_matrices: list[np.ndarray],
    off_policy: list[list[bool]] | None = None,
    token_ids: list[list[list[int]]] | None = None,
    token_logps: list[list[list[float]]] | None = None,
) -> list[dict]:
    """One row per prompt in the columns the trainer reads (pairs.parquet), plus whether the
    chosen and the rejected response are off-policy (None: every candidate was sampled).

    With the sampler's token ids and log-probs of every candidate (`Samples.token_ids`,
    `Samples.token_logps`), the rows also carry the chosen and the rejected one's:
    {chosen,rejected}_token_ids and {chosen,rejected}_token_logps."""
    off_policy = off_policy if off_policy is not None else [[False] * len(c) for c in candidates]
    if (token_ids is None) != (token_logps is None):
        raise ValueError("token_ids and token_logps go together: give both or neither")
    tokens = list(zip(token_ids, token_logps)) if token_ids is not None else [None] * len(candidates)
    if not len(prompts) == len(candidates) == len(win_matrices) == len(off_policy) == len(tokens):
        raise ValueError(
            f"length mismatch: {len(prompts)} prompts, {len(candidates)} candidate lists, "
            f"{len(win_matrices)} win matrices, {len(off_policy)} off-policy flag lists, "
            f"{len(tokens)} token lists"
        )
    rows = []
    for prompt, cands, matrix, flags, sampled in zip(prompts, candidates, win_matrices, off_policy, tokens):
        if not len(cands) == len(matrix) == len(flags):
            raise ValueError(
                f"prompt {prompt[:60]!r}: {len(cands)} candidates, a {len(matrix)} x {len(matrix)} win "
                f"matrix and {len(flags)} off-policy flags"
            )
        if sampled is not None and not len(cands) == len(sampled[0]) == len(sampled[1]):
            raise ValueError(
                f"prompt {prompt[:60]!r}: {len(cands)} candidates but token ids of {len(sampled[0])} "
                f"and token log-probs of {len(sampled[1])}"
            )
        pair = select_pair(matrix)
        row = {
            "prompt": prompt,
            "chosen": cands[pair.chosen],
            "rejected": cands[pair.rejected],
            "chosen_probs": pair.chosen_probs,
            "chosen_probs_win": pair.chosen_probs_win,
            "chosen_probs_lose": pair.chosen_probs_lose,
            "chosen_off_policy": bool(flags[pair.chosen]),
            "rejected_off_policy": bool(flags[pair.rejected]),
        }
        if sampled is not None:
            ids, logps = sampled
            for side, index in (("chosen", pair.chosen), ("rejected", pair.rejected)):
                row[f"{side}_token_ids"] = [int(t) for t in ids[index]]
                row[f"{side}_token_logps"] = [float(v) for v in logps[index]]
        rows.append(row)
    return rows
