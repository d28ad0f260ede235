"""Preference losses on sequence log-probabilities (pure torch).

Every loss maps a `PairBatch` (per-pair sequence log-probs under the policy and the
reference, the judge's win-probability estimates, response lengths and, for WPO, the pair
weights) and `LossParams` (beta, gamma) to a per-pair loss of shape [B]; `LOSSES` names them
for `train.loss` (docs/losses.md compares them). Each loss uses the fields it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class PairBatch:
    """The per-pair inputs of a preference loss, each of shape [B]."""

    # Summed response log-probs; a_w = policy_chosen - ref_chosen, a_l likewise.
    policy_chosen_logps: Tensor
    policy_rejected_logps: Tensor
    ref_chosen_logps: Tensor
    ref_rejected_logps: Tensor
    # P[w][l], the judge's probability that chosen beats rejected.
    chosen_probs: Tensor
    # mean_j P[w][j] and mean_j P[l][j], estimates of P(y_w beats pi_t) and P(y_l beats pi_t).
    chosen_probs_win: Tensor
    chosen_probs_lose: Tensor
    # Response tokens |y_w|, |y_l| (SimPO's length normalisation).
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    # WPO's pair weights under the current policy (`wpo_pair_weights`), detached; only `wpo` needs them.
    wpo_weights: Tensor | None = None


@dataclass(frozen=True)
class LossParams:
    beta: float  # 1 / train.eta
    gamma: float = 0.0  # SimPO's target reward margin (train.simpo_gamma)


class _NextTokenLogProbs(torch.autograd.Function):
    """log_softmax(logits[:, t].float())[targets[:, t]] for t < T - 1, float32 [B, T-1], from
    [B, T, V] logits of any float dtype: one sequence at a time in float32, keeping only the
    logits and [B, T-1] log-normalisers for backward, which writes the gradient straight into
    one tensor the logits' size. The plain `logits[:, :-1].float()` then `logsumexp` holds a
    float32 copy of the whole tensor for backward and makes more in it: at Gemma-2's 256k
    vocabulary, 16 sequences of 1,024 tokens, 17 GB each against 8.4 GB of bf16 logits."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        predicting = logits[:, :-1]  # the last position predicts nothing
        log_norm = torch.stack([row.float().logsumexp(-1) for row in predicting])
        ctx.save_for_backward(logits, targets, log_norm)
        return predicting.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float() - log_norm

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        logits, targets, log_norm = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        grad_logits[:, -1] = 0
        for row, target, norm, g, out in zip(logits[:, :-1], targets, log_norm, grad, grad_logits[:, :-1]):
            # d/dx [x_target - logsumexp(x)] = onehot(target) - softmax(x)
            row_grad = (row.float() - norm.unsqueeze(-1)).exp_().mul_(-g.unsqueeze(-1))
            out.copy_(row_grad.scatter_add_(-1, target.unsqueeze(-1), g.unsqueeze(-1)))
        return grad_logits, None


def _token_logps(logits: Tensor, labels: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """log p(labels[t] | labels[:t]) for t >= 1 as float32 [B, T-1], and the mask of the
    positions that count (loss_mask[:, 1:]). Position t-1's logits predict token t."""
    if logits.shape[:2] != labels.shape or labels.shape != loss_mask.shape:
        raise ValueError(
            f"shape mismatch: logits {tuple(logits.shape)}, labels {tuple(labels.shape)}, "
            f"loss_mask {tuple(loss_mask.shape)}"
        )
    targets = labels[:, 1:]
    mask = loss_mask[:, 1:].bool()
    # Masked positions may hold pad ids or -100; any valid index works since they are zeroed.
    safe_targets = torch.where(mask, targets, torch.zeros_like(targets))
    return _NextTokenLogProbs.apply(logits, safe_targets), mask


def sequence_logps(logits: Tensor, labels: Tensor, loss_mask: Tensor) -> Tensor:
    """Sum of log p(labels[t] | labels[:t]) over positions where loss_mask[t] is set.

    logits [B, T, V] come from a forward pass over labels [B, T]; position t-1 predicts
    token t, so the mask of position 0 is never used. Returns float32 [B].
    """
    token_logps, mask = _token_logps(logits, labels, loss_mask)
    return (token_logps * mask).sum(-1)


def response_lengths(loss_mask: Tensor) -> Tensor:
    """Tokens that `sequence_logps` sums over, per sequence, as float32 [B]."""
    return loss_mask[:, 1:].bool().sum(-1).float()


@torch.no_grad()
def sequence_wpo_logweights(logits: Tensor, labels: Tensor, loss_mask: Tensor) -> Tensor:
    """WPO's log-weight of each sequence under the current policy, float32 [B], no gradient.

    (1/|y|) sum_t [log p(y_t | x, y_<t) - log sum_v p(v | x, y_<t)^2]: the length-normalised
    log-probability with WPO's sampled alignment, which divides each token's probability by
    its expected value under the policy, sum_v p(v)^2. An on-policy sample thus scores 0
    in expectation, and off-policy text that the policy finds unlikely scores below 0.
    """
    token_logps, mask = _token_logps(logits, labels, loss_mask)
    log_expected = torch.stack([_log_sum_squared_probs(row) for row in logits[:, :-1]])
    return ((token_logps - log_expected) * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def _log_sum_squared_probs(logits: Tensor) -> Tensor:
    """log sum_v p(v)^2 = logsumexp(2x) - 2 logsumexp(x) of [T, V] logits, as float32 [T]: one
    sequence's float32 copy at a time, as `_NextTokenLogProbs` does, never the batch's
    (a full float32 log_softmax is 8 GB at Gemma-2's 256k vocabulary and 2,048 tokens)."""
    shifted = logits.float() - logits.amax(-1, keepdim=True).float()  # a new tensor, even from float32
    log_norm = shifted.logsumexp(-1)
    return shifted.mul_(2.0).logsumexp(-1) - 2.0 * log_norm


def wpo_pair_weights(chosen_logweights: Tensor, rejected_logweights: Tensor) -> Tensor:
    """WPO's pair weight w(x, y_w) w(x, y_l) = exp(sum of the log-weights), capped at 1 as the
    WPO authors' code caps it, so no pair weighs more than in DPO."""
    return torch.exp(chosen_logweights + rejected_logweights).clamp(max=1.0).detach()


def _logratios(b: PairBatch) -> tuple[Tensor, Tensor]:
    """(a_w, a_l): log pi_theta(y|x) - log pi_ref(y|x) of the chosen and the rejected response."""
    return b.policy_chosen_logps - b.ref_chosen_logps, b.policy_rejected_logps - b.ref_rejected_logps


def sppo_loss(b: PairBatch, params: LossParams) -> Tensor:
    """SPPO (soft probabilities), the reference pipeline's loss.

    1/2 [ (a_w - (1/beta)(chosen_probs_win - 1/2))^2 + (a_l - (1/beta)(chosen_probs_lose - 1/2))^2 ]:
    each log-ratio regresses on (1/beta)(P(y beats pi_t) - 1/2). chosen_probs is unused.
    """
    chosen_logratio, rejected_logratio = _logratios(b)
    chosen_target = (b.chosen_probs_win - 0.5) / params.beta
    rejected_target = (b.chosen_probs_lose - 0.5) / params.beta
    return 0.5 * ((chosen_logratio - chosen_target) ** 2 + (rejected_logratio - rejected_target) ** 2)


def sppo_hard_loss(b: PairBatch, params: LossParams) -> Tensor:
    """SPPO with hard labels (TRL's `sppo_hard`): P = 1 for the winner, 0 for the loser.

    (a_w - 1/(2 beta))^2 + (a_l + 1/(2 beta))^2, written as TRL and the reference notes write
    it: without `sppo`'s 1/2 factor. It is therefore exactly 2 x `sppo` at
    chosen_probs_win = 1, chosen_probs_lose = 0 (same minimiser, twice the gradient).
    No judge probability is used.
    """
    chosen_logratio, rejected_logratio = _logratios(b)
    target = 0.5 / params.beta
    return (chosen_logratio - target) ** 2 + (rejected_logratio + target) ** 2


def sppo_single_loss(b: PairBatch, params: LossParams) -> Tensor:
    """SPPO on the single pairwise probability p = P[w][l] (the reference's `sppo_single`).

    1/2 [ (a_w - (1/beta)(p - 1/2))^2 + (a_l + (1/beta)(p - 1/2))^2 ], the same 1/2 [ ... ]
    form as `sppo`: it equals `sppo` with chosen_probs_win = p and chosen_probs_lose = 1 - p
    (each response's win probability against the other one alone).
    """
    chosen_logratio, rejected_logratio = _logratios(b)
    target = (b.chosen_probs - 0.5) / params.beta
    return 0.5 * ((chosen_logratio - target) ** 2 + (rejected_logratio + target) ** 2)


def dpo_loss(b: PairBatch, params: LossParams) -> Tensor:
    """DPO, sigmoid form: -log sigmoid(beta (a_w - a_l)). Uses no judge probability.

    logsigmoid is stable for margins of any size and sign (no exp overflow).
    """
    chosen_logratio, rejected_logratio = _logratios(b)
    return -F.logsigmoid(params.beta * (chosen_logratio - rejected_logratio))


def ipo_loss(b: PairBatch, params: LossParams) -> Tensor:
    """IPO: (a_w - a_l - 1/(2 beta))^2, beta being IPO's regulariser tau. Uses no judge probability.

    On summed response log-probs, like every loss here (TRL's `ipo` averages them per token).
    """
    chosen_logratio, rejected_logratio = _logratios(b)
    return (chosen_logratio - rejected_logratio - 0.5 / params.beta) ** 2


def simpo_loss(b: PairBatch, params: LossParams) -> Tensor:
    """SimPO: -log sigmoid(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma).

    Reference-free (the reward is the policy's own length-normalised log-probability, so the
    reference log-probs are unused), with a target margin gamma. Uses no judge probability.
    """
    chosen_reward = params.beta * b.policy_chosen_logps / b.chosen_lengths
    rejected_reward = params.beta * b.policy_rejected_logps / b.rejected_lengths
    return -F.logsigmoid(chosen_reward - rejected_reward - params.gamma)


def wpo_loss(b: PairBatch, params: LossParams) -> Tensor:
    """WPO on DPO: the `dpo` loss of each pair times its weight under the current policy
    (`wpo_pair_weights`, detached). Uses no judge probability."""
    if b.wpo_weights is None:
        raise ValueError("train.loss 'wpo': the pair batch carries no wpo_weights (see wpo_pair_weights)")
    return b.wpo_weights * dpo_loss(b, params)


PairLoss = Callable[[PairBatch, LossParams], Tensor]

# train.loss -> loss.
LOSSES: dict[str, PairLoss] = {
    "sppo": sppo_loss,
    "sppo_hard": sppo_hard_loss,
    "sppo_single": sppo_single_loss,
    "dpo": dpo_loss,
    "ipo": ipo_loss,
    "simpo": simpo_loss,
    "wpo": wpo_loss,
}


def get_loss(name: str) -> PairLoss:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"train.loss: unknown loss {name!r}; known: {sorted(LOSSES)}") from None
