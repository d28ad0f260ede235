"""Training stage, the Ray shell: the recipe (`sppo.training_recipe`) on a Ray Train
`TorchTrainer` worker group, DeepSpeed ZeRO-3 across its processes.

`train_policy` reads and checks the pairs on the driver, starts the training role's workers
(`sppo.roles.training_role`: count, resources, restarts), bounds the stage's time (the role's
timeout_s and node_lost_s), and turns a worker's failure into a TrainingError. Ray Train restarts
the worker group when a worker dies (train.max_failures); a failure that would recur identically
(the loss, the deadline, the disk, the data) is returned instead.
"""

from __future__ import annotations

import importlib
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sppo.cluster import POLL_S, NodeWatch, PlacementWait
from sppo.config import TrainConfig
from sppo.losses import get_loss
from sppo.models import absolute_path, is_local_path, local_model
from sppo.policy import Policy
from sppo.roles import Role, training_role
from sppo.training_data import read_pairs, total_steps

logger = logging.getLogger("sppo.training")


# Of the collectives' timeout: when a training worker still in setup writes its threads' stacks.
SETUP_STACKS_AT = 0.8


class TrainingError(RuntimeError):
    """Training did not produce a checkpoint; the message carries the worker's error."""


@dataclass(frozen=True)
class TrainResult:
    checkpoint_dir: str
    num_steps: int
    metrics: dict[str, float]  # the last optimizer step's metrics
    history: list[dict[str, float]]  # one entry per optimizer step, with "step"
    # Per pairs-file row, [chosen, rejected] summed response log-probs under pi_t; none with 'online'.
    reference_logps: list[list[float]] = field(repr=False)
    # Evidence that ZeRO-3 sharded the weights: the largest parameter's full size, rank 0's
    # shard of it and what rank 0 still holds of it between forward passes.
    zero3_partition: dict[str, int]
    # Rank 0's seconds per phase: worker_start, imports, then the recipe's (setup = data + model_load,
    # reference_logps, train_steps, checkpoint_save).
    timings: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------- worker


def _train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The recipe on one Ray Train worker. Ray Train restarts the worker group on any exception
    (train.max_failures), which is right for a dead worker or node; a failure that would recur
    identically is returned instead."""
    entered = time.time()  # wall clock: the driver's submit time is on the same clock
    import ray.train

    from sppo import training_recipe
    from sppo.tracking import LiveMetrics
    # Until the model is loaded (the recipe cancels it then); see SETUP_STACKS_AT.
    with training_recipe.stacks_if_setup_stuck(config["setup_stacks_after_s"]):
        for module in ("deepspeed", "transformers"):  # the recipe's, timed here as the imports phase
            importlib.import_module(module)
        imported = time.time()

        cfg = TrainConfig.model_validate(config["cfg"])
        policy = config["policy"].mapped(local_model)  # from shared storage if a URI
        live_metrics = None
        if ray.train.get_context().get_world_rank() == 0:
            logger.setLevel(logging.INFO)  # progress lines, whatever level the worker's root logger is at
            if config["mlflow_run_id"] is not None:
                live_metrics = LiveMetrics(config["mlflow_tracking_uri"], config["mlflow_run_id"])
        try:
            result = training_recipe.train(
                cfg, config["rows"], policy.weights,
                config["checkpoint_dir"], device=ray.train.torch.get_device(), timeout_s=config["timeout_s"],
                started_at=config["submitted_at"], live_metrics=live_metrics,
                trust_remote_code=config["trust_remote_code"],
                adapter_dir=policy.adapter)
        except (FloatingPointError, TimeoutError, OSError, ValueError) as err:  # loss, deadline, disk, data
            return {"error": f"{type(err).__name__}: {err}"}
    # worker_start: from fit() to the recipe (Ray Train's controller, the workers' processes,
    # the process group).
    timings = {"worker_start": entered - config["submitted_at"], "imports": imported - entered, **result.timings}
    return {"history": result.history, "reference_logps": result.reference_logps,
            "zero3_partition": result.zero3_partition, "timings": timings}


# ---------------------------------------------------------------- driver


def _fit_watching(trainer, placement: PlacementWait, watch: NodeWatch | None):
    """trainer.fit() in a thread while this one checks the workers' placement (said every 30 s
    while it waits, bounded by placement_s) and the nodes: a restarted worker group that cannot
    be placed would otherwise wait for a lost node's resources until timeout_s."""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # handed to the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(POLL_S)
        if thread.is_alive():  # these raise; the job's end takes Ray Train's controller and workers with it
            placement.check()
            if watch is not None:
                watch.check()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def worker_group_configs(role: Role, backend: str):
    """Ray Train's TorchConfig and FailureConfig for the role's worker group.

    A dead worker restarts the whole group (role.restarts), which retrains from pi_t: the
    checkpoint is published only at the end, so a restart never resumes from a half-trained
    state. Each collective, the process group's rendezvous included, waits at most
    role.collective_s (capped at role.timeout_s): a rank that is stuck, or a rendezvous that
    missed its store, fails the group, which starts again, rather than holding the stage until
    its timeout. Placing the workers is retried for about role.timeout_s (Ray Train retries every
    WORKER_GROUP_START_TIMEOUT_S, 60 s, forever by default)."""
    from ray.train import FailureConfig
    from ray.train.torch import TorchConfig

    bounds = [s for s in (role.collective_s, role.timeout_s) if s is not None]
    torch_config = TorchConfig(backend=backend, **({"timeout_s": max(1, math.ceil(min(bounds)))} if bounds else {}))
    if role.timeout_s is None:
        return torch_config, FailureConfig(max_failures=role.restarts)
    return torch_config, FailureConfig(max_failures=role.restarts,
                                       controller_failure_limit=max(0, math.ceil(role.timeout_s / 60) - 1))


def train_policy(
    pairs_path: str,
    policy: Policy,
    checkpoint_dir: str,
    cfg: TrainConfig,
    *,
    storage_dir: str,
    mlflow_tracking_uri: str | None = None,
    mlflow_run_id: str | None = None,
    role: Role | None = None,
    trust_remote_code: bool = False,
) -> TrainResult:
    """Train pi_{t+1} from pi_t (`policy`: its weights, and with train.lora its adapter, continued;
    none at the first iteration) on pairs_path; publish it at checkpoint_dir.

    An existing checkpoint_dir is replaced only once the new checkpoint is complete.
    role (default `training_role(cfg)`, which never times out): the workers' count, resources and
    restarts, and the stage's deadlines. Its timeout_s is enforced three ways, since fit() itself
    has no timeout: the workers check the deadline before each micro-batch, the process group
    times out any collective after collective_s (at most timeout_s), and placing the workers is
    retried for about timeout_s (at least 60 s) (`worker_group_configs`). Its node_lost_s: fail
    that long after a node the training started with leaves the cluster, if the training has not
    finished without it (`sppo.cluster.NodeWatch`).
    Raises TrainingError with the worker's message when training fails.
    """
    from ray.train import RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    policy_dir = policy.weights
    if is_local_path(policy_dir) and not Path(policy_dir, "config.json").is_file():
        raise FileNotFoundError(f"policy_dir {policy_dir}: no config.json (needs a local model directory)")
    if policy.adapter is not None and cfg.lora is None:
        raise ValueError(f"policy {policy} has a LoRA adapter to continue, but train.lora is not set")
    rows = read_pairs(pairs_path, sampled_tokens=cfg.reference_logps == "sampler")
    num_steps = total_steps(len(rows), cfg)
    get_loss(cfg.loss)

    role = role if role is not None else training_role(cfg)
    timeout_s = role.timeout_s
    torch_config, failure_config = worker_group_configs(role, "nccl" if cfg.use_gpu else "gloo")
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(),
            "rows": rows,
            "policy": policy.mapped(absolute_path),
            "checkpoint_dir": absolute_path(checkpoint_dir),
            "mlflow_tracking_uri": mlflow_tracking_uri,
            "mlflow_run_id": mlflow_run_id,
            "timeout_s": timeout_s,
            # A rank still in setup by then shows where, before a peer's collective times out
            # (a few seconds after this, at its first collective) and the group is torn down.
            "setup_stacks_after_s": SETUP_STACKS_AT * torch_config.timeout_s,
            "trust_remote_code": trust_remote_code,
            "submitted_at": time.time(),
        },
        scaling_config=ScalingConfig(
            num_workers=role.count, use_gpu=role.gpus > 0,
            resources_per_worker={"CPU": role.cpus, **({"GPU": role.gpus} if role.gpus > 0 else {})},
        ),
        torch_config=torch_config,
        run_config=RunConfig(
            storage_path=absolute_path(storage_dir),
            name=f"train-{Path(checkpoint_dir).name}-{uuid.uuid4().hex[:8]}",
            failure_config=failure_config,
        ),
    )
    logger.info(
        "training %s on %d pairs: %d steps of %d pairs on %d workers",
        policy, len(rows), num_steps, cfg.global_batch_size, role.count,
    )
    watch = role.node_watch()
    try:
        result = _fit_watching(trainer, role.group_placement(), watch)
    except TrainingFailedError as err:
        if watch is not None:  # the worker group failed past its restarts: because a node left?
            watch.explain(err)
        raise TrainingError(f"training on {pairs_path} failed: {err}") from err
    output = result.return_value
    if output is not None and "error" in output:
        raise TrainingError(f"training on {pairs_path} failed: {output['error']}")
    if output is None or len(output["history"]) != num_steps:
        raise TrainingError(f"training on {pairs_path} returned no result for {num_steps} steps from rank 0")
    history = output["history"]
    return TrainResult(
        checkpoint_dir=str(checkpoint_dir),
        num_steps=len(history),
        metrics={k: v for k, v in history[-1].items() if k != "step"} if history else {},
        history=history,
        reference_logps=output["reference_logps"],
        zero3_partition=output["zero3_partition"],
        timings=output["timings"],
    )
