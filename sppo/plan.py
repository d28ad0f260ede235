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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from sppo.config import RunConfig
from sppo.roles import Role, eval_judging_role, own_eval_judge, run_roles
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
    plan = [
        StagePlan(sampling, f"tensor_parallel_size={s.tensor_parallel_size}, {s.dtype}, k={s.k}, "
                            f"engine_mode {engine_mode(s)}", kept=engine_mode(s) != "restart"),
        StagePlan(judging, f"batch_size={j.batch_size}"),
        StagePlan(training, f"global batch {t.global_batch_size}, {'bf16' if t.bf16 else 'fp32'}"),
    ]
    # Evaluation's own judge (eval.judge) runs after the training judge has graded the same comparisons.
    if (evaluating := eval_judging_role(cfg)) is not None:
        plan.append(StagePlan(evaluating, f"eval.judge, batch_size={own_eval_judge(cfg).batch_size}"))
    return plan


def config_problems(cfg: RunConfig) -> list[str]:
    """Resource settings that cannot work on any cluster."""
    s = cfg.sampling
    problems = []
    # A share of one GPU (tensor_parallel_size 1) lets a kept engine sleep beside the trainer on one GPU.
    if s.gpus_per_engine > 0 and s.tensor_parallel_size > 1 and s.tensor_parallel_size > s.gpus_per_engine:
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


class PlacementError(RuntimeError):
    """A stage the cluster cannot hold, found before the first stage; nothing was published."""


@dataclass(frozen=True)
class Placement:
    """What a job does about the cluster it runs on, decided before its first stage.

    engine_mode: the lifetime its engines run with, the configured one or `restart` where kept
    engines would leave a later stage waiting for ever; notes: one log line per adaptation (the
    fallback, stages left to the autoscaler); problems: non-empty, the job cannot run and refuses."""

    engine_mode: str
    notes: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()


def _totals(nodes: Sequence[Mapping[str, float]]) -> str:
    cpus, gpus = (sum(n.get(name, 0.0) for n in nodes) for name in ("CPU", "GPU"))
    return f"{cpus:g} CPU, {gpus:g} GPU"


def _resources(nodes: Sequence[Mapping[str, float]]) -> str:
    return f"{_totals(nodes)} over {len(nodes)} node(s)"


def decide_placement(cfg: RunConfig, nodes: Sequence[dict[str, float]],
                     can_grow_to: Mapping[str, float] | None = None) -> Placement:
    """The plan against the live cluster's nodes. can_grow_to: the CPU and GPU totals an autoscaler
    may grow the cluster to (None: it cannot grow). A stage that does not fit now but fits those
    totals waits for the autoscaler; kept engines that leave no room for a later stage are restarted
    per sampling call instead (unless sampling.engine_fallback is false); anything else refuses."""
    plan, mode = resource_plan(cfg), engine_mode(cfg.sampling)
    if problems := config_problems(cfg):
        return Placement(mode, problems=tuple(problems))
    # An autoscaler's limits are totals, not node shapes: checked as one node of that size, as
    # Ray Train checks its worker group against them.
    grown = [dict(can_grow_to)] if can_grow_to is not None else None
    target = grown or nodes
    if check_fit(plan, nodes) and grown is not None and not check_fit(plan, grown):
        return Placement(mode, notes=(f"the plan does not fit the cluster as it is ({_resources(nodes)}), but its "
                                      f"autoscaler can grow it to {_totals(grown)}: stages "
                                      f"wait for nodes up to timeouts.placement_s={cfg.timeouts.placement_s:g} s",))
    if not check_fit(plan, target):
        return Placement(mode)
    if problems := check_fit([replace(stage, kept=False) for stage in plan], target):
        return Placement(mode, problems=tuple(problems))  # a stage that does not fit even alone
    # Each stage fits alone: the kept engines (the only kept role) leave no room beside a later one.
    kept = plan[0].role
    crowded = [s.role for s in plan[1:] if check_fit([plan[0], s], target)]
    beside = "; ".join(f"stage '{r.stage}' needs {r.count} x {r.cpus:g} CPU, {r.gpus:g} GPU" for r in crowded)
    why = (f"the kept vLLM engines hold {kept.total_cpus:g} CPU, {kept.total_gpus:g} GPU "
           f"({kept.fields['count']}, {kept.fields['CPU']}, {kept.fields['GPU']}); {beside}; the cluster has "
           f"{_resources(target)}")
    if not cfg.sampling.engine_fallback:
        return Placement(mode, problems=(f"{why}, and sampling.engine_fallback=false forbids restarting them per "
                                         "call: set sampling.engine_mode=restart, or add resources",))
    return Placement("restart", notes=(f"{why}: the engines restart for each sampling call instead of staying "
                                       f"(engine_mode restart, not {mode}; sampling.engine_fallback=false refuses "
                                       "instead)",))


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


def autoscaler_limits(nodes: Sequence[dict[str, float]]) -> dict[str, float] | None:
    """The CPU and GPU totals the cluster's autoscaler (KubeRay, the cluster launcher) may grow it
    to, when above what its nodes have now; None for a cluster that cannot grow."""
    # Ray keeps the autoscaler's node types private; Ray Train checks its worker group against
    # them the same way before placing it.
    from ray._private.state import state

    try:
        limits = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # no autoscaler has published a config: a fixed cluster
        return None
    limits = {name: float(limits.get(name, 0)) for name in ("CPU", "GPU")}
    now = {name: sum(n.get(name, 0.0) for n in nodes) for name in ("CPU", "GPU")}
    return limits if any(limits[name] > now[name] for name in limits) else None


def job_placement(cfg: RunConfig) -> Placement:
    """`decide_placement` against the cluster this job runs on."""
    nodes = cluster_nodes()
    return decide_placement(cfg, nodes, autoscaler_limits(nodes))



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


# --plan's exit statuses, documented in `python -m sppo.run --help` and docs/operations.md.
FITS, DOES_NOT_FIT, BAD_INPUT, NOTHING_TO_CHECK = 0, 1, 2, 3


def plan_main(cfg: RunConfig, node_specs: Sequence[str], unchecked: Sequence[str] = (), strict: bool = False) -> int:
    """`--plan`: print the plan, check it against --node specs or the running cluster; run nothing.
    unchecked: the run's checks not made here (`sppo.preflight.check_run`), one line each; with
    strict they count. Returns FITS; DOES_NOT_FIT; BAD_INPUT for a bad --node; NOTHING_TO_CHECK
    with no cluster and no --node, or when it fits but strict and checks were not made here."""
    plan = resource_plan(cfg)
    try:
        nodes = [node for spec in node_specs for node in parse_node(spec)] if node_specs else None
    except ValueError as err:
        print(format_plan(cfg, plan, None))
        print(f"error: {err}", file=sys.stderr)
        return BAD_INPUT
    try:
        nodes = nodes if nodes is not None else cluster_nodes()
    except ConnectionError as err:
        nodes, nothing = None, err
    print(format_plan(cfg, plan, nodes))
    for line in unchecked:
        print(f"not checked here: {line}")
    if nodes is None:
        print(f"error: {nothing}", file=sys.stderr)
        return NOTHING_TO_CHECK
    problems = config_problems(cfg) + check_fit(plan, nodes)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return DOES_NOT_FIT
    print("The plan fits: every stage can be placed.")
    if strict and unchecked:
        print(f"error: --strict: {len(unchecked)} check(s) above were not made here; run --plan where the "
              "cluster's hub, tracking server and output directory answer (e.g. in a Ray job), or without --strict",
              file=sys.stderr)
        return NOTHING_TO_CHECK
    return FITS
