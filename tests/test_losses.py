"""SPPO loss and sequence log-probs: hand-computed values, masking, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from sppo.losses import LOSSES, get_loss, sequence_logps, sppo_loss


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


def test_sppo_loss_hand_computed():
    # beta = 0.5, so 1/beta = 2.
    # Pair 0: a_w = -1.0 - (-1.5) = 0.5, target_w = 2 (0.75 - 0.5) = 0.5  -> 0
    #         a_l = -2.0 - (-1.0) = -1.0, target_l = 2 (0.25 - 0.5) = -0.5 -> (-0.5)^2 = 0.25
    #         L = 0.5 (0 + 0.25) = 0.125
    # Pair 1: a_w = 2.0 - 0.0 = 2.0, target_w = 2 (0.9 - 0.5) = 0.8 -> 1.2^2 = 1.44
    #         a_l = -3.5 - (-3.0) = -0.5, target_l = 2 (0.3 - 0.5) = -0.4 -> (-0.1)^2 = 0.01
    #         L = 0.5 (1.44 + 0.01) = 0.725
    loss = sppo_loss(
        policy_chosen_logps=torch.tensor([-1.0, 2.0]),
        policy_rejected_logps=torch.tensor([-2.0, -3.5]),
        ref_chosen_logps=torch.tensor([-1.5, 0.0]),
        ref_rejected_logps=torch.tensor([-1.0, -3.0]),
        chosen_probs_win=torch.tensor([0.75, 0.9]),
        chosen_probs_lose=torch.tensor([0.25, 0.3]),
        beta=0.5,
    )
    torch.testing.assert_close(loss, torch.tensor([0.125, 0.725]))


def test_sppo_loss_gradcheck():
    torch.manual_seed(0)
    logps = [torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    probs = [torch.rand(4, dtype=torch.float64, requires_grad=True) for _ in range(2)]

    def loss(*inputs):
        return sppo_loss(*inputs, beta=0.1)

    assert torch.autograd.gradcheck(loss, (*logps, *probs))


def test_get_loss_names_the_field():
    assert get_loss("sppo") is sppo_loss
    assert set(LOSSES) == {"sppo"}
    with pytest.raises(ValueError, match=r"train\.loss: unknown loss 'dpo'"):
        get_loss("dpo")
