"""Preference losses on sequence log-probabilities (pure torch).

Every loss maps per-pair sequence log-probs under the policy and the reference, plus the
judge's win-probability estimates, to a per-pair loss of shape [B]; `LOSSES` names them
for `train.loss`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def sequence_logps(logits: Tensor, labels: Tensor, loss_mask: Tensor) -> Tensor:
    """Sum of log p(labels[t] | labels[:t]) over positions where loss_mask[t] is set.

    logits [B, T, V] come from a forward pass over labels [B, T]; position t-1 predicts
    token t, so the mask of position 0 is never used. Returns float32 [B].
    """
    if logits.shape[:2] != labels.shape or labels.shape != loss_mask.shape:
        raise ValueError(
            f"shape mismatch: logits {tuple(logits.shape)}, labels {tuple(labels.shape)}, "
            f"loss_mask {tuple(loss_mask.shape)}"
        )
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = loss_mask[:, 1:].bool()
    # Masked positions may hold pad ids or -100; any valid index works since they are zeroed.
    safe_targets = torch.where(mask, targets, torch.zeros_like(targets)).unsqueeze(-1)
    token_logps = logits.gather(-1, safe_targets).squeeze(-1) - logits.logsumexp(-1)
    return (token_logps * mask).sum(-1)


def sppo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_probs_win: Tensor,
    chosen_probs_lose: Tensor,
    beta: float,
) -> Tensor:
    """SPPO (soft probabilities): squared distance of each log-ratio to (1/beta)(P(y beats pi_t) - 1/2)."""
    chosen_logratio = policy_chosen_logps - ref_chosen_logps
    rejected_logratio = policy_rejected_logps - ref_rejected_logps
    chosen_target = (chosen_probs_win - 0.5) / beta
    rejected_target = (chosen_probs_lose - 0.5) / beta
    return 0.5 * ((chosen_logratio - chosen_target) ** 2 + (rejected_logratio - rejected_target) ** 2)


PairLoss = Callable[..., Tensor]

# train.loss -> loss; every entry takes sppo_loss's keyword arguments.
LOSSES: dict[str, PairLoss] = {"sppo": sppo_loss}


def get_loss(name: str) -> PairLoss:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"train.loss: unknown loss {name!r}; known: {sorted(LOSSES)}") from None
