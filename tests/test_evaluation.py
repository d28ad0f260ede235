"""Evaluation's pure core: block win rates, bootstrap intervals, metric names."""

from __future__ import annotations

import numpy as np
import pytest

from sppo.config import EvalConfig, RuleJudgeConfig
from sppo.evaluation import block_win_rates, bootstrap_interval, response_length_metrics, win_rate, win_rate_metrics
from sppo.judging.rules import rule_win_matrix


def test_block_win_rates_average_the_new_versus_other_block():
    # Two new samples, two old ones: P[new, old] = [[1, 0.5], [0.5, 0]] -> 0.5.
    p = np.array([[0.5, 0.3, 1.0, 0.5], [0.7, 0.5, 0.5, 0.0], [0.0, 0.5, 0.5, 0.5], [0.5, 1.0, 0.5, 0.5]])
    assert block_win_rates([p, p.T * 0 + 0.5], slice(0, 2), slice(2, 4)).tolist() == [0.5, 0.5]


def test_block_win_rates_of_a_rule_judged_prompt():
    new, old = ["clean words", "more words"], ["\x01\x02\x03", "\ufffd\ufffd"]
    p = rule_win_matrix(new + old, RuleJudgeConfig())
    assert block_win_rates([p], slice(0, 2), slice(2, 4))[0] > 0.99
    assert block_win_rates([p], slice(2, 4), slice(0, 2))[0] < 0.01


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_data():
    rng = np.random.default_rng(1)
    small, large = rng.uniform(0.4, 1.0, 20), rng.uniform(0.4, 1.0, 2000)
    low, high = bootstrap_interval(small, 0.95, 2000, seed=0)
    assert low < small.mean() < high
    low_l, high_l = bootstrap_interval(large, 0.95, 2000, seed=0)
    assert high_l - low_l < (high - low) / 4
    assert bootstrap_interval(small, 0.95, 2000, seed=0) == (low, high)  # seeded: reproducible
    assert bootstrap_interval(np.full(5, 0.7), 0.95, 100, seed=0) == pytest.approx((0.7, 0.7))
    with pytest.raises(ValueError, match="no values"):
        bootstrap_interval(np.array([]), 0.95, 100, seed=0)


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    covered = 0
    for trial in range(200):
        values = rng.binomial(1, 0.65, size=60).astype(float)
        low, high = bootstrap_interval(values, 0.95, 500, seed=trial)
        covered += low <= 0.65 <= high
    assert 0.88 <= covered / 200 <= 0.99


def test_metric_names_and_lengths():
    rate = win_rate(np.array([0.6, 0.8, 0.7]), EvalConfig(bootstrap_samples=200))
    assert rate.mean == pytest.approx(0.7) and rate.low <= 0.7 <= rate.high
    assert set(win_rate_metrics("win_rate_vs_base", rate)) == {
        "eval/win_rate_vs_base", "eval/win_rate_vs_base_ci_low", "eval/win_rate_vs_base_ci_high"}
    assert response_length_metrics([["ab", "abcd"], ["abc", "abc"]]) == {
        "eval/prompts": 2, "eval/mean_response_chars": 3.0}


def test_evaluate_judges_new_against_previous_and_base_samples_already_drawn(tmp_path):
    """Iteration 2 with every policy's held-out samples on disk: no engine starts, the rule judge
    compares pi_2 (clean text) with pi_1 (half clean) and pi_0 (noise)."""
    from sppo.config import load_config
    from sppo.evaluation import evaluate
    from sppo.run_directory import RunDirectory
    from sppo.sampling import EnginePool

    cfg = load_config("configs/tiny.yaml", {"output_dir": str(tmp_path), "sampling.k": 2})
    prompts = ["p1", "p2", "p3"]
    drawn = {0: ["\x01\x02", "\ufffd!"], 1: ["words", "\x01\x02"], 2: ["words here", "more words"]}
    run = RunDirectory(tmp_path)
    for g, cands in drawn.items():
        run.write_rows(run.iteration(g).eval_samples, [{"prompt": p, "candidates": cands} for p in prompts])
    engines = EnginePool(cfg.sampling)  # every policy's samples exist: no engine starts
    rows, metrics = evaluate(cfg, run, 2, {0: "unused", 1: "unused", 2: "unused"}, "", prompts, engines)
    assert metrics["eval/win_rate_vs_base"] > 0.99
    assert 0.7 < metrics["eval/win_rate_vs_prev"] < 0.8  # ties with "words", beats the noise
    assert metrics["eval/mean_response_chars"] == 10.0 and metrics["eval/prompts"] == 3
    assert metrics["evaluation/engine_starts"] == 0
    assert rows[0]["policies"] == [2, 2, 1, 1, 0, 0] and len(rows[0]["win_matrix"]) == 6
    # Samples of other prompts are not silently reused.
    with pytest.raises(ValueError, match="not the current held-out prompts"):
        evaluate(cfg, run, 2, {0: "unused", 1: "unused", 2: "unused"}, "", ["other"], engines)
