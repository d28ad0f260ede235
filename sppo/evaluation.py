"""Evaluation stage: is pi_t better than the base policy pi_0 and than pi_{t-1}?

On the held-out prompts (prompts.eval_size / prompts.eval_split, never trained on), K samples
per prompt from pi_t are judged together with pi_{t-1}'s and pi_0's by the configured judge,
in one K*g x K*g win matrix per prompt (g = 2 at t = 1, where pi_{t-1} is pi_0, else 3). A
prompt's win rate against a policy is the mean of the block P[new, other]: the probability that
a sample of pi_t beats a sample of the other policy. The run's win rate is the mean over prompts,
with a percentile bootstrap interval over prompts.

Each policy's samples are drawn once: pi_t's (`iter-t/eval_samples.parquet`) serve as pi_{t-1}'s
in the next iteration, and pi_0's lie in `iter-0/`.

- Pure core: `block_win_rates`, `bootstrap_interval`, `win_rate_metrics`, `response_length_metrics`.
- `evaluate`: the stage, with the job's vLLM engines (sppo.sampling.EnginePool) and the judge
  (sppo.judging.JUDGES). Policies are sampled oldest first: the engines still hold pi_{t-1}
  (or pi_0) from this iteration's sampling, so each iteration loads new weights once, for pi_t,
  and the next iteration samples from them without another load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from sppo.config import EvalConfig, RunConfig
from sppo.roles import run_roles
from sppo.run_directory import IterationDir, RunDirectory
from sppo.sampling import EnginePool
from sppo.storage import read_parquet

log = logging.getLogger("sppo.evaluation")


# ---------------------------------------------------------------- pure core


def block_win_rates(matrices: list[np.ndarray], new: slice, other: slice) -> np.ndarray:
    """Per prompt, mean P[i][j] over i in `new`, j in `other`: P(a `new` sample beats an `other` one)."""
    return np.array([float(np.asarray(m, dtype=np.float64)[new, other].mean()) for m in matrices])


def bootstrap_interval(values: np.ndarray, confidence: float, samples: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampled with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("bootstrap_interval: no values")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(samples, values.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class WinRate:
    mean: float
    low: float
    high: float


def win_rate(per_prompt: np.ndarray, cfg: EvalConfig) -> WinRate:
    low, high = bootstrap_interval(per_prompt, cfg.confidence, cfg.bootstrap_samples, cfg.seed)
    return WinRate(float(np.mean(per_prompt)), low, high)


def win_rate_metrics(name: str, rate: WinRate) -> dict[str, float]:
    return {f"eval/{name}": rate.mean, f"eval/{name}_ci_low": rate.low, f"eval/{name}_ci_high": rate.high}


def response_length_metrics(candidates: list[list[str]]) -> dict[str, float]:
    return {
        "eval/prompts": len(candidates),
        "eval/mean_response_chars": float(np.mean([len(c) for cands in candidates for c in cands])),
    }


# ---------------------------------------------------------------- the stage


def ensure_eval_samples(it: IterationDir, engines: EnginePool, policy: str, prompts: list[str], seed: int) -> list[dict]:
    """The held-out samples of iteration it's policy, drawn from `policy` when not yet published."""
    path = it.eval_samples
    if not path.exists():
        samples = engines.sample(policy, prompts, seed=seed)
        it.run.write_rows(path, [{"prompt": p, "candidates": c} for p, c in zip(prompts, samples.candidates)])
    rows = read_parquet(path)
    if [r["prompt"] for r in rows] != prompts:
        raise ValueError(f"{path}: its prompts are not the current held-out prompts (prompts.eval_*)")
    return rows


def evaluate(cfg: RunConfig, run: RunDirectory, t: int, policies: dict[int, str], judge: str, prompts: list[str],
             engines: EnginePool):
    """Judge pi_t's held-out samples against pi_{t-1}'s and pi_0's; `policies` maps 0, t-1 and t
    to their model directories. Returns the judgment rows and the iteration's eval metrics."""
    from sppo.judging import JUDGES

    k = cfg.sampling.k
    starts_before = engines.starts
    rows = {g: ensure_eval_samples(run.iteration(g), engines, policies[g], prompts, seed=cfg.eval.seed + 1000 * g)
            for g in sorted({0, t - 1, t})}
    groups = sorted(rows, reverse=True)  # new first in the matrix: t, t-1, 0
    combined = [[c for g in groups for c in rows[g][n]["candidates"]] for n in range(len(prompts))]
    matrices = JUDGES[cfg.judge.kind](judge, prompts, combined, cfg.judge, run_roles(cfg).judging)
    new = slice(0, k)
    prev, base = slice(k, 2 * k), slice((len(groups) - 1) * k, len(groups) * k)
    vs_base = block_win_rates(matrices, new, base)
    vs_prev = block_win_rates(matrices, new, prev)
    metrics = {
        **win_rate_metrics("win_rate_vs_base", win_rate(vs_base, cfg.eval)),
        **win_rate_metrics("win_rate_vs_prev", win_rate(vs_prev, cfg.eval)),
        **response_length_metrics([r["candidates"] for r in rows[t]]),
        "evaluation/engine_starts": engines.starts - starts_before,
    }
    judged = [{"prompt": p, "candidates": c, "policies": [g for g in groups for _ in range(k)],
               "win_matrix": np.asarray(m).tolist(), "win_rate_vs_base": b, "win_rate_vs_prev": v}
              for p, c, m, b, v in zip(prompts, combined, matrices, vs_base.tolist(), vs_prev.tolist())]
    return judged, metrics
