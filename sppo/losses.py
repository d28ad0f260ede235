"""Preference losses on sequence log-probabilities (pure torch).

Every loss maps per-pair sequence log-probs under the policy and the reference, plus the
judge's win-probability estimates, to a per-pair loss of shape [B]; `LOSSES` names them
for `train.loss` (docs/losses.md compares them).

All losses take the same keyword-only arguments, so the trainer calls them uniformly;
each uses what it needs and ignores the rest:

- policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps [B]:
  summed response log-probs; a_w = policy_chosen - ref_chosen, a_l likewise.
- chosen_probs [B]: P[w][l], the judge's probability that chosen beats rejected.
- chosen_probs_win, chosen_probs_lose [B]: mean_j P[w][j] and mean_j P[l][j], estimates of
  P(y_w beats pi_t) and P(y_l beats pi_t).
- beta: 1 / eta.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
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


def _logratios(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor
) -> tuple[Tensor, Tensor]:
    """(a_w, a_l): log pi_theta(y|x) - log pi_ref(y|x) of the chosen and the rejected response."""
    return policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps


def sppo_loss(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_probs: Tensor,
    chosen_probs_win: Tensor,
    chosen_probs_lose: Tensor,
    beta: float,
) -> Tensor:
    """SPPO (soft probabilities), the reference pipeline's loss.

    1/2 [ (a_w - (1/beta)(chosen_probs_win - 1/2))^2 + (a_l - (1/beta)(chosen_probs_lose - 1/2))^2 ]:
    each log-ratio regresses on (1/beta)(P(y beats pi_t) - 1/2). chosen_probs is unused.
    """
    chosen_logratio, rejected_logratio = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    chosen_target = (chosen_probs_win - 0.5) / beta
    rejected_target = (chosen_probs_lose - 0.5) / beta
    return 0.5 * ((chosen_logratio - chosen_target) ** 2 + (rejected_logratio - rejected_target) ** 2)


def sppo_hard_loss(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_probs: Tensor,
    chosen_probs_win: Tensor,
    chosen_probs_lose: Tensor,
    beta: float,
) -> Tensor:
    """SPPO with hard labels (TRL's `sppo_hard`): P = 1 for the winner, 0 for the loser.

    (a_w - 1/(2 beta))^2 + (a_l + 1/(2 beta))^2, written as TRL and the reference notes write
    it: without `sppo`'s 1/2 factor. It is therefore exactly 2 x `sppo` at
    chosen_probs_win = 1, chosen_probs_lose = 0 (same minimiser, twice the gradient).
    No judge probability is used.
    """
    chosen_logratio, rejected_logratio = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    target = 0.5 / beta
    return (chosen_logratio - target) ** 2 + (rejected_logratio + target) ** 2


def sppo_single_loss(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_probs: Tensor,
    chosen_probs_win: Tensor,
    chosen_probs_lose: Tensor,
    beta: float,
) -> Tensor:
    """SPPO on the single pairwise probability p = P[w][l] (the reference's `sppo_single`).

    1/2 [ (a_w - (1/beta)(p - 1/2))^2 + (a_l + (1/beta)(p - 1/2))^2 ], the same 1/2 [ ... ]
    form as `sppo`: it equals `sppo` with chosen_probs_win = p and chosen_probs_lose = 1 - p
    (each response's win probability against the other one alone).
    """
    chosen_logratio, rejected_logratio = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    target = (chosen_probs - 0.5) / beta
    return 0.5 * ((chosen_logratio - target) ** 2 + (rejected_logratio + target) ** 2)


def dpo_loss(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_probs: Tensor,
    chosen_probs_win: Tensor,
    chosen_probs_lose: Tensor,
    beta: float,
) -> Tensor:
    """DPO, sigmoid form: -log sigmoid(beta (a_w - a_l)). Uses no judge probability.

    logsigmoid is stable for margins of any size and sign (no exp overflow).
    """
    chosen_logratio, rejected_logratio = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return -F.logsigmoid(beta * (chosen_logratio - rejected_logratio))


def ipo_loss(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_probs: Tensor,
    chosen_probs_win: Tensor,
    chosen_probs_lose: Tensor,
    beta: float,
) -> Tensor:
    """IPO: (a_w - a_l - 1/(2 beta))^2, beta being IPO's regulariser tau. Uses no judge probability.

    On summed response log-probs, like every loss here (TRL's `ipo` averages them per token).
    """
    chosen_logratio, rejected_logratio = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return (chosen_logratio - rejected_logratio - 0.5 / beta) ** 2


PairLoss = Callable[..., Tensor]

# train.loss -> loss; every entry takes the same keyword-only arguments (see the module docstring).
LOSSES: dict[str, PairLoss] = {
    "sppo": sppo_loss,
    "sppo_hard": sppo_hard_loss,
    "sppo_single": sppo_single_loss,
    "dpo": dpo_loss,
    "ipo": ipo_loss,
}


def get_loss(name: str) -> PairLoss:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"train.loss: unknown loss {name!r}; known: {sorted(LOSSES)}") from None
