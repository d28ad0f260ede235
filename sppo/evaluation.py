"""Evaluation stage: is pi_t better than the base policy pi_0 and than pi_{t-1}, at equal length too?

On the held-out prompts (prompts.eval_size / prompts.eval_split, never trained on), K samples
per prompt from pi_t are judged together with pi_{t-1}'s and pi_0's, in one K*g x K*g win matrix
per prompt (g = 2 at t = 1, where pi_{t-1} is pi_0, else 3). A prompt's win rate against a policy
is the mean of the block P[new, other]: the probability that a sample of pi_t beats a sample of
the other policy. The run's win rate is the mean over prompts, with a percentile bootstrap
interval over prompts.

Length control. Judges prefer longer answers (PairRM included), and preference optimisation
learns that, so a raw win rate rises as answers grow. Each pair (a sample of pi_t, one of the
other policy) gives the judge's probability p and the length difference d in characters; the
logistic model logit(p) = theta + phi * tanh(d / s), s the standard deviation of d over the
pairs, is fitted to the soft labels p with a small L2 penalty (scipy), and sigmoid(theta),
the win rate at equal length, is the length-controlled (LC) win rate, as AlpacaEval 2 reports it.
Its interval refits the model on the raw win rate's bootstrap resamples of prompts. Where nearly
all length differences have one sign, LC extrapolates to d = 0; where s is 0 there is nothing to
control for and LC is the raw win rate: both are logged as metrics.

The evaluation judge (eval.judge; the training judge unless set) grades the comparisons, its
metrics named eval/...; where eval.judge is another judge, the training judge grades them too,
its metrics named eval/training_judge/....

Each policy's samples are drawn once: pi_t's (`iter-t/eval_samples.parquet`) serve as pi_{t-1}'s
in the next iteration, and pi_0's lie in `iter-0/`; each row records the seed and sampling
settings it was drawn with, and samples drawn with other ones are drawn again.

- Pure core: `compare`, `bootstrap_interval`, `length_controlled_fit`, `judge_comparison` and the
  metric names; from the metrics of every iteration, `length_gain_warning` (a gain over the base
  that is mostly length) and `choose_champion` (the iteration to keep).
- `evaluate`: the stage, with the job's vLLM engines (sppo.sampling.EnginePool) and the judges
  (sppo.judging.JUDGES). Policies are sampled oldest first: the engines still hold pi_{t-1}
  (or pi_0) from this iteration's sampling, so each iteration loads new weights once, for pi_t,
  and the next iteration samples from them without another load.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from sppo.config import EvalConfig, JudgeConfig, RunConfig, SamplingConfig
from sppo.policy import Policy
from sppo.roles import Role, eval_judging_role, own_eval_judge, run_roles
from sppo.run_directory import IterationDir, RunDirectory
from sppo.sampling import EnginePool, sampling_params_kwargs
from sppo.storage import read_parquet

log = logging.getLogger("sppo.evaluation")

# Metric prefixes: the evaluation judge's, and the training judge's where eval.judge is another.
EVAL_JUDGE, TRAINING_JUDGE = "eval/", "eval/training_judge/"
# The length-controlled fit's L2 penalty on (theta, phi), per pair: it keeps phi finite where
# length separates the judgments (0/1 labels, e.g. the rule judge's), and moves a fit on data
# by well under 0.01 in log-odds.
LENGTH_FIT_L2 = 1e-3
# When at least this share of the pairs' length differences have one sign, d = 0 lies outside
# the data: the length-controlled win rate extrapolates to it.
ONE_SIDED_SHARE = 0.95


# ---------------------------------------------------------------- pure core


@dataclass(frozen=True)
class Comparison:
    """pi_t's held-out samples against another policy's: per prompt (rows), per pair of a new and
    an other sample (columns), the judge's P(new beats other) and len(new) - len(other) in characters."""

    probs: np.ndarray
    length_diffs: np.ndarray

    @property
    def per_prompt(self) -> np.ndarray:
        """Each prompt's win rate: the mean of its block P[new, other]."""
        return self.probs.mean(axis=1)


def compare(matrices: list[np.ndarray], lengths: list[list[int]], new: slice, other: slice) -> Comparison:
    """The pairs of block P[new, other] of each prompt's win matrix; lengths: each candidate's characters."""
    probs = [np.asarray(m, dtype=np.float64)[new, other].reshape(-1) for m in matrices]
    diffs = [(np.asarray(n, dtype=np.float64)[new, None] - np.asarray(n, dtype=np.float64)[None, other]).reshape(-1)
             for n in lengths]
    return Comparison(np.stack(probs), np.stack(diffs))


def bootstrap_resamples(n: int, samples: int, seed: int) -> np.ndarray:
    """`samples` resamples with replacement of n prompts, as rows of prompt indices."""
    if n == 0:
        raise ValueError("bootstrap: no values to resample")
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def percentile_interval(estimates: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(estimates, [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap_interval(values: np.ndarray, confidence: float, samples: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampled with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    means = values[bootstrap_resamples(values.size, samples, seed)].mean(axis=1)
    return percentile_interval(means, confidence)


@dataclass(frozen=True)
class WinRate:
    mean: float
    low: float
    high: float


def win_rate(per_prompt: np.ndarray, cfg: EvalConfig) -> WinRate:
    low, high = bootstrap_interval(per_prompt, cfg.confidence, cfg.bootstrap_samples, cfg.seed)
    return WinRate(float(np.mean(per_prompt)), low, high)


def win_rate_metrics(name: str, rate: WinRate, prefix: str = EVAL_JUDGE) -> dict[str, float]:
    return {f"{prefix}{name}": rate.mean, f"{prefix}{name}_ci_low": rate.low, f"{prefix}{name}_ci_high": rate.high}


@dataclass(frozen=True)
class LengthFit:
    """logit(p) = theta + phi * tanh(d / s) fitted to pairs: win_rate = sigmoid(theta) (at equal
    length), length_coef = phi, length_sd = s; extrapolated: ONE_SIDED_SHARE or more of the
    length differences have one sign."""

    win_rate: float
    length_coef: float
    length_sd: float
    extrapolated: bool


def length_controlled_fit(probs: np.ndarray, diffs: np.ndarray) -> LengthFit:
    """The length-controlled win rate of pairs with judge probabilities `probs` and length
    differences `diffs`; with no spread in the lengths (s = 0), the raw win rate."""
    probs, diffs = np.ravel(probs).astype(np.float64), np.ravel(diffs).astype(np.float64)
    scale = float(np.std(diffs))
    extrapolated = max(np.mean(diffs > 0), np.mean(diffs < 0)) >= ONE_SIDED_SHARE
    if scale == 0.0:
        return LengthFit(float(np.mean(probs)), 0.0, 0.0, bool(extrapolated))
    from scipy.optimize import minimize
    from scipy.special import log_expit

    # Soft-label logistic regression: theta is the coefficient of a constant column, the only
    # intercept; L2 penalty LENGTH_FIT_L2 per pair. scipy's trust-region Newton with the exact
    # gradient and Hessian of two coefficients: the bootstrap refits it eval.bootstrap_samples
    # times a comparison, and scikit-learn's LogisticRegression, which gives the same fit
    # (tests/test_evaluation.py), spends ~15x as long per call on its checks.
    features = np.column_stack([np.ones_like(diffs), np.tanh(diffs / scale)])
    l2 = LENGTH_FIT_L2 * probs.size

    def loss_and_gradient(coef: np.ndarray) -> tuple[float, np.ndarray]:
        logits = features @ coef
        loss = -(probs * log_expit(logits) + (1.0 - probs) * log_expit(-logits)).sum() + 0.5 * l2 * coef @ coef
        return loss, features.T @ (expit(logits) - probs) + l2 * coef

    def hessian(coef: np.ndarray) -> np.ndarray:
        won = expit(features @ coef)
        return (features * (won * (1.0 - won))[:, None]).T @ features + l2 * np.eye(2)

    theta, phi = minimize(loss_and_gradient, np.zeros(2), jac=True, hess=hessian, method="trust-exact",
                          options={"gtol": 1e-10}).x
    return LengthFit(float(expit(theta)), float(phi), scale, bool(extrapolated))


@dataclass(frozen=True)
class ComparisonResult:
    raw: WinRate
    length_controlled: WinRate
    fit: LengthFit


def judge_comparison(comparison: Comparison, cfg: EvalConfig) -> ComparisonResult:
    """Raw and length-controlled win rates, each with its interval over the same bootstrap
    resamples of prompts (eval.seed, eval.bootstrap_samples)."""
    resamples = bootstrap_resamples(len(comparison.probs), cfg.bootstrap_samples, cfg.seed)
    fit = length_controlled_fit(comparison.probs, comparison.length_diffs)
    refits = [length_controlled_fit(comparison.probs[rows], comparison.length_diffs[rows]).win_rate
              for rows in resamples]
    return ComparisonResult(win_rate(comparison.per_prompt, cfg),
                            WinRate(fit.win_rate, *percentile_interval(np.array(refits), cfg.confidence)), fit)


def comparison_metrics(name: str, result: ComparisonResult, prefix: str = EVAL_JUDGE) -> dict[str, float]:
    """A judge's metrics of one comparison (name: vs_base or vs_prev)."""
    return {**win_rate_metrics(f"win_rate_{name}", result.raw, prefix),
            **win_rate_metrics(f"lc_win_rate_{name}", result.length_controlled, prefix),
            f"{prefix}length_coef_{name}": result.fit.length_coef}


def length_difference_metrics(name: str, fit: LengthFit) -> dict[str, float]:
    """What the lengths alone say of a comparison's length control, whichever judge grades it."""
    return {f"eval/length_diff_sd_{name}": fit.length_sd,
            f"eval/lc_extrapolated_{name}": float(fit.extrapolated),
            f"eval/lc_no_length_spread_{name}": float(fit.length_sd == 0.0)}


def response_length_metrics(policy: str, candidates: list[list[str]], tokens: list[list[int]]) -> dict[str, float]:
    """Mean length of one policy's held-out samples; policy: "" for pi_t, "base_" or "prev_"."""
    return {f"eval/{policy}mean_response_chars": float(np.mean([len(c) for cands in candidates for c in cands])),
            f"eval/{policy}mean_response_tokens": float(np.mean([n for counts in tokens for n in counts]))}


def length_notes(metrics: Mapping[str, float]) -> list[str]:
    """One line for each comparison whose length control is an extrapolation or void."""
    notes = []
    for name, other in (("vs_base", "the base"), ("vs_prev", "the previous iteration")):
        if metrics.get(f"eval/lc_no_length_spread_{name}"):
            notes.append(f"vs {other}: every pair has the same length difference, so there is no length to control "
                         "for: the length-controlled win rate is the raw one")
        elif metrics.get(f"eval/lc_extrapolated_{name}"):
            notes.append(f"vs {other}: {ONE_SIDED_SHARE:.0%} or more of the pairs' length differences have one sign: "
                         "the length-controlled win rate extrapolates to equal length")
    return notes


def rate_text(metrics: Mapping[str, float], key: str) -> str:
    """'0.712 [0.66, 0.76]': a logged win rate (key: its metric name) with its interval; '-' if not logged."""
    if key not in metrics:
        return "-"
    return f"{metrics[key]:.3f} [{metrics[f'{key}_ci_low']:.2f}, {metrics[f'{key}_ci_high']:.2f}]"


def length_gain_warning(metrics: Mapping[str, float], prefix: str = EVAL_JUDGE) -> str | None:
    """The sentence saying that an iteration's gain over the base is mostly length, by the judge of
    `prefix`: the raw win rate's interval lies above 0.5 and above the length-controlled one's,
    more of the gain goes away at equal length than is left, and pi_t's answers are longer than
    pi_0's. None otherwise (or without the metrics)."""
    raw, lc = f"{prefix}win_rate_vs_base", f"{prefix}lc_win_rate_vs_base"
    new, base = metrics.get("eval/mean_response_chars"), metrics.get("eval/base_mean_response_chars")
    if lc not in metrics or raw not in metrics or new is None or base is None:
        return None
    low = metrics[f"{raw}_ci_low"]
    mostly_length = metrics[raw] - metrics[lc] > metrics[lc] - 0.5
    if not (low > 0.5 and low > metrics[f"{lc}_ci_high"] and mostly_length and new > base):
        return None
    judge = "the training judge" if prefix == TRAINING_JUDGE else "the evaluation judge"
    return (f"the gain over the base is mostly length: by {judge}, win rate {rate_text(metrics, raw)} but "
            f"{rate_text(metrics, lc)} at equal length, with answers of {new:.0f} characters against the base's "
            f"{base:.0f}")


def length_gain_warnings(metrics: Mapping[str, float]) -> list[str]:
    """`length_gain_warning` by each judge that graded the iteration."""
    return [w for prefix in (EVAL_JUDGE, TRAINING_JUDGE) if (w := length_gain_warning(metrics, prefix))]


LC_VS_BASE = "eval/lc_win_rate_vs_base"
# The registered model's alias of the run's champion (tracking.register_model).
CHAMPION_ALIAS = "champion"


@dataclass(frozen=True)
class Champion:
    """The iteration to keep (None: none qualifies), and why, in a sentence."""

    iteration: int | None
    reason: str


def choose_champion(metrics: Mapping[int, Mapping[str, float]]) -> Champion:
    """Of the iterations whose length-controlled win rate vs the base (by the evaluation judge)
    has its interval above 0.5, the one where it is highest (the earliest of equals)."""
    rated = {t: m for t, m in sorted(metrics.items()) if LC_VS_BASE in m}
    unrated = sorted(set(metrics) - set(rated))
    aside = (f"; iteration(s) {', '.join(map(str, unrated))} have no length-controlled win rate (no held-out "
             "evaluation, or one from before sppo computed it) and are not candidates") if unrated else ""
    if not rated:
        return Champion(None, "no iteration has a length-controlled win rate vs the base" + aside)

    def highest(iterations) -> int:
        return max(iterations, key=lambda t: (rated[t][LC_VS_BASE], -t))

    qualified = [t for t, m in rated.items() if m[f"{LC_VS_BASE}_ci_low"] > 0.5]
    if qualified:
        best = highest(qualified)
        return Champion(best, f"iteration {best} has the highest length-controlled win rate vs the base, "
                              f"{rate_text(rated[best], LC_VS_BASE)}, of the iterations whose interval lies above "
                              f"0.5{aside}")
    best = highest(rated)
    return Champion(None, "no iteration's length-controlled win rate vs the base has its interval above 0.5 (the "
                          f"highest: iteration {best}, {rate_text(rated[best], LC_VS_BASE)}){aside}")


# ---------------------------------------------------------------- the stage


def drawn_with(cfg: SamplingConfig, seed: int) -> str:
    """What held-out samples are drawn with besides their policy and prompts, as they record it."""
    return json.dumps({"seed": seed, "dtype": cfg.dtype, "max_model_len": cfg.max_model_len,
                       **sampling_params_kwargs(cfg)}, sort_keys=True)


def ensure_eval_samples(it: IterationDir, engines: EnginePool, policy: Policy, prompts: list[str], seed: int) -> list[dict]:
    """The held-out samples of iteration it's policy, drawn from `policy` unless published with
    the same seed and sampling settings (an evaluation redone with another eval.seed, or the base's
    samples after a sampling field changed, draws them again). Samples published before the
    settings were recorded with them are taken as they are."""
    path = it.eval_samples
    settings = drawn_with(engines.cfg, seed)
    rows = read_parquet(path) if path.exists() else []
    stale = bool(rows) and rows[0].get("drawn_with", settings) != settings
    if stale:
        log.info("%s: drawn with other settings than %s: drawing them again", path, settings)
    if stale or not path.exists():
        samples = engines.sample(policy, prompts, seed=seed)
        rows = [{"prompt": p, "candidates": c, "drawn_with": settings} for p, c in zip(prompts, samples.candidates)]
        it.run.write_rows(path, rows)
    if [r["prompt"] for r in rows] != prompts:
        raise ValueError(f"{path}: its prompts are not the current held-out prompts (prompts.eval_*)")
    return rows


def evaluation_judges(cfg: RunConfig) -> list[tuple[str, JudgeConfig, Role]]:
    """(metric prefix, judge, role) of each judge that grades the held-out comparisons."""
    judging = run_roles(cfg).judging
    own = own_eval_judge(cfg)
    if own is None:
        return [(EVAL_JUDGE, cfg.judge, judging)]
    return [(EVAL_JUDGE, own, eval_judging_role(cfg)), (TRAINING_JUDGE, cfg.judge, judging)]


def token_counts(tokenizer, candidates: list[list[str]]) -> list[list[int]]:
    """Each candidate's length in the policy's tokens (as its text tokenizes, without special tokens)."""
    return [[len(ids) for ids in tokenizer(cands, add_special_tokens=False)["input_ids"]] for cands in candidates]


def evaluate(cfg: RunConfig, run: RunDirectory, t: int, policies: dict[int, Policy], prompts: list[str],
             engines: EnginePool, tokenizer):
    """Judge pi_t's held-out samples against pi_{t-1}'s and pi_0's; `policies` maps 0, t-1 and t
    to their model directories, `tokenizer` (the policy's) counts tokens. Returns the judgment
    rows and the iteration's eval metrics."""
    from sppo.judging import JUDGES

    k = cfg.sampling.k
    starts_before = engines.starts
    rows = {g: ensure_eval_samples(run.iteration(g), engines, policies[g], prompts, seed=cfg.eval.seed + 1000 * g)
            for g in sorted({0, t - 1, t})}
    groups = sorted(rows, reverse=True)  # new first in the matrix: t, t-1, 0
    combined = [[c for g in groups for c in rows[g][n]["candidates"]] for n in range(len(prompts))]
    chars = [[len(c) for c in cands] for cands in combined]
    new = slice(0, k)
    others = {"vs_base": slice((len(groups) - 1) * k, len(groups) * k), "vs_prev": slice(k, 2 * k)}
    metrics = {"eval/prompts": len(prompts), "evaluation/engine_starts": engines.starts - starts_before}
    for g, policy in ((t, ""), (0, "base_"), (t - 1, "prev_")):
        candidates = [r["candidates"] for r in rows[g]]
        metrics.update(response_length_metrics(policy, candidates, token_counts(tokenizer, candidates)))
    judged = [{"prompt": p, "candidates": c, "policies": [g for g in groups for _ in range(k)]}
              for p, c in zip(prompts, combined)]
    for prefix, judge, role in evaluation_judges(cfg):
        matrices = JUDGES[judge.kind](judge.model_path or "", prompts, combined, judge, role)
        comparisons = {name: compare(matrices, chars, new, other) for name, other in others.items()}
        results: dict[int, ComparisonResult] = {}  # by the other policy's block: at t = 1 both are pi_0's
        for name, other in others.items():
            if other.start not in results:
                results[other.start] = judge_comparison(comparisons[name], cfg.eval)
            metrics.update(comparison_metrics(name, results[other.start], prefix))
            metrics.update(length_difference_metrics(name, results[other.start].fit))
        column = "" if prefix == EVAL_JUDGE else "training_judge_"
        for n, (row, m) in enumerate(zip(judged, matrices)):
            row[f"{column}win_matrix"] = np.asarray(m).tolist()
            row.update({f"{column}win_rate_{name}": float(c.per_prompt[n]) for name, c in comparisons.items()})
    return judged, metrics
