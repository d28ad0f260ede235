"""The per-stage resource plan of a run, and whether it fits a cluster: `python -m sppo.run --plan`.

Stages run one after another and each releases its actors before the next starts (judging
kills its judge actor, and Ray Train removes its workers' placement group when `fit` returns),
so the cluster must hold each stage on its own, not their sum. The exception is the vLLM
engines: unless `sampling.engine_mode` restarts them per call, they live for the whole job, so
judging and training must fit beside them.

Pure core (no Ray), on the roles of sppo/roles.py: `resource_plan`, `config_problems`, `parse_node`, `placeable`, `check_fit`,
`format_plan`. Ray shell: `cluster_nodes`, the alive nodes of the cluster this process reaches.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from sppo.config import RunConfig
from sppo.roles import Role, run_roles
from sppo.sampling import engine_mode
# Floating-point slack when dividing capacities by fractional demands (e.g. 0.1 CPU).
_EPS = 1e-9


@dataclass(frozen=True)
class StagePlan:
    """One stage's role (`sppo.roles.Role`: its actors' count and resources, the config fields
    behind them), with a line of detail for the table. `kept`: its actors stay for the whole job
    (kept vLLM engines), holding their resources while later stages run."""

    role: Role
    detail: str = ""
    kept: bool = False


def resource_plan(cfg: RunConfig) -> list[StagePlan]:
    """What each stage asks Ray for, in stage order: the roles the stages start their actors from."""
    s, j, t = cfg.sampling, cfg.judge, cfg.train
    sampling, judging, training = run_roles(cfg)
    return [
        StagePlan(sampling, f"tensor_parallel_size={s.tensor_parallel_size}, {s.dtype}, k={s.k}, "
                            f"engine_mode {engine_mode(s)}", kept=engine_mode(s) != "restart"),
        StagePlan(judging, f"batch_size={j.batch_size}"),
        StagePlan(training, f"global batch {t.global_batch_size}, {'bf16' if t.bf16 else 'fp32'}"),
    ]


def config_problems(cfg: RunConfig) -> list[str]:
    """Resource settings that cannot work on any cluster."""
    s = cfg.sampling
    problems = []
    if s.gpus_per_engine > 0 and s.tensor_parallel_size > s.gpus_per_engine:
        problems.append(
            f"stage 'sampling': sampling.tensor_parallel_size={s.tensor_parallel_size} needs that many GPUs "
            f"in each engine, but sampling.gpus_per_engine={s.gpus_per_engine:g}; set gpus_per_engine to "
            f"{s.tensor_parallel_size}"
        )
    if s.gpus_per_engine > 1 and not float(s.gpus_per_engine).is_integer():
        problems.append(f"stage 'sampling': sampling.gpus_per_engine={s.gpus_per_engine:g}: above 1, "
                        "Ray only grants whole GPUs")
    return problems


def parse_node(spec: str) -> list[dict[str, float]]:
    """'CPU=96,GPU=8' is one node; '2x CPU=96,GPU=8' is two such nodes."""
    usage = f"--node {spec!r}: expected [Nx] RESOURCE=AMOUNT,..., e.g. '2x CPU=96,GPU=8'"
    count, body = 1, spec.strip()
    head, sep, rest = body.partition("x")
    if sep and head.strip().isdigit():
        count, body = int(head), rest.strip()
    resources: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        name, _, value = item.partition("=")
        try:
            amount = float(value)
        except ValueError:
            raise ValueError(usage) from None
        if not name.strip() or not amount >= 0:
            raise ValueError(usage)
        resources[name.strip()] = amount
    if count < 1 or not resources:
        raise ValueError(usage)
    return [dict(resources) for _ in range(count)]


def placeable(role: Role, node: dict[str, float]) -> int:
    """How many of the role's actors fit on one node (math.inf when they ask for nothing)."""
    fits = math.inf
    for name, need in (("CPU", role.cpus), ("GPU", role.gpus)):
        if need > 0:
            fits = min(fits, math.floor(node.get(name, 0.0) / need + _EPS))
    return fits


def _binding_resource(role: Role, nodes: Sequence[dict[str, float]]) -> str:
    """The resource that limits the role most: the one with the least room over the whole cluster."""
    room = {name: sum(math.floor(n.get(name, 0.0) / need + _EPS) for n in nodes)
            for name, need in (("CPU", role.cpus), ("GPU", role.gpus)) if need > 0}
    return min(room, key=room.get)


def left_beside(role: Role, nodes: Sequence[dict[str, float]]) -> list[dict[str, float]]:
    """The nodes' resources once the role's actors are placed, first fit, node by node."""
    left = [dict(node) for node in nodes]
    for _ in range(role.count):
        node = next((n for n in left if placeable(role, n) >= 1), None)
        if node is None:
            break
        node["CPU"] = node.get("CPU", 0.0) - role.cpus
        node["GPU"] = node.get("GPU", 0.0) - role.gpus
    return left


def check_fit(plan: Sequence[StagePlan], nodes: Sequence[dict[str, float]]) -> list[str]:
    """One message per stage that the nodes cannot hold, naming the stage and config fields.
    Stages after kept actors must fit in what those leave."""
    problems, kept = [], None
    for stage in plan:
        role = stage.role
        fits = sum(placeable(role, node) for node in nodes)
        if fits >= role.count:
            if stage.kept:
                kept, nodes = role, left_beside(role, nodes)
            continue
        resource = _binding_resource(role, nodes)
        per_actor = role.cpus if resource == "CPU" else role.gpus
        biggest = max((n.get(resource, 0.0) for n in nodes), default=0.0)
        total = sum(n.get(resource, 0.0) for n in nodes)
        problems.append(
            f"stage '{role.stage}' does not fit: {role.count} x {role.name} at {per_actor:g} {resource} each "
            f"({role.fields['count'] + ', ' if role.count > 1 else ''}{role.fields[resource]}) but the "
            f"cluster can place {fits} ({total:g} {resource} over {len(nodes)} node(s), at most {biggest:g} on one); "
            f"lower {(role.fields['count'] if role.count > 1 else role.fields[resource]).split('=')[0]} "
            f"or add {resource}s"
            + (f" (beside the kept {kept.name}s: {kept.fields[resource]}; sampling.engine_mode=restart frees them "
               "between stages)" if kept else "")
        )
    return problems


def format_plan(cfg: RunConfig, plan: Sequence[StagePlan], nodes: Sequence[dict[str, float]] | None) -> str:
    lines = [f"Resource plan ({cfg.iterations} iteration(s); stages run in turn, each frees its resources"
             + (", but the vLLM engines stay for the whole job):" if plan[0].kept else "):")]
    for stage in plan:
        r = stage.role
        lines.append(
            f"  {r.stage:<9} {r.count:>3} x {r.name:<14} {r.cpus:>5g} CPU {r.gpus:>4g} GPU each"
            f"  = {r.total_cpus:g} CPU, {r.total_gpus:g} GPU   ({stage.detail})"
        )
    kept = [s.role for s in plan if s.kept]
    peak_cpus = sum(r.total_cpus for r in kept) + max(s.role.total_cpus for s in plan if not s.kept)
    peak_gpus = sum(r.total_gpus for r in kept) + max(s.role.total_gpus for s in plan if not s.kept)
    lines.append(f"  peak: {peak_cpus:g} CPU, {peak_gpus:g} GPU "
                 f"({'the kept engines plus ' if kept else ''}the largest single stage; "
                 "the job's driver reserves none by default)")
    if nodes is not None:
        cpus = sum(n.get("CPU", 0.0) for n in nodes)
        gpus = sum(n.get("GPU", 0.0) for n in nodes)
        lines.append(f"Cluster: {len(nodes)} node(s), {cpus:g} CPU, {gpus:g} GPU")
        for n, node in enumerate(nodes):
            lines.append(f"  node {n}: {node.get('CPU', 0.0):g} CPU, {node.get('GPU', 0.0):g} GPU")
    return "\n".join(lines)


# ---------------------------------------------------------------- Ray shell


def cluster_nodes() -> list[dict[str, float]]:
    """Resources of every alive node of the running cluster this process reaches: the one it is
    connected to, else RAY_ADDRESS or a local head. Never starts a cluster. Raises ConnectionError."""
    import ray

    connected_here = not ray.is_initialized()
    if connected_here:
        try:
            ray.init(address=os.environ.get("RAY_ADDRESS") or "auto", logging_level="WARNING",
                     log_to_driver=False)
        except ConnectionError as err:
            raise ConnectionError(
                "no running Ray cluster to check the plan against (set RAY_ADDRESS, run it inside a Ray job, "
                "or describe the cluster with --node, e.g. --node '2x CPU=96,GPU=8')"
            ) from err
    try:
        return [dict(node["Resources"]) for node in ray.nodes() if node["Alive"]]
    finally:
        if connected_here:
            ray.shutdown()


def plan_main(cfg: RunConfig, node_specs: Sequence[str]) -> int:
    """`--plan`: print the plan, check it against --node specs or the running cluster; run nothing.
    0 when it fits, 1 when it does not, 2 when there is nothing to check against."""
    plan = resource_plan(cfg)
    try:
        nodes = [node for spec in node_specs for node in parse_node(spec)] if node_specs else cluster_nodes()
    except (ValueError, ConnectionError) as err:
        print(format_plan(cfg, plan, None))
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_plan(cfg, plan, nodes))
    problems = config_problems(cfg) + check_fit(plan, nodes)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 1
    print("The plan fits: every stage can be placed.")
    return 0
