"""Preference losses and sequence log-probs: hand-computed values, masking, gradients, minimisers."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest
import torch

from bench.train import plain_sequence_logps
from sppo.config import TrainConfig
from sppo.losses import (
    LOSSES,
    LossParams,
    PairBatch,
    dpo_loss,
    get_loss,
    ipo_loss,
    response_lengths,
    sequence_logps,
    sequence_wpo_logweights,
    simpo_loss,
    sppo_hard_loss,
    sppo_loss,
    sppo_single_loss,
    wpo_loss,
    wpo_pair_weights,
)


def test_sequence_logps_hand_computed():
    # V = 2, T = 3, labels [0, 1, 0], response = positions 1 and 2 (mask [0, 1, 1]).
    # Position 0 predicts label 1 from logits [0, 0]: log(1/2).
    # Position 1 predicts label 0 from logits [log 3, 0]: softmax [3/4, 1/4], log(3/4).
    # Position 2's logits predict nothing (shifted off). Sum: log(1/2) + log(3/4) = log(3/8).
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[0, 1, 0]])
    mask = torch.tensor([[0, 1, 1]])
    out = sequence_logps(logits, labels, mask)
    assert out.shape == (1,)
    assert out.item() == pytest.approx(math.log(3 / 8), abs=1e-6)


def test_sequence_logps_ignores_prompt_and_padding_logits():
    torch.manual_seed(0)
    batch, length, vocab = 3, 7, 11
    logits = torch.randn(batch, length, vocab)
    labels = torch.randint(0, vocab, (batch, length))
    labels[2, 5:] = -100  # padding ids that are not valid indices must not matter either
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[0, 3:] = True
    mask[1, 1:4] = True  # positions 4.. are padding
    mask[2, 2:5] = True
    base = sequence_logps(logits, labels, mask)

    # Logits at position t - 1 predict token t: those feeding unmasked targets are free.
    predicts_response = torch.zeros_like(mask)
    predicts_response[:, :-1] = mask[:, 1:]
    changed = torch.where(predicts_response.unsqueeze(-1), logits, torch.randn_like(logits) * 10)
    torch.testing.assert_close(sequence_logps(changed, labels, mask), base)

    # ...while the response-predicting logits do count.
    bumped = logits.clone()
    bumped[0, 3, labels[0, 4]] += 1.0
    assert sequence_logps(bumped, labels, mask)[0] > base[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sequence_logps_and_gradients_equal_the_plain_float32_computation(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(4, 9, 37) * 4).to(dtype)
    labels = torch.randint(0, 37, (4, 9))
    mask = torch.rand(4, 9) > 0.3
    weights = torch.randn(4)  # a loss that weighs each sequence differently
    results = []
    for compute in (sequence_logps, plain_sequence_logps):
        x = logits.clone().requires_grad_()
        logps = compute(x, labels, mask)
        (logps * weights).sum().backward()
        results.append((logps.detach(), x.grad))
    (ours, our_grad), (plain, plain_grad) = results
    assert ours.dtype == torch.float32 and our_grad.dtype == dtype
    torch.testing.assert_close(ours, plain, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(our_grad, plain_grad, rtol=1e-6, atol=1e-6)


def test_sequence_logps_keep_no_float32_copy_of_the_logits_for_backward():
    # At Gemma-2's 256k vocabulary a float32 copy of a batch's logits is twice their bf16 size
    # (17 GB for 16 sequences of 1,024 tokens): backward must need only the logits themselves.
    logits = torch.randn(2, 16, 4096, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 4096, (2, 16))
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logps = sequence_logps(logits, labels, torch.ones(2, 16, dtype=torch.bool))
    logits_bytes = logits.numel() * logits.element_size()
    assert logits_bytes <= sum(saved.values()) < 1.1 * logits_bytes
    logps.sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad).all()


# Two pairs shared by the hand-computed cases. With beta = 0.5: 1/beta = 2, 1/(2 beta) = 1.
#   a_w = policy_chosen - ref_chosen     = [-1.0 - (-1.5), 2.0 - 0.0]   = [0.5, 2.0]
#   a_l = policy_rejected - ref_rejected = [-2.0 - (-1.0), -3.5 - (-3.0)] = [-1.0, -0.5]
#   margin a_w - a_l = [1.5, 2.5]
PAIRS = dict(
    policy_chosen_logps=[-1.0, 2.0],
    policy_rejected_logps=[-2.0, -3.5],
    ref_chosen_logps=[-1.5, 0.0],
    ref_rejected_logps=[-1.0, -3.0],
    chosen_probs=[0.75, 0.9],
    chosen_probs_win=[0.75, 0.9],
    chosen_probs_lose=[0.25, 0.3],
    chosen_lengths=[2.0, 4.0],
    rejected_lengths=[4.0, 7.0],
    wpo_weights=[0.5, 1.0],
)
LOGPS = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
PROBS = ("chosen_probs", "chosen_probs_win", "chosen_probs_lose")
PARAMS = LossParams(beta=0.5, gamma=0.25)


def pairs(dtype=torch.float32, **changes) -> PairBatch:
    return PairBatch(**{k: torch.as_tensor(changes.get(k, v), dtype=dtype) for k, v in PAIRS.items()})


# sppo: targets 2 (win - 1/2) = [0.5, 0.8] for a_w, 2 (lose - 1/2) = [-0.5, -0.4] for a_l.
#   pair 0: 1/2 [(0.5 - 0.5)^2 + (-1.0 + 0.5)^2] = 1/2 (0 + 0.25)    = 0.125
#   pair 1: 1/2 [(2.0 - 0.8)^2 + (-0.5 + 0.4)^2] = 1/2 (1.44 + 0.01) = 0.725
# sppo_hard: targets +1 for a_w, -1 for a_l, no 1/2 factor.
#   pair 0: (0.5 - 1)^2 + (-1.0 + 1)^2 = 0.25 + 0    = 0.25
#   pair 1: (2.0 - 1)^2 + (-0.5 + 1)^2 = 1 + 0.25    = 1.25
# sppo_single: p = chosen_probs = [0.75, 0.9], target t = 2 (p - 1/2) = [0.5, 0.8]; +t for a_w, -t for a_l.
#   pair 0: 1/2 [(0.5 - 0.5)^2 + (-1.0 + 0.5)^2] = 1/2 (0 + 0.25)    = 0.125
#   pair 1: 1/2 [(2.0 - 0.8)^2 + (-0.5 + 0.8)^2] = 1/2 (1.44 + 0.09) = 0.765
# ipo: (margin - 1)^2 = [(1.5 - 1)^2, (2.5 - 1)^2] = [0.25, 2.25]
# dpo: -log sigmoid(0.5 margin) = log(1 + exp(-0.5 margin)) = [log(1 + e^-0.75), log(1 + e^-1.25)]
# simpo (reference-free): r = beta log pi(y) / |y|, loss = log(1 + exp(-(r_w - r_l - gamma))), gamma = 0.25.
#   pair 0: r_w = 0.5 (-1.0 / 2) = -0.25, r_l = 0.5 (-2.0 / 4) = -0.25 -> r_w - r_l - gamma = -0.25
#   pair 1: r_w = 0.5 (2.0 / 4) = 0.25,   r_l = 0.5 (-3.5 / 7) = -0.25 -> r_w - r_l - gamma = 0.25
# wpo: weights [0.5, 1.0] x dpo.
HAND_COMPUTED = {
    "sppo": [0.125, 0.725],
    "sppo_hard": [0.25, 1.25],
    "sppo_single": [0.125, 0.765],
    "ipo": [0.25, 2.25],
    "dpo": [math.log1p(math.exp(-0.75)), math.log1p(math.exp(-1.25))],
    "simpo": [math.log1p(math.exp(0.25)), math.log1p(math.exp(-0.25))],
    "wpo": [0.5 * math.log1p(math.exp(-0.75)), math.log1p(math.exp(-1.25))],
}


def test_every_loss_is_hand_computed():
    assert set(HAND_COMPUTED) == set(LOSSES)


@pytest.mark.parametrize("name", sorted(HAND_COMPUTED))
def test_loss_hand_computed(name):
    loss = get_loss(name)(pairs(), PARAMS)
    assert loss.shape == (2,)
    torch.testing.assert_close(loss, torch.tensor(HAND_COMPUTED[name]))


def test_dpo_hand_computed_round_margins():
    # beta = 0.5, a_l = 0, a_w = margin = [0, 2 ln 3, -2 ln 3] -> beta margin = [0, ln 3, -ln 3].
    #   sigmoid(0) = 1/2 -> log 2;  sigmoid(ln 3) = 3/(3 + 1) = 3/4 -> log(4/3);
    #   sigmoid(-ln 3) = 1/4 -> log 4.
    loss = dpo_loss(_margins([0.0, 2 * math.log(3.0), -2 * math.log(3.0)]), LossParams(beta=0.5))
    torch.testing.assert_close(loss, torch.tensor([math.log(2.0), math.log(4 / 3), math.log(4.0)]))


def _margins(margins, dtype=torch.float32, requires_grad=False) -> PairBatch:
    """Pairs with a_w = margin, a_l = 0, every probability 1/2, lengths 1, weights 1."""
    m = torch.tensor(margins, dtype=dtype, requires_grad=requires_grad)
    zeros, halves, ones = torch.zeros_like(m.detach()), torch.full_like(m.detach(), 0.5), torch.ones_like(m.detach())
    return PairBatch(policy_chosen_logps=m, policy_rejected_logps=zeros, ref_chosen_logps=zeros,
                     ref_rejected_logps=zeros, chosen_probs=halves, chosen_probs_win=halves,
                     chosen_probs_lose=halves, chosen_lengths=ones, rejected_lengths=ones, wpo_weights=ones)


def test_sppo_variants_are_sppo_at_their_probabilities():
    # sppo_hard = 2 x sppo at win = 1, lose = 0; sppo_single(p) = sppo at win = p, lose = 1 - p.
    torch.manual_seed(0)
    base = pairs(torch.float64, **{k: torch.randn(2) for k in LOGPS}, chosen_probs=torch.rand(2),
                 chosen_probs_win=torch.rand(2), chosen_probs_lose=torch.rand(2))
    params = LossParams(beta=0.1)
    hard_as_sppo = dataclasses.replace(base, chosen_probs_win=torch.ones(2, dtype=torch.float64),
                                       chosen_probs_lose=torch.zeros(2, dtype=torch.float64))
    single_as_sppo = dataclasses.replace(base, chosen_probs_win=base.chosen_probs,
                                         chosen_probs_lose=1 - base.chosen_probs)
    torch.testing.assert_close(sppo_hard_loss(base, params), 2 * sppo_loss(hard_as_sppo, params))
    torch.testing.assert_close(sppo_single_loss(base, params), sppo_loss(single_as_sppo, params))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_gradcheck(name):
    torch.manual_seed(0)
    logps = [torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in LOGPS]
    # Probabilities away from 0 and 1, like a judge's.
    probs = [(0.05 + 0.9 * torch.rand(4, dtype=torch.float64)).requires_grad_() for _ in PROBS]
    fixed = dict(chosen_lengths=torch.tensor([1.0, 3.0, 8.0, 20.0], dtype=torch.float64),
                 rejected_lengths=torch.tensor([5.0, 2.0, 1.0, 9.0], dtype=torch.float64),
                 wpo_weights=torch.tensor([1.0, 0.5, 0.01, 0.9], dtype=torch.float64))
    loss_fn = get_loss(name)

    def loss(*inputs):
        return loss_fn(PairBatch(**dict(zip(LOGPS + PROBS, inputs)), **fixed), LossParams(beta=0.1, gamma=0.3))

    assert torch.autograd.gradcheck(loss, (*logps, *probs))


# (name, beta, a_w, a_l) at which the loss is exactly zero. beta = 0.25 keeps every target exact:
# 1/beta = 4, 1/(2 beta) = 2; chosen_probs = 0.75, win = 0.875, lose = 0.375.
#   sppo: a_w = 4 (0.875 - 0.5) = 1.5, a_l = 4 (0.375 - 0.5) = -0.5
#   sppo_hard: a_w = 2, a_l = -2
#   sppo_single: a_w = 4 (0.75 - 0.5) = 1, a_l = -1
#   ipo: any a_w - a_l = 2, e.g. a_w = 0.5, a_l = -1.5
MINIMISERS = [
    ("sppo", 1.5, -0.5),
    ("sppo_hard", 2.0, -2.0),
    ("sppo_single", 1.0, -1.0),
    ("ipo", 0.5, -1.5),
]


def _at(a_w: float, a_l: float, dtype=torch.float32) -> PairBatch:
    # Nonzero reference log-probs, so the log-ratios are differences as in training.
    ref_chosen, ref_rejected = -3.0, -5.0
    return PairBatch(
        policy_chosen_logps=torch.tensor([ref_chosen + a_w], dtype=dtype, requires_grad=True),
        policy_rejected_logps=torch.tensor([ref_rejected + a_l], dtype=dtype, requires_grad=True),
        ref_chosen_logps=torch.tensor([ref_chosen], dtype=dtype),
        ref_rejected_logps=torch.tensor([ref_rejected], dtype=dtype),
        chosen_probs=torch.tensor([0.75], dtype=dtype),
        chosen_probs_win=torch.tensor([0.875], dtype=dtype),
        chosen_probs_lose=torch.tensor([0.375], dtype=dtype),
        chosen_lengths=torch.tensor([3.0], dtype=dtype),
        rejected_lengths=torch.tensor([3.0], dtype=dtype),
    )


@pytest.mark.parametrize("name,a_w,a_l", MINIMISERS)
def test_loss_is_zero_exactly_at_its_minimiser(name, a_w, a_l):
    loss_fn = get_loss(name)
    inputs = _at(a_w, a_l)
    loss = loss_fn(inputs, LossParams(beta=0.25))
    assert loss.item() == 0.0
    loss.sum().backward()
    assert inputs.policy_chosen_logps.grad.item() == 0.0
    assert inputs.policy_rejected_logps.grad.item() == 0.0
    for d_w, d_l in ((0.1, 0.0), (0.0, 0.1), (-0.1, 0.0), (0.0, -0.1), (0.1, 0.1)):
        moved = loss_fn(_at(a_w + d_w, a_l + d_l), LossParams(beta=0.25)).item()
        if name == "ipo" and d_w == d_l:
            assert moved == pytest.approx(0.0, abs=1e-6)  # ipo sees only the margin a_w - a_l
        else:
            assert moved > 0.0


def test_ipo_depends_on_the_margin_only():
    # Shifting a_w and a_l by the same amount leaves the margin, and the loss, unchanged.
    base = pairs(torch.float64)
    shifted = dataclasses.replace(base, policy_chosen_logps=base.policy_chosen_logps + 7.0,
                                  policy_rejected_logps=base.policy_rejected_logps + 7.0)
    torch.testing.assert_close(ipo_loss(shifted, PARAMS), ipo_loss(base, PARAMS))


def test_dpo_decreases_as_the_margin_grows():
    batch = _margins([-50.0, -5.0, -1.0, 0.0, 1.0, 5.0, 50.0], torch.float64, requires_grad=True)
    loss = dpo_loss(batch, LossParams(beta=0.1))
    assert (loss > 0).all()
    assert (loss[1:] < loss[:-1]).all()
    loss.sum().backward()
    # d/dm -log sigmoid(beta m) = -beta sigmoid(-beta m): always negative, bounded by beta.
    margins = batch.policy_chosen_logps
    torch.testing.assert_close(margins.grad, -0.1 * torch.sigmoid(-0.1 * margins.detach()))


def test_dpo_is_stable_at_huge_margins():
    # A naive log(sigmoid(x)) gives log(0) = -inf in float32 for x = -5000.
    batch = _margins([-1e4, 1e4], requires_grad=True)
    loss = dpo_loss(batch, LossParams(beta=0.5))
    torch.testing.assert_close(loss, torch.tensor([5000.0, 0.0]))
    loss.sum().backward()
    torch.testing.assert_close(batch.policy_chosen_logps.grad, torch.tensor([-0.5, 0.0]))


def test_simpo_is_reference_free_and_length_normalised():
    base = pairs(torch.float64)
    # The reference log-probs do not enter SimPO at all...
    moved_ref = dataclasses.replace(base, ref_chosen_logps=base.ref_chosen_logps - 9.0,
                                    ref_rejected_logps=base.ref_rejected_logps + 4.0)
    torch.testing.assert_close(simpo_loss(moved_ref, PARAMS), simpo_loss(base, PARAMS))
    # ...and a response twice as long with twice the log-prob (same per-token log-prob) scores the same.
    doubled = dataclasses.replace(base, policy_chosen_logps=2 * base.policy_chosen_logps,
                                  chosen_lengths=2 * base.chosen_lengths)
    torch.testing.assert_close(simpo_loss(doubled, PARAMS), simpo_loss(base, PARAMS))
    # gamma = 0 at equal per-token rewards: log 2; the margin gamma raises it to log(1 + e^gamma).
    equal = _margins([0.0, 0.0], torch.float64)
    torch.testing.assert_close(simpo_loss(equal, LossParams(beta=2.0)), torch.full((2,), math.log(2.0), dtype=torch.float64))
    torch.testing.assert_close(simpo_loss(equal, LossParams(beta=2.0, gamma=1.5)),
                               torch.full((2,), math.log1p(math.exp(1.5)), dtype=torch.float64))


def test_wpo_is_dpo_scaled_by_detached_weights():
    batch = _margins([-2.0, 0.5, 3.0], torch.float64, requires_grad=True)
    weights = torch.tensor([1.0, 0.25, 0.0], dtype=torch.float64, requires_grad=True)
    weighted = dataclasses.replace(batch, wpo_weights=wpo_pair_weights(weights.log(), torch.zeros(3, dtype=torch.float64)))
    loss = wpo_loss(weighted, LossParams(beta=0.5))
    torch.testing.assert_close(loss, weights.detach() * dpo_loss(batch, LossParams(beta=0.5)))
    loss.sum().backward()
    assert weights.grad is None  # the weights are constants of the loss, as WPO defines them
    torch.testing.assert_close(batch.policy_chosen_logps.grad,
                               weights.detach() * -0.5 * torch.sigmoid(-0.5 * batch.policy_chosen_logps.detach()))
    with pytest.raises(ValueError, match="no wpo_weights"):
        wpo_loss(dataclasses.replace(batch, wpo_weights=None), LossParams(beta=0.5))


def test_wpo_logweights_hand_computed():
    # V = 2, labels [0, 0, 1], response = positions 1 and 2 (mask [0, 1, 1]).
    # Position 0 predicts label 0 from logits [0, 0]: p = [1/2, 1/2], sum p^2 = 1/2,
    #   log(1/2) - log(1/2) = 0 (a uniform policy: every token is as likely as expected).
    # Position 1 predicts label 1 from logits [log 3, 0]: p = [3/4, 1/4], sum p^2 = 10/16 = 5/8,
    #   log(1/4) - log(5/8) = log(2/5).  Mean over the 2 response tokens: log(2/5) / 2.
    # With label 0 at position 2 instead: log(3/4) - log(5/8) = log(6/5), mean log(6/5) / 2.
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [7.0, -7.0]]]).repeat(2, 1, 1)
    labels = torch.tensor([[0, 0, 1], [0, 0, 0]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 1]])
    out = sequence_wpo_logweights(logits, labels, mask)
    torch.testing.assert_close(out, torch.tensor([math.log(2 / 5) / 2, math.log(6 / 5) / 2]))
    torch.testing.assert_close(response_lengths(mask), torch.tensor([2.0, 2.0]))
    # Pair weight: exp(log w_w + log w_l), capped at 1: sqrt(2/5) sqrt(6/5) = sqrt(12/25) < 1.
    torch.testing.assert_close(wpo_pair_weights(out[:1], out[1:]), torch.tensor([math.sqrt(12 / 25)]))
    torch.testing.assert_close(wpo_pair_weights(torch.tensor([0.3]), torch.tensor([0.2])), torch.tensor([1.0]))


def test_wpo_logweights_ignore_prompt_and_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 5)
    labels = torch.randint(0, 5, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]])
    base = sequence_wpo_logweights(logits, labels, mask)
    changed = logits.clone()
    changed[0, 0], changed[0, 4:], changed[1, 5] = 50.0, -50.0, 9.0  # predict prompt or padding only
    changed[0, 5] = 3.0
    torch.testing.assert_close(sequence_wpo_logweights(changed, labels, mask), base)


def test_get_loss_knows_every_configurable_name():
    configurable = typing.get_args(TrainConfig.model_fields["loss"].annotation)
    assert configurable, "TrainConfig.loss is no longer a Literal"
    assert set(configurable) == set(LOSSES)
    for name in configurable:
        assert get_loss(name) is LOSSES[name]
    assert get_loss("sppo") is sppo_loss


def test_get_loss_names_the_field():
    with pytest.raises(ValueError, match=r"train\.loss: unknown loss 'orpo'; known: \['dpo', 'ipo', "):
        get_loss("orpo")


def _full_log_softmax_wpo_logweights(logits, labels, mask):
    """The former formula, kept here only as the reference: a float32 log_softmax of all the logits."""
    log_probs = logits[:, :-1].float().log_softmax(-1)
    token_logps = log_probs.gather(-1, labels[:, 1:].unsqueeze(-1)).squeeze(-1)
    log_expected = (2.0 * log_probs).logsumexp(-1)
    counted = mask[:, 1:].bool()
    return ((token_logps - log_expected) * counted).sum(-1) / counted.sum(-1).clamp(min=1)


@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1.0), (torch.float32, 8.0), (torch.bfloat16, 4.0)])
def test_wpo_logweights_equal_the_full_log_softmax_formula(dtype, scale):
    torch.manual_seed(1)
    logits = (torch.randn(5, 11, 301) * scale).to(dtype)
    labels = torch.randint(0, 301, (5, 11))
    mask = torch.rand(5, 11) > 0.3
    # 1e-6, relative where the log-weights are large (float32 resolves 4e-6 at 30).
    torch.testing.assert_close(sequence_wpo_logweights(logits, labels, mask),
                               _full_log_softmax_wpo_logweights(logits, labels, mask), atol=1e-6, rtol=1e-6)


def test_wpo_logweights_make_no_float32_copy_of_the_batch_logits():
    """Memory-lean like `sequence_logps`: float32 copies of one sequence's logits at a time."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestFloat32(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    LargestFloat32.largest = max(LargestFloat32.largest, t.numel())
            return out

    batch, length, vocab = 6, 10, 50
    logits = torch.randn(batch, length, vocab).to(torch.bfloat16)
    with LargestFloat32():
        sequence_wpo_logweights(logits, torch.randint(0, vocab, (batch, length)), torch.ones(batch, length))
    assert LargestFloat32.largest <= length * vocab
