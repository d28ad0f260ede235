"""What every judge shares: the input check, and the Ray shell of the model-based judges (one
actor per judging call, killed afterwards so that training can have its CPUs/GPUs)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from sppo.config import JudgeConfig
from sppo.roles import Role, judging_role

log = logging.getLogger("sppo.judging")


def check_inputs(prompts: list[str], candidates: list[list[str]]) -> None:
    if len(prompts) != len(candidates):
        raise ValueError(f"judging: {len(prompts)} prompts but {len(candidates)} candidate lists")
    for n, cands in enumerate(candidates):
        if len(cands) < 2:
            raise ValueError(f"judging: prompt {n} has {len(cands)} candidates; a win matrix needs at least 2")


def judge_in_actor(judge_cls: type, model_dir: str, prompts: list[str], candidates: list[list[str]],
                   cfg: JudgeConfig, role: Role, work: str) -> list[np.ndarray]:
    """`judge_cls(model_dir, cfg).win_matrices(prompts, candidates)` in one actor of the judging
    role (its resources, restarts and deadlines). work is what it judges, for messages ("120 pairs")."""
    import ray

    log.info("judging %d prompts (%s) with the %s %s", len(prompts), work, role.name, model_dir)
    start = time.monotonic()
    # A crashed judge is restarted and the judging call retried on it: results replace, never add.
    judge = ray.remote(judge_cls).options(**role.actor_options()).remote(model_dir, cfg)
    try:
        (matrices,) = role.wait({judge.win_matrices.remote(prompts, candidates): role.name}, started=start,
                                placement=role.actors_placement([judge]),
                                describe=lambda _: f"the {role.name} ({role.resources}; {work})").values()
    finally:
        ray.kill(judge)
    log.info("judged %s in %.1f s (actor start included)", work, time.monotonic() - start)
    # ray.get may hand back read-only views of the object store; callers own their matrices.
    return [np.array(m) for m in matrices]


def actor_judge(judge_cls: type, work: Callable[[list[list[str]]], str]) -> Callable[..., list[np.ndarray]]:
    """The judging stage's function (`sppo.judging.JUDGES`) for a model judge run in an actor;
    `work(candidates)` describes the job for messages, e.g. "120 ordered pairs"."""

    def judge_candidates(model_dir: str, prompts: list[str], candidates: list[list[str]], cfg: JudgeConfig,
                         role: Role | None = None) -> list[np.ndarray]:
        """role: default `judging_role(cfg)`, which never times out."""
        check_inputs(prompts, candidates)
        return judge_in_actor(judge_cls, model_dir, prompts, candidates, cfg,
                              role if role is not None else judging_role(cfg), work(candidates))

    return judge_candidates
