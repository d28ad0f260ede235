"""The rule judge: deterministic scores from text features, a proper win matrix, config errors."""

from __future__ import annotations

import numpy as np
import pytest

from sppo.config import ConfigError, JudgeConfig, RuleJudgeConfig, load_config
from sppo.judging import JUDGES
from sppo.judging.rules import (FULL_LENGTH_CHARS, keyword_fraction, length_fraction, letter_fraction, rule_score,
                                rule_win_matrix)

NOISE = "\x0c\x01Q\ufffd:H \"\ufffd>"


def test_letter_fraction_counts_ascii_letters_and_spaces():
    cfg = RuleJudgeConfig()
    assert letter_fraction("ab c", cfg) == 1.0
    assert letter_fraction("ab1!", cfg) == 0.5
    assert letter_fraction("", cfg) == 0.0
    assert letter_fraction(NOISE, cfg) == pytest.approx(3 / 10)


def test_keyword_fraction_matches_whole_words_case_insensitively():
    cfg = RuleJudgeConfig(weights={"keywords": 1.0}, keywords=["Water", "sky"])
    assert keyword_fraction("The sky, the WATER and skylines", cfg) == pytest.approx(2 / 6)
    assert keyword_fraction("", cfg) == 0.0


def test_length_fraction_pays_for_each_character_up_to_the_full_length():
    cfg = RuleJudgeConfig(weights={"letters": 1.0, "length": 5.0})
    assert length_fraction("", cfg) == 0.0 and length_fraction("x" * 250, cfg) == 250 / FULL_LENGTH_CHARS
    assert length_fraction("x" * (2 * FULL_LENGTH_CHARS), cfg) == 1.0
    # Of two answers made of letters alone, the longer wins.
    assert rule_win_matrix(["short words", "short words and then some"], cfg)[1, 0] > 0.9


def test_score_is_the_weighted_sum_of_features():
    cfg = RuleJudgeConfig(weights={"letters": 0.5, "keywords": 2.0}, keywords=["sky"])
    text = "sky 1"
    assert rule_score(text, cfg) == pytest.approx(0.5 * 4 / 5 + 2.0 * 1 / 2)


def test_win_matrix_is_proper_and_prefers_letters():
    cfg = RuleJudgeConfig(temperature=0.02)
    candidates = ["plain words here", NOISE, "half 1234", "plain words here"]
    p = rule_win_matrix(candidates, cfg)
    assert p.shape == (4, 4)
    np.testing.assert_allclose(p + p.T, 1.0)
    np.testing.assert_allclose(np.diag(p), 0.5)
    assert p[0, 1] > 0.99 and p[0, 2] > 0.99 and p[2, 1] > 0.99
    assert p[0, 3] == 0.5  # equal texts tie
    # Determinism: the same input gives the same matrix, bit for bit.
    assert np.array_equal(p, rule_win_matrix(candidates, cfg))


def test_temperature_sharpens_preferences():
    soft, sharp = RuleJudgeConfig(temperature=1.0), RuleJudgeConfig(temperature=0.01)
    candidates = ["abcd", "abc1"]
    assert 0.5 < rule_win_matrix(candidates, soft)[0, 1] < rule_win_matrix(candidates, sharp)[0, 1]


def test_dispatch_runs_the_rule_judge_without_a_model():
    cfg = JudgeConfig(kind="rule", path="/no/such/model")
    matrices = JUDGES["rule"]("", ["p1", "p2"], [["ok text", NOISE], ["a", "b", "c"]], cfg)
    assert [m.shape for m in matrices] == [(2, 2), (3, 3)]
    assert matrices[0][0, 1] > 0.5
    with pytest.raises(ValueError, match="prompt 0 has 1 candidates"):
        JUDGES["rule"]("", ["p"], [["only one"]], cfg)


def test_bad_rule_config_names_the_field():
    with pytest.raises(ConfigError, match=r"judge.rule.weights.brevity"):
        load_config(None, {"judge.kind": "rule", "judge.rule.weights": {"brevity": 1.0}})
    with pytest.raises(ConfigError, match=r"judge.rule.temperature"):
        load_config(None, {"judge.rule.temperature": 0})
