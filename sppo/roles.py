"""Roles as data: what each stage's actors ask Ray for, how often Ray restarts them, and how long
the stage may wait on them.

One `Role` per stage: the vLLM engines (sampling, and evaluation's samples), the judge (judging,
and evaluation's matrices), the evaluation's own judge where eval.judge names another one, and
the ZeRO-3 workers (training). The stages start their actors
from it and wait on them through it (`Role.wait`: one deadline, the nodes watched, the culprit
named); `--plan` (sppo/plan.py) checks the same roles against a cluster. The config keeps its
fields per stage (`sampling.num_engines`, `judge.num_cpus`, `train.cpus_per_worker`, ...);
this is the one place that reads them as resources.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from sppo.cluster import NodeWatch, PlacementWait, wait_for_all
from sppo.config import JudgeConfig, RunConfig, SamplingConfig, TrainConfig

JUDGE_NAMES = {"pairrm": "PairRM judge", "reward_model": "reward-model judge", "rule": "rule judge"}


@dataclass(frozen=True)
class Role:
    """`count` identical actors (or Ray Train workers) of one stage, each holding `cpus` CPUs and
    `gpus` GPUs; Ray restarts a crashed one `restarts` times. The stage fails once it has waited
    timeout_s on them, or node_lost_s after a node it began with left (None: never). collective_s
    (training only): how long a worker waits in one collective (None: timeout_s).

    `fields` names the config fields behind count, CPU, GPU and restarts, with their values,
    for messages."""

    stage: str
    name: str
    count: int
    cpus: float
    gpus: float
    restarts: int
    fields: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float | None = None
    node_lost_s: float | None = None
    placement_s: float | None = None
    collective_s: float | None = None

    @property
    def total_cpus(self) -> float:
        return self.count * self.cpus

    @property
    def total_gpus(self) -> float:
        return self.count * self.gpus

    @property
    def resources(self) -> str:
        """Each actor's request, as Ray spells it: 'num_cpus=1, num_gpus=0'."""
        return f"num_cpus={self.cpus:g}, num_gpus={self.gpus:g}"

    def actor_options(self) -> dict[str, Any]:
        """`ray.remote(...).options(...)` of one actor: its resources, and a crashed one restarted
        with its in-flight call retried on it (each call names all it needs, so a retry redoes it
        exactly)."""
        return {"num_cpus": self.cpus, "num_gpus": self.gpus, "max_restarts": self.restarts,
                "max_task_retries": self.restarts}

    def node_watch(self) -> NodeWatch | None:
        return NodeWatch(self.stage, self.node_lost_s) if self.node_lost_s is not None else None

    def actors_placement(self, actors: Sequence) -> PlacementWait:
        """Watches the role's `actors` (handles) until Ray has placed them all."""
        import ray

        ready = [actor.__ray_ready__.remote() for actor in actors]

        def pending() -> list[str]:
            left = ray.wait(ready, num_returns=len(ready), timeout=0)[1] if ready else []
            free = ray.available_resources()
            # Not ready while its __init__ runs (a vLLM engine's start) too: only an actor the
            # cluster has no room for is waiting for placement.
            if not left or (free.get("CPU", 0.0) >= self.cpus and free.get("GPU", 0.0) >= self.gpus):
                return []
            return [f"{len(left)} x {self.name} ({self.resources})"]

        return PlacementWait(self.stage, pending, self.placement_s)

    def group_placement(self) -> PlacementWait:
        """Watches the placement group Ray Train makes for the role's workers until Ray has placed
        it. Placement groups carry no owner: ours is the pending one of our workers' shape."""
        import ray

        shape = [{name: amount for name, amount in (("CPU", self.cpus), ("GPU", self.gpus)) if amount}] * self.count

        def pending() -> list[str]:
            waiting = any(group["state"] in ("PENDING", "RESCHEDULING") and list(group["bundles"].values()) == shape
                          for group in ray.util.placement_group_table().values())
            return [f"{self.count} x {self.name} ({self.resources})"] if waiting else []

        return PlacementWait(self.stage, pending, self.placement_s)

    def wait(self, pending: Mapping[Any, Hashable], describe: Callable[[Hashable], str], *,
             started: float | None = None, on_done: Callable[[Hashable, Any], None] | None = None,
             placement: PlacementWait | None = None) -> dict:
        """The results of the role's actor calls (`pending`: object ref -> key), by key, within
        timeout_s of `started` (time.monotonic(); default now), the stage's nodes watched (and its
        actors' placement, `placement`); an error names the culprit by describe(key)
        (`sppo.cluster.wait_for_all`)."""
        return wait_for_all(pending, stage=self.stage, describe=describe, timeout_s=self.timeout_s,
                            started=started, watch=self.node_watch(), on_done=on_done, placement=placement)


def sampling_role(cfg: SamplingConfig, timeout_s: float | None = None, node_lost_s: float | None = None,
                  placement_s: float | None = None) -> Role:
    return Role(
        "sampling", "vLLM engine", cfg.num_engines, cfg.cpus_per_engine, cfg.gpus_per_engine, cfg.max_restarts,
        {"count": f"sampling.num_engines={cfg.num_engines}", "CPU": f"sampling.cpus_per_engine={cfg.cpus_per_engine:g}",
         "GPU": f"sampling.gpus_per_engine={cfg.gpus_per_engine:g}", "restarts": f"sampling.max_restarts={cfg.max_restarts}"},
        timeout_s, node_lost_s, placement_s,
    )


def judging_role(cfg: JudgeConfig, timeout_s: float | None = None, node_lost_s: float | None = None,
                  placement_s: float | None = None, stage: str = "judging", section: str = "judge") -> Role:
    """The judge of `stage`, its config at `section` (eval.judge: the evaluation stage's own judge)."""
    return Role(
        stage, JUDGE_NAMES[cfg.kind], 1, cfg.num_cpus, cfg.num_gpus, cfg.max_restarts,
        {"count": section, "CPU": f"{section}.num_cpus={cfg.num_cpus:g}", "GPU": f"{section}.num_gpus={cfg.num_gpus:g}",
         "restarts": f"{section}.max_restarts={cfg.max_restarts}"},
        timeout_s, node_lost_s, placement_s,
    )


def training_role(cfg: TrainConfig, timeout_s: float | None = None, node_lost_s: float | None = None,
                  placement_s: float | None = None, collective_s: float | None = None) -> Role:
    """Ray Train's workers: train.cpus_per_worker CPUs each, and with train.use_gpu one GPU each
    (train.gpus_per_worker: a share of one); restarts are the whole group's (train.max_failures)."""
    gpu_field = (f"train.gpus_per_worker={cfg.gpus_per_worker:g}" if cfg.use_gpu and cfg.gpus_per_worker is not None
                 else f"train.use_gpu={str(cfg.use_gpu).lower()}")
    return Role(
        "training", "ZeRO-3 worker", cfg.num_workers, cfg.cpus_per_worker, cfg.worker_gpus, cfg.max_failures,
        {"count": f"train.num_workers={cfg.num_workers}", "CPU": f"train.cpus_per_worker={cfg.cpus_per_worker:g}",
         "GPU": gpu_field, "restarts": f"train.max_failures={cfg.max_failures}"},
        timeout_s, node_lost_s, placement_s, collective_s,
    )


def own_eval_judge(cfg: RunConfig) -> JudgeConfig | None:
    """eval.judge where it is another judge than the training one (evaluation then runs both), else None."""
    return cfg.eval.judge if cfg.eval.judge is not None and cfg.eval.judge != cfg.judge else None


def eval_judging_role(cfg: RunConfig) -> Role | None:
    """The evaluation stage's own judge (`own_eval_judge`), with the judging timeouts; None without one."""
    judge, t = own_eval_judge(cfg), cfg.timeouts
    if judge is None:
        return None
    return judging_role(judge, t.judging_s, t.node_lost_s, t.placement_s, stage="evaluation", section="eval.judge")


class RunRoles(NamedTuple):
    sampling: Role
    judging: Role
    training: Role


def run_roles(cfg: RunConfig) -> RunRoles:
    """The job's roles in stage order, with the config's timeouts."""
    t = cfg.timeouts
    return RunRoles(sampling_role(cfg.sampling, t.sampling_s, t.node_lost_s, t.placement_s),
                    judging_role(cfg.judge, t.judging_s, t.node_lost_s, t.placement_s),
                    training_role(cfg.train, t.training_s, t.node_lost_s, t.placement_s, t.collective_s))
