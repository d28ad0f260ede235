from pathlib import Path

import numpy as np
import pytest

from sppo.pairs import hybrid_candidates, select_pair, training_rows


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
         "chosen_probs_win": pytest.approx(0.7), "chosen_probs_lose": pytest.approx(0.3),
         "chosen_off_policy": False, "rejected_off_policy": False}
    ]
    with pytest.raises(ValueError, match="length mismatch"):
        training_rows(["x", "y"], [["a", "b"]], [m])


def test_hybrid_candidates_join_after_the_sampled_ones():
    sampled = [["a", "b"], ["c", "d"], ["e", "f"]]
    # Prompt 0: one new dataset response; prompt 1: one repeats a sample, one repeats itself;
    # prompt 2: none.
    candidates, off_policy = hybrid_candidates(sampled, [["gpt"], ["c", "uf1", "uf1", "uf2"], []])
    assert candidates == [["a", "b", "gpt"], ["c", "d", "uf1", "uf2"], ["e", "f"]]
    assert off_policy == [[False, False, True], [False, False, True, True], [False, False]]
    assert sampled == [["a", "b"], ["c", "d"], ["e", "f"]]  # inputs untouched
    with pytest.raises(ValueError, match="2 sampled lists, 1 dataset response lists"):
        hybrid_candidates(sampled[:2], [[]])


def test_training_rows_mark_off_policy_chosen_and_rejected():
    # Candidate 2 (off-policy) wins everything, candidate 1 (sampled) loses everything.
    m = np.array([[0.5, 0.8, 0.3], [0.2, 0.5, 0.1], [0.7, 0.9, 0.5]])
    flags = [[False, False, True]]
    (row,) = training_rows(["x"], [["s0", "s1", "dataset"]], [m], flags)
    assert (row["chosen"], row["rejected"]) == ("dataset", "s1")
    assert (row["chosen_off_policy"], row["rejected_off_policy"]) == (True, False)
    (row,) = training_rows(["x"], [["s0", "s1", "dataset"]], [m.T.copy()], flags)  # preferences reversed
    assert (row["chosen"], row["rejected"]) == ("s1", "dataset")
    assert (row["chosen_off_policy"], row["rejected_off_policy"]) == (False, True)
    with pytest.raises(ValueError, match="3 candidates, a 3 x 3 win matrix and 2 off-policy flags"):
        training_rows(["x"], [["s0", "s1", "dataset"]], [m], [[False, True]])


def test_dataset_responses_read_strings_and_lists(tmp_path):
    import json

    from sppo.config import PromptsConfig
    from sppo.prompts import PromptSourceError, dataset_responses

    path = tmp_path / "prefs.jsonl"
    rows = [{"prompt": "p1", "gpt": "answer"}, {"prompt": "p2", "gpt": ["uf1", " ", "uf2"]},
            {"prompt": "p3", "gpt": None}, {"prompt": "p1", "gpt": "second"},
            {"prompt": "p4", "gpt": [{"model": "gpt-4", "response": "uf"}, {"model": "x", "response": ""}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = PromptsConfig(source=str(path), response_column="gpt")
    assert dataset_responses(cfg, 1) == {"p1": ["answer", "second"], "p2": ["uf1", "uf2"], "p3": [],
                                         "p4": ["uf"]}
    assert dataset_responses(PromptsConfig(source=str(path)), 1) == {}  # on-policy only

    with pytest.raises(PromptSourceError, match=r"no column 'missing' \(prompts\.response_column\)"):
        dataset_responses(cfg.model_copy(update={"response_column": "missing"}), 1)
    path.write_text(json.dumps({"prompt": "p1", "gpt": {"text": "x"}}) + "\n")
    with pytest.raises(PromptSourceError, match=r"'gpt' \(prompts\.response_column\), row 0: expected a string"):
        dataset_responses(cfg, 1)
    with pytest.raises(PromptSourceError, match="built-in prompt set 'builtin:tiny' holds no responses"):
        dataset_responses(PromptsConfig(response_column="gpt"), 1)


def test_bundled_hybrid_set_answers_bundled_prompts():
    from sppo.config import PromptsConfig
    from sppo.prompts import dataset_responses
    from sppo.tiny.policy import bundled_prompts

    source = Path(__file__).resolve().parents[1] / "sppo" / "data" / "tiny_hybrid.jsonl"  # configs/tiny-wpo.yaml's
    responses = dataset_responses(PromptsConfig(source=str(source), response_column="response"), 1)
    assert len(responses) == 12 and set(responses) <= set(bundled_prompts())
    assert all(len(r) == 1 and r[0] for r in responses.values())


def test_training_rows_carry_the_sampled_tokens_of_chosen_and_rejected():
    m = np.array([[0.5, 0.2, 0.6], [0.8, 0.5, 0.9], [0.4, 0.1, 0.5]])  # 1 best, 2 worst
    ids = [[[5, 2], [6, 7, 2], [8]]]
    logps = [[[-1.0, -0.5], [-2.0, -0.1, -0.2], [-3.0]]]
    (row,) = training_rows(["x"], [["a", "b", "c"]], [m], None, ids, logps)
    assert (row["chosen"], row["rejected"]) == ("b", "c")
    assert (row["chosen_token_ids"], row["chosen_token_logps"]) == ([6, 7, 2], [-2.0, -0.1, -0.2])
    assert (row["rejected_token_ids"], row["rejected_token_logps"]) == ([8], [-3.0])
    assert "chosen_token_ids" not in training_rows(["x"], [["a", "b", "c"]], [m])[0]
    with pytest.raises(ValueError, match="3 candidates but token ids of 2 and token log-probs of 3"):
        training_rows(["x"], [["a", "b", "c"]], [m], None, [ids[0][:2]], logps)
    with pytest.raises(ValueError, match="give both or neither"):
        training_rows(["x"], [["a", "b", "c"]], [m], None, ids, None)
