"""What every judge shares: the input check, and the Ray shell of the model-based judges (one
actor per judging call, killed afterwards so that training can have its CPUs/GPUs)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from sppo.cluster import NodeWatch, wait_for_all
from sppo.config import JudgeConfig

log = logging.getLogger("sppo.judging")


def check_inputs(prompts: list[str], candidates: list[list[str]]) -> None:
    if len(prompts) != len(candidates):
        raise ValueError(f"judging: {len(prompts)} prompts but {len(candidates)} candidate lists")
    for n, cands in enumerate(candidates):
        if len(cands) < 2:
            raise ValueError(f"judging: prompt {n} has {len(cands)} candidates; a win matrix needs at least 2")


def judge_in_actor(judge_cls: type, role: str, model_dir: str, prompts: list[str], candidates: list[list[str]],
                   cfg: JudgeConfig, timeout_s: float | None, work: str,
                   node_lost_s: float | None = None) -> list[np.ndarray]:
    """`judge_cls(model_dir, cfg).win_matrices(prompts, candidates)` in a Ray actor.

    role names the judge in errors ("PairRM"); work is what it judges, for messages ("120 pairs").
    node_lost_s: fail that long after a node the stage began with leaves, as `wait_for_all` does.
    """
    import ray

    log.info("judging %d prompts (%s) with %s %s", len(prompts), work, role, model_dir)
    start = time.monotonic()
    watch = NodeWatch("judging", node_lost_s) if node_lost_s is not None else None
    # A crashed judge is restarted and the judging call retried on it: results replace, never add.
    actor = ray.remote(judge_cls).options(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
                                          max_restarts=cfg.max_restarts, max_task_retries=cfg.max_restarts)
    judge = actor.remote(model_dir, cfg)
    try:
        (matrices,) = wait_for_all(
            {judge.win_matrices.remote(prompts, candidates): role}, stage="judging", timeout_s=timeout_s,
            started=start, watch=watch,
            describe=lambda _: f"the {role} judge (num_cpus={cfg.num_cpus:g}, num_gpus={cfg.num_gpus:g}; {work})",
        ).values()
    finally:
        ray.kill(judge)
    log.info("judged %s in %.1f s (actor start included)", work, time.monotonic() - start)
    # ray.get may hand back read-only views of the object store; callers own their matrices.
    return [np.array(m) for m in matrices]


def actor_judge(judge_cls: type, role: str, work: Callable[[list[list[str]]], str]) -> Callable[..., list[np.ndarray]]:
    """The judging stage's function (`sppo.judging.JUDGES`) for a model judge run in an actor;
    `work(candidates)` describes the job for messages, e.g. "120 ordered pairs"."""

    def judge_candidates(model_dir: str, prompts: list[str], candidates: list[list[str]], cfg: JudgeConfig,
                         timeout_s: float | None = None, node_lost_s: float | None = None) -> list[np.ndarray]:
        check_inputs(prompts, candidates)
        return judge_in_actor(judge_cls, role, model_dir, prompts, candidates, cfg, timeout_s, work(candidates),
                              node_lost_s)

    return judge_candidates
