import numpy as np
import pytest

from sppo.pairs import select_pair, training_rows


def test_pair_follows_the_reference_definitions():
    # Scores s = [0, 1, -1] -> P_ij = sigmoid(s_i - s_j); candidate 1 is best, 2 is worst.
    s = np.array([0.0, 1.0, -1.0])
    p = 1 / (1 + np.exp(-(s[:, None] - s[None, :])))
    pair = select_pair(p)
    assert (pair.chosen, pair.rejected) == (1, 2)
    assert pair.chosen_probs == pytest.approx(1 / (1 + np.exp(-2.0)))
    # Means over j include the diagonal 0.5, as the reference computes them.
    assert pair.chosen_probs_win == pytest.approx((p[1, 0] + 0.5 + p[1, 2]) / 3)
    assert pair.chosen_probs_lose == pytest.approx((p[2, 0] + p[2, 1] + 0.5) / 3)


def test_ties_are_broken_deterministically():
    flat = np.full((4, 4), 0.5)
    pair = select_pair(flat)
    assert (pair.chosen, pair.rejected) == (0, 3)
    tie_top = np.array([[0.5, 0.5, 0.9], [0.5, 0.5, 0.9], [0.1, 0.1, 0.5]])
    assert (select_pair(tie_top).chosen, select_pair(tie_top).rejected) == (0, 2)


def test_k_two_and_bad_shapes():
    pair = select_pair(np.array([[0.5, 0.2], [0.8, 0.5]]))
    assert (pair.chosen, pair.rejected) == (1, 0)
    with pytest.raises(ValueError, match="K x K"):
        select_pair(np.array([[0.5]]))
    with pytest.raises(ValueError, match="K x K"):
        select_pair(np.zeros((2, 3)))


def test_training_rows_pick_the_texts():
    m = np.array([[0.5, 0.9], [0.1, 0.5]])
    rows = training_rows(["x"], [["good", "bad"]], [m])
    assert rows == [
        {"prompt": "x", "chosen": "good", "rejected": "bad", "chosen_probs": 0.9,
         "chosen_probs_win": pytest.approx(0.7), "chosen_probs_lose": pytest.approx(0.3)}
    ]
    with pytest.raises(ValueError, match="length mismatch"):
        training_rows(["x", "y"], [["a", "b"]], [m])
