"""Preference losses and sequence log-probs: hand-computed values, masking, gradients, minimisers."""

from __future__ import annotations

import inspect
import math
import typing

import pytest
import torch

from sppo.config import TrainConfig
from sppo.losses import (
    LOSSES,
    dpo_loss,
    get_loss,
    ipo_loss,
    sequence_logps,
    sppo_hard_loss,
    sppo_loss,
    sppo_single_loss,
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
)
TENSOR_ARGS = tuple(PAIRS)


def pairs(dtype=torch.float32, **changes) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(changes.get(k, v), dtype=dtype) for k, v in PAIRS.items()}


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
HAND_COMPUTED = {
    "sppo": [0.125, 0.725],
    "sppo_hard": [0.25, 1.25],
    "sppo_single": [0.125, 0.765],
    "ipo": [0.25, 2.25],
    "dpo": [math.log1p(math.exp(-0.75)), math.log1p(math.exp(-1.25))],
}


@pytest.mark.parametrize("name", sorted(HAND_COMPUTED))
def test_loss_hand_computed(name):
    loss = get_loss(name)(**pairs(), beta=0.5)
    assert loss.shape == (2,)
    torch.testing.assert_close(loss, torch.tensor(HAND_COMPUTED[name]))


def test_dpo_hand_computed_round_margins():
    # beta = 0.5, a_l = 0, a_w = margin = [0, 2 ln 3, -2 ln 3] -> beta margin = [0, ln 3, -ln 3].
    #   sigmoid(0) = 1/2 -> log 2;  sigmoid(ln 3) = 3/(3 + 1) = 3/4 -> log(4/3);
    #   sigmoid(-ln 3) = 1/4 -> log 4.
    margin = [0.0, 2 * math.log(3.0), -2 * math.log(3.0)]
    zeros = [0.0, 0.0, 0.0]
    inputs = dict(PAIRS, policy_chosen_logps=margin, policy_rejected_logps=zeros, ref_chosen_logps=zeros,
                  ref_rejected_logps=zeros, chosen_probs=[0.5] * 3, chosen_probs_win=[0.5] * 3,
                  chosen_probs_lose=[0.5] * 3)
    loss = dpo_loss(**{k: torch.tensor(v) for k, v in inputs.items()}, beta=0.5)
    torch.testing.assert_close(loss, torch.tensor([math.log(2.0), math.log(4 / 3), math.log(4.0)]))


def test_sppo_variants_are_sppo_at_their_probabilities():
    # sppo_hard = 2 x sppo at win = 1, lose = 0; sppo_single(p) = sppo at win = p, lose = 1 - p.
    torch.manual_seed(0)
    inputs = {k: torch.randn(6, dtype=torch.float64) for k in TENSOR_ARGS[:4]}
    p = torch.rand(6, dtype=torch.float64)
    probs = dict(chosen_probs=p, chosen_probs_win=torch.rand(6, dtype=torch.float64),
                 chosen_probs_lose=torch.rand(6, dtype=torch.float64))
    hard_as_sppo = dict(probs, chosen_probs_win=torch.ones(6, dtype=torch.float64),
                        chosen_probs_lose=torch.zeros(6, dtype=torch.float64))
    single_as_sppo = dict(probs, chosen_probs_win=p, chosen_probs_lose=1 - p)
    torch.testing.assert_close(
        sppo_hard_loss(**inputs, **probs, beta=0.1), 2 * sppo_loss(**inputs, **hard_as_sppo, beta=0.1)
    )
    torch.testing.assert_close(
        sppo_single_loss(**inputs, **probs, beta=0.1), sppo_loss(**inputs, **single_as_sppo, beta=0.1)
    )


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_gradcheck(name):
    torch.manual_seed(0)
    logps = [torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    # Probabilities away from 0 and 1, like a judge's.
    probs = [(0.05 + 0.9 * torch.rand(4, dtype=torch.float64)).requires_grad_() for _ in range(3)]
    loss_fn = get_loss(name)

    def loss(*inputs):
        return loss_fn(**dict(zip(TENSOR_ARGS, inputs)), beta=0.1)

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


def _at(a_w: float, a_l: float, dtype=torch.float32) -> dict[str, torch.Tensor]:
    # Nonzero reference log-probs, so the log-ratios are differences as in training.
    ref_chosen, ref_rejected = -3.0, -5.0
    return {
        "policy_chosen_logps": torch.tensor([ref_chosen + a_w], dtype=dtype, requires_grad=True),
        "policy_rejected_logps": torch.tensor([ref_rejected + a_l], dtype=dtype, requires_grad=True),
        "ref_chosen_logps": torch.tensor([ref_chosen], dtype=dtype),
        "ref_rejected_logps": torch.tensor([ref_rejected], dtype=dtype),
        "chosen_probs": torch.tensor([0.75], dtype=dtype),
        "chosen_probs_win": torch.tensor([0.875], dtype=dtype),
        "chosen_probs_lose": torch.tensor([0.375], dtype=dtype),
    }


@pytest.mark.parametrize("name,a_w,a_l", MINIMISERS)
def test_loss_is_zero_exactly_at_its_minimiser(name, a_w, a_l):
    loss_fn = get_loss(name)
    inputs = _at(a_w, a_l)
    loss = loss_fn(**inputs, beta=0.25)
    assert loss.item() == 0.0
    loss.sum().backward()
    assert inputs["policy_chosen_logps"].grad.item() == 0.0
    assert inputs["policy_rejected_logps"].grad.item() == 0.0
    for d_w, d_l in ((0.1, 0.0), (0.0, 0.1), (-0.1, 0.0), (0.0, -0.1), (0.1, 0.1)):
        moved = loss_fn(**_at(a_w + d_w, a_l + d_l), beta=0.25).item()
        if name == "ipo" and d_w == d_l:
            assert moved == pytest.approx(0.0, abs=1e-6)  # ipo sees only the margin a_w - a_l
        else:
            assert moved > 0.0


def test_ipo_depends_on_the_margin_only():
    # Shifting a_w and a_l by the same amount leaves the margin, and the loss, unchanged.
    base = ipo_loss(**pairs(torch.float64), beta=0.5)
    shifted = pairs(torch.float64)
    shifted["policy_chosen_logps"] += 7.0
    shifted["policy_rejected_logps"] += 7.0
    torch.testing.assert_close(ipo_loss(**shifted, beta=0.5), base)


def test_dpo_decreases_as_the_margin_grows():
    margins = torch.tensor([-50.0, -5.0, -1.0, 0.0, 1.0, 5.0, 50.0], dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros_like(margins)
    probs = torch.full_like(zeros, 0.5)
    loss = dpo_loss(policy_chosen_logps=margins, policy_rejected_logps=zeros, ref_chosen_logps=zeros,
                    ref_rejected_logps=zeros, chosen_probs=probs, chosen_probs_win=probs,
                    chosen_probs_lose=probs, beta=0.1)
    assert (loss > 0).all()
    assert (loss[1:] < loss[:-1]).all()
    loss.sum().backward()
    # d/dm -log sigmoid(beta m) = -beta sigmoid(-beta m): always negative, bounded by beta.
    torch.testing.assert_close(margins.grad, -0.1 * torch.sigmoid(-0.1 * margins.detach()))


def test_dpo_is_stable_at_huge_margins():
    # A naive log(sigmoid(x)) gives log(0) = -inf in float32 for x = -5000.
    margins = torch.tensor([-1e4, 1e4], requires_grad=True)
    zeros = torch.zeros(2)
    probs = torch.full((2,), 0.5)
    loss = dpo_loss(policy_chosen_logps=margins, policy_rejected_logps=zeros, ref_chosen_logps=zeros,
                    ref_rejected_logps=zeros, chosen_probs=probs, chosen_probs_win=probs,
                    chosen_probs_lose=probs, beta=0.5)
    torch.testing.assert_close(loss, torch.tensor([5000.0, 0.0]))
    loss.sum().backward()
    torch.testing.assert_close(margins.grad, torch.tensor([-0.5, 0.0]))


def test_get_loss_knows_every_configurable_name():
    configurable = typing.get_args(TrainConfig.model_fields["loss"].annotation)
    assert configurable, "TrainConfig.loss is no longer a Literal"
    assert set(configurable) == set(LOSSES)
    for name in configurable:
        assert get_loss(name) is LOSSES[name]
    assert get_loss("sppo") is sppo_loss


def test_every_loss_takes_the_same_keyword_arguments():
    expected = [*TENSOR_ARGS, "beta"]
    for name, loss_fn in LOSSES.items():
        params = inspect.signature(loss_fn).parameters.values()
        assert [p.name for p in params] == expected, name
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params), name


def test_get_loss_names_the_field():
    with pytest.raises(ValueError, match=r"train\.loss: unknown loss 'simpo'; known: \['dpo', 'ipo', "):
        get_loss("simpo")
