"""Evaluation's pure core: comparisons, bootstrap intervals, the length-controlled win rate on
synthetic judgments (fixed seeds), the length warning, the champion and the metric names; and the
stage on held-out samples already drawn, and drawn again on a real engine when their settings
changed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import expit, logit

from sppo.config import EvalConfig, RuleJudgeConfig
from sppo.evaluation import (Comparison, bootstrap_interval, choose_champion, compare, comparison_metrics,
                             judge_comparison, length_controlled_fit, length_difference_metrics, length_gain_warning,
                             length_notes, response_length_metrics, win_rate, win_rate_metrics)
from sppo.judging.rules import rule_win_matrix
from sppo.storage import read_parquet


def test_compare_takes_the_new_versus_other_block_and_its_length_differences():
    # Two new samples, two old ones: P[new, old] = [[1, 0.5], [0.5, 0]] -> 0.5.
    p = np.array([[0.5, 0.3, 1.0, 0.5], [0.7, 0.5, 0.5, 0.0], [0.0, 0.5, 0.5, 0.5], [0.5, 1.0, 0.5, 0.5]])
    pairs = compare([p, p.T * 0 + 0.5], [[3, 5, 1, 2], [1, 1, 1, 1]], slice(0, 2), slice(2, 4))
    assert pairs.per_prompt.tolist() == [0.5, 0.5]
    assert pairs.probs[0].tolist() == [1.0, 0.5, 0.5, 0.0]
    assert pairs.length_diffs.tolist() == [[2, 1, 4, 3], [0, 0, 0, 0]]


def test_win_rates_of_a_rule_judged_prompt():
    new, old = ["clean words", "more words"], ["\x01\x02\x03", "\ufffd\ufffd"]
    p = rule_win_matrix(new + old, RuleJudgeConfig())
    lengths = [[len(c) for c in new + old]]
    assert compare([p], lengths, slice(0, 2), slice(2, 4)).per_prompt[0] > 0.99
    assert compare([p], lengths, slice(2, 4), slice(0, 2)).per_prompt[0] < 0.01


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
    assert response_length_metrics("base_", [["ab", "abcd"], ["abc", "abc"]], [[1, 2], [2, 3]]) == {
        "eval/base_mean_response_chars": 3.0, "eval/base_mean_response_tokens": 2.0}


# ---------------------------------------------------------------- length control, synthetic judgments

PROMPTS, K = 200, 4
FAST = EvalConfig(bootstrap_samples=200)  # the intervals' resampling, cut to keep each test to seconds


def synthetic_lengths(seed: int = 0):
    """Answers padded or cut at random: pi_t's 1200 characters on average, pi_0's 1000, so that the
    pairs' length differences d are centred at +200 characters with a spread of 300. Returns
    (pi_t's lengths, pi_0's lengths, d per prompt and pair)."""
    rng = np.random.default_rng(seed)
    new = rng.normal(1200.0, 300.0 / np.sqrt(2), (PROMPTS, K))
    base = rng.normal(1000.0, 300.0 / np.sqrt(2), (PROMPTS, K))
    return new, base, (new[:, :, None] - base[:, None, :]).reshape(PROMPTS, K * K)


def pure_length() -> Comparison:
    """Identical content; the judge's log-odds are d / 100 and see nothing else."""
    d = synthetic_lengths()[2]
    return Comparison(expit(d / 100.0), d)


def pure_quality() -> Comparison:
    """pi_t is better on 70% of the prompts, whatever the lengths, and the judge sees only that."""
    d = synthetic_lengths()[2]
    better = np.zeros(PROMPTS)
    better[np.random.default_rng(1).permutation(PROMPTS)[: int(0.7 * PROMPTS)]] = 1.0
    return Comparison(np.repeat(better[:, None], K * K, axis=1), d)


def test_the_fit_is_scikit_learns_soft_label_logistic_regression():
    """The same model as scikit-learn's LogisticRegression on each pair twice (won with weight p,
    lost with 1 - p), the constant column the only intercept, the same L2 penalty."""
    from sklearn.linear_model import LogisticRegression

    from sppo.evaluation import LENGTH_FIT_L2, length_controlled_fit

    rng = np.random.default_rng(3)
    diffs = rng.normal(80.0, 150.0, 400)
    probs = expit(0.4 + 1.2 * np.tanh(diffs / diffs.std()) + rng.normal(0.0, 0.5, 400))
    features = np.column_stack([np.ones_like(diffs), np.tanh(diffs / diffs.std())])
    reference = LogisticRegression(C=1.0 / (LENGTH_FIT_L2 * probs.size), fit_intercept=False,
                                   solver="newton-cholesky", tol=1e-10, max_iter=100)
    reference.fit(np.vstack([features, features]), np.r_[np.ones(400), np.zeros(400)],
                  sample_weight=np.r_[probs, 1.0 - probs])
    fit = length_controlled_fit(probs, diffs)
    assert fit.win_rate == pytest.approx(expit(reference.coef_[0][0]), abs=1e-7)
    assert fit.length_coef == pytest.approx(reference.coef_[0][1], abs=1e-6)


def test_pure_length_bias_is_controlled_away():
    d = pure_length().length_diffs
    assert d.mean() == pytest.approx(200, abs=15) and d.std() == pytest.approx(300, abs=15)
    result = judge_comparison(pure_length(), FAST)
    print(f"pure length: raw {result.raw}, LC {result.length_controlled}, phi {result.fit.length_coef:.2f}")
    assert result.raw.mean > 0.70
    assert result.length_controlled.mean == pytest.approx(0.50, abs=0.05)
    assert result.fit.length_coef > 1.0 and not result.fit.extrapolated


def test_pure_quality_survives_length_control():
    result = judge_comparison(pure_quality(), FAST)
    print(f"pure quality: raw {result.raw}, LC {result.length_controlled}, phi {result.fit.length_coef:.2f}")
    assert result.raw.mean == pytest.approx(0.70, abs=0.04)
    assert result.length_controlled.mean == pytest.approx(0.70, abs=0.04)


def test_quality_and_length_together_leave_the_quality():
    d = synthetic_lengths()[2]
    result = judge_comparison(Comparison(expit(logit(0.6) + 1.5 * np.tanh(d / d.std())), d), FAST)
    print(f"quality and length: raw {result.raw}, LC {result.length_controlled}, phi {result.fit.length_coef:.2f}")
    assert result.length_controlled.mean == pytest.approx(0.60, abs=0.04)
    assert result.raw.mean >= 0.68
    assert result.fit.length_coef == pytest.approx(1.5, abs=0.1)


def test_swapping_the_policies_gives_one_minus_and_identical_texts_one_half():
    pairs = pure_length()
    forward = judge_comparison(pairs, FAST)
    backward = judge_comparison(Comparison(1.0 - pairs.probs, -pairs.length_diffs), FAST)
    assert backward.length_controlled.mean == pytest.approx(1.0 - forward.length_controlled.mean, abs=1e-6)
    assert backward.length_controlled.low == pytest.approx(1.0 - forward.length_controlled.high, abs=1e-6)
    assert backward.raw.mean == pytest.approx(1.0 - forward.raw.mean, abs=1e-12)
    # Each policy's samples judged against the same texts: every P is 0.5 and every d is 0.
    texts = [f"answer {n} " * n for n in range(1, 4)]
    same = compare([rule_win_matrix(texts + texts, RuleJudgeConfig())] * 5, [[len(c) for c in texts * 2]] * 5,
                   slice(0, 3), slice(3, 6))
    identical = judge_comparison(same, FAST)
    assert (identical.length_controlled.mean, identical.length_controlled.low, identical.length_controlled.high) == (
        0.5, 0.5, 0.5)
    assert identical.raw.mean == 0.5


def test_one_sided_and_equal_length_differences_are_flagged_and_said():
    rng = np.random.default_rng(3)
    d = rng.uniform(10, 400, (50, 4))  # pi_t's answers always longer: equal length is outside the data
    one_sided = length_controlled_fit(expit(d / 100.0), d)
    assert one_sided.extrapolated and one_sided.length_sd > 0
    constant = length_controlled_fit(np.full((50, 4), 0.8), np.full((50, 4), 25.0))
    assert (constant.win_rate, constant.length_sd, constant.length_coef) == (pytest.approx(0.8), 0.0, 0.0)
    metrics = {**length_difference_metrics("vs_base", one_sided), **length_difference_metrics("vs_prev", constant)}
    assert metrics["eval/lc_extrapolated_vs_base"] == 1.0 and metrics["eval/lc_no_length_spread_vs_prev"] == 1.0
    notes = length_notes(metrics)
    assert len(notes) == 2 and "extrapolates to equal length" in notes[0] and "is the raw one" in notes[1]
    pairs = pure_length()
    assert length_notes(length_difference_metrics("vs_base", length_controlled_fit(pairs.probs,
                                                                                   pairs.length_diffs))) == []


def length_metrics(result, new_chars: float, base_chars: float) -> dict[str, float]:
    return {**comparison_metrics("vs_base", result), "eval/mean_response_chars": new_chars,
            "eval/base_mean_response_chars": base_chars}


def test_the_length_warning_fires_on_pure_length_and_not_on_pure_quality():
    new, base, _ = synthetic_lengths()
    warning = length_gain_warning(length_metrics(judge_comparison(pure_length(), FAST), new.mean(), base.mean()))
    print(f"pure length: {warning}")
    assert warning.startswith("the gain over the base is mostly length: by the evaluation judge, win rate 0.71")
    assert warning.endswith(f"with answers of {new.mean():.0f} characters against the base's {base.mean():.0f}")
    assert length_gain_warning(length_metrics(judge_comparison(pure_quality(), FAST), new.mean(), base.mean())) is None
    # The same judgments with answers no longer than the base's: not length.
    assert length_gain_warning(length_metrics(judge_comparison(pure_length(), FAST), 1000.0, 1000.0)) is None


# ---------------------------------------------------------------- the champion


def rated(lc: float, low: float, high: float) -> dict[str, float]:
    return {"eval/lc_win_rate_vs_base": lc, "eval/lc_win_rate_vs_base_ci_low": low,
            "eval/lc_win_rate_vs_base_ci_high": high}


def test_the_champion_has_the_highest_lc_win_rate_whose_interval_lies_above_one_half():
    # Iteration 3's LC is highest but its interval reaches below 0.5: iteration 2 is the champion.
    metrics = {1: rated(0.55, 0.51, 0.59), 2: rated(0.60, 0.52, 0.68), 3: rated(0.62, 0.45, 0.79)}
    champion = choose_champion(metrics)
    assert champion.iteration == 2
    assert champion.reason == ("iteration 2 has the highest length-controlled win rate vs the base, 0.600 [0.52, "
                               "0.68], of the iterations whose interval lies above 0.5")
    assert choose_champion({**metrics, 4: rated(0.60, 0.55, 0.65)}).iteration == 2  # the earliest of equals


def test_no_champion_while_no_interval_lies_above_one_half_and_unrated_iterations_are_said():
    none = choose_champion({1: rated(0.52, 0.47, 0.57), 2: {"eval/win_rate_vs_base": 0.9}, 3: rated(0.50, 0.5, 0.5)})
    assert none.iteration is None
    assert none.reason.startswith("no iteration's length-controlled win rate vs the base has its interval above "
                                  "0.5 (the highest: iteration 1, 0.520 [0.47, 0.57])")
    assert "iteration(s) 2 have no length-controlled win rate" in none.reason
    assert choose_champion({1: {}}).iteration is None
    assert choose_champion({}).reason == "no iteration has a length-controlled win rate vs the base"


# ---------------------------------------------------------------- the stage, samples already drawn


def _drawn(tmp_path, prompts):
    """Every policy's held-out samples of iteration 2 on disk: pi_2 clean text, pi_1 half clean,
    pi_0 noise; so no engine starts."""
    from sppo.run_directory import RunDirectory

    drawn = {0: ["\x01\x02", "\ufffd!"], 1: ["words", "\x01\x02"], 2: ["words here", "more words"]}
    run = RunDirectory(tmp_path)
    for g, cands in drawn.items():
        run.write_rows(run.iteration(g).eval_samples, [{"prompt": p, "candidates": cands} for p in prompts])
    return run


def test_evaluate_judges_new_against_previous_and_base_samples_already_drawn(tmp_path, tiny_policy_dir):
    from transformers import AutoTokenizer

    from sppo.config import load_config
    from sppo.evaluation import evaluate
    from sppo.sampling import EnginePool

    cfg = load_config("configs/tiny.yaml", {"output_dir": str(tmp_path), "sampling.k": 2,
                                            "eval.bootstrap_samples": 100})
    prompts = ["p1", "p2", "p3"]
    run = _drawn(tmp_path, prompts)
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy_dir)
    engines = EnginePool(cfg.sampling)  # every policy's samples exist: no engine starts
    policies = {0: "unused", 1: "unused", 2: "unused"}
    rows, metrics = evaluate(cfg, run, 2, policies, prompts, engines, tokenizer)
    assert metrics["eval/win_rate_vs_base"] > 0.99 and metrics["eval/lc_win_rate_vs_base"] > 0.99
    assert 0.7 < metrics["eval/win_rate_vs_prev"] < 0.8  # ties with "words", beats the noise
    assert metrics["eval/mean_response_chars"] == 10.0 and metrics["eval/base_mean_response_chars"] == 2.0
    assert metrics["eval/prev_mean_response_chars"] == 3.5 and metrics["eval/prompts"] == 3
    assert metrics["eval/mean_response_tokens"] > metrics["eval/base_mean_response_tokens"] > 0
    assert metrics["evaluation/engine_starts"] == 0
    assert {"eval/length_coef_vs_base", "eval/lc_win_rate_vs_prev_ci_low", "eval/lc_extrapolated_vs_base",
            "eval/length_diff_sd_vs_prev"} <= set(metrics)
    assert not any(key.startswith("eval/training_judge/") for key in metrics)  # one judge: the training one
    assert rows[0]["policies"] == [2, 2, 1, 1, 0, 0] and len(rows[0]["win_matrix"]) == 6
    # Redone (a killed driver, a resumed job), the same samples give the same metrics, to the bit.
    assert evaluate(cfg, run, 2, policies, prompts, engines, tokenizer) == (rows, metrics)
    # Samples of other prompts are not silently reused.
    with pytest.raises(ValueError, match="not the current held-out prompts"):
        evaluate(cfg, run, 2, policies, ["other"], engines, tokenizer)


@pytest.mark.slow
def test_held_out_samples_are_drawn_again_only_when_their_seed_or_settings_changed(ray_cluster, tmp_path,
                                                                                   tiny_policy_dir):
    """An evaluation redone with another eval.seed (a re-graded run) draws pi_0's and pi_t's held-out
    samples again with it, on a real engine; redone with the same settings it reuses them as
    published; samples published before the settings were recorded are reused too."""
    from transformers import AutoTokenizer

    from sppo.config import load_config
    from sppo.evaluation import evaluate
    from sppo.policy import Policy
    from sppo.run_directory import RunDirectory
    from sppo.sampling import EnginePool

    def run_with(**overrides):
        return load_config("configs/tiny.yaml", {"output_dir": str(tmp_path), "sampling.k": 2, "sampling.max_tokens": 8,
                                                 "eval.bootstrap_samples": 50, **overrides})

    prompts, run = ["Say hi.", "Name a colour.", "Count to three."], RunDirectory(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy_dir)
    policies = {0: Policy(tiny_policy_dir), 1: Policy(tiny_policy_dir)}
    samples = [run.iteration(g).eval_samples for g in (0, 1)]

    def drawn():
        return [(path.stat().st_mtime_ns, read_parquet(path)) for path in samples]

    with EnginePool(run_with().sampling) as engines:
        evaluate(run_with(), run, 1, policies, prompts, engines, tokenizer)
        first = drawn()
        assert json.loads(first[0][1][0]["drawn_with"])["seed"] == 0  # eval.seed + 1000 g
        assert json.loads(first[1][1][0]["drawn_with"])["seed"] == 1000
        evaluate(run_with(), run, 1, policies, prompts, engines, tokenizer)
        assert drawn() == first  # the same settings: nothing drawn
        evaluate(run_with(**{"eval.seed": 7}), run, 1, policies, prompts, engines, tokenizer)
        again = drawn()
        assert [json.loads(rows[0]["drawn_with"])["seed"] for _, rows in again] == [7, 1007]
        assert all(a[0] != b[0] for a, b in zip(again, first))
        assert [r["candidates"] for r in again[0][1]] != [r["candidates"] for r in first[0][1]]
        # Published without their settings (before they were recorded): taken as they are.
        run.write_rows(samples[0], [{"prompt": p, "candidates": ["x", "y"]} for p in prompts])
        legacy = drawn()[0]
        evaluate(run_with(), run, 1, policies, prompts, engines, tokenizer)
        assert drawn()[0] == legacy


def test_an_evaluation_judge_of_its_own_grades_beside_the_training_judge(tmp_path, tiny_policy_dir):
    from transformers import AutoTokenizer

    from sppo.config import load_config
    from sppo.evaluation import evaluate
    from sppo.sampling import EnginePool

    # The training judge pays for length; the evaluation judge, letters only, does not.
    cfg = load_config("configs/tiny.yaml", {"output_dir": str(tmp_path), "sampling.k": 2,
                                            "eval.bootstrap_samples": 100, "eval.judge.kind": "rule",
                                            "judge.rule.weights": {"letters": 1.0, "length": 20.0}})
    prompts = ["p1", "p2", "p3"]
    rows, metrics = evaluate(cfg, _drawn(tmp_path, prompts), 2, {0: "", 1: "", 2: ""}, prompts,
                             EnginePool(cfg.sampling), AutoTokenizer.from_pretrained(tiny_policy_dir))
    for prefix in ("eval/", "eval/training_judge/"):
        assert {f"{prefix}{name}" for name in ("win_rate_vs_base", "lc_win_rate_vs_base", "win_rate_vs_prev",
                                               "lc_win_rate_vs_prev", "length_coef_vs_base")} <= set(metrics)
    # pi_2's answers tie with pi_1's "words" on letters, but the training judge pays for their length.
    assert metrics["eval/win_rate_vs_prev"] == pytest.approx(0.75, abs=0.01)
    assert metrics["eval/training_judge/win_rate_vs_prev"] > 0.95
    assert len(rows[0]["training_judge_win_matrix"]) == 6 and "training_judge_win_rate_vs_base" in rows[0]
