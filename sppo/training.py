"""Training stage: pi_t -> pi_{t+1} on the SPPO pairs, DeepSpeed ZeRO-3 inside Ray Train.

The pure core (validation, tokenization, batching, sharding, log-probs, DeepSpeed config)
runs without Ray; `train_policy` is the Ray shell: a `TorchTrainer` whose workers run
`_train_loop_per_worker`. Reference log-probs come from the model being trained, once,
before its first optimizer step (its weights are then pi_t), so no second copy is held; or,
with train.reference_logps "sampler", from the log-probs vLLM reported while pi_t sampled the
responses, so no reference pass runs at all.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from sppo.chat import render_prompt_ids
from sppo.cluster import POLL_S, NodeWatch
from sppo.config import TrainConfig
from sppo.losses import (
    LossParams,
    PairBatch,
    get_loss,
    response_lengths,
    sequence_logps,
    sequence_wpo_logweights,
    wpo_pair_weights,
)
from sppo.progress import PROGRESS_EVERY_S, progress
from sppo.storage import is_local_path, is_uri, local_model, upload_dir

logger = logging.getLogger("sppo.training")

PAIR_COLUMNS = ("prompt", "chosen", "rejected", "chosen_probs", "chosen_probs_win", "chosen_probs_lose")
PROB_COLUMNS = ("chosen_probs", "chosen_probs_win", "chosen_probs_lose")
# train.reference_logps "sampler": each response's sampled token ids and log pi_t of each.
TOKEN_COLUMNS = ("chosen_token_ids", "chosen_token_logps", "rejected_token_ids", "rejected_token_logps")
# Files of a model directory that the checkpoint writes itself rather than copies.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
_MODEL_FILES = ("config.json", "generation_config.json")


class TrainingError(RuntimeError):
    """Training did not produce a checkpoint; the message carries the worker's error."""


@dataclass(frozen=True)
class TrainResult:
    checkpoint_dir: str
    num_steps: int
    metrics: dict[str, float]  # the last optimizer step's metrics
    history: list[dict[str, float]]  # one entry per optimizer step, with "step"
    # Per pairs-file row, [chosen, rejected] summed response log-probs under pi_t.
    reference_logps: list[list[float]] = field(repr=False)
    # Evidence that ZeRO-3 sharded the weights: the largest parameter's full size, rank 0's
    # shard of it and what rank 0 still holds of it between forward passes.
    zero3_partition: dict[str, int]
    # Rank 0's seconds per phase: setup (tokenize, load), reference_logps, train_steps, checkpoint_save.
    timings: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------- pure core: data


def read_pairs(path: str | os.PathLike, sampled_tokens: bool = False) -> list[dict[str, Any]]:
    """Rows of a pairs.parquet file, checked: all columns present, probabilities in [0, 1];
    with sampled_tokens also the TOKEN_COLUMNS, one finite log-prob per token id."""
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"pairs file {path}: cannot read as parquet ({err})") from err
    columns = PAIR_COLUMNS + (TOKEN_COLUMNS if sampled_tokens else ())
    missing = [c for c in columns if c not in frame.columns]
    if missing and sampled_tokens and set(missing) <= set(TOKEN_COLUMNS):
        raise ValueError(f"pairs file {path}: missing columns {missing}, which train.reference_logps "
                         "'sampler' reads (the sampling stage writes them only in that mode)")
    if missing:
        raise ValueError(f"pairs file {path}: missing columns {missing}; has {list(frame.columns)}")
    if frame.empty:
        raise ValueError(f"pairs file {path}: no rows")
    for column in ("prompt", "chosen", "rejected"):
        bad = frame.index[~frame[column].map(lambda v: isinstance(v, str))]
        if len(bad):
            raise ValueError(f"pairs file {path}: column {column!r} must hold strings (row {bad[0]})")
    for column in PROB_COLUMNS:
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = frame.index[~values.between(0.0, 1.0)]  # NaN is not between
        if len(bad):
            raise ValueError(
                f"pairs file {path}: column {column!r} must be a probability in [0, 1] "
                f"(row {bad[0]}: {frame.loc[bad[0], column]!r})"
            )
    rows = frame[list(columns)].to_dict("records")
    for index, row in enumerate(rows):
        for column in PROB_COLUMNS:
            row[column] = float(row[column])
        for side in ("chosen", "rejected") if sampled_tokens else ():
            ids, logps = (list(row[f"{side}_token_{kind}"]) for kind in ("ids", "logps"))
            if not ids or len(ids) != len(logps) or not all(math.isfinite(v) for v in logps):
                raise ValueError(f"pairs file {path}: row {index}: {side}_token_logps must hold one finite "
                                 f"log-prob per token of {side}_token_ids ({len(logps)} for {len(ids)} tokens)")
            row[f"{side}_token_ids"], row[f"{side}_token_logps"] = [int(t) for t in ids], [float(v) for v in logps]
    return rows


@dataclass(frozen=True)
class EncodedSequence:
    input_ids: list[int]
    prompt_length: int  # tokens before the response; the loss covers the rest


@dataclass(frozen=True)
class EncodedPair:
    chosen: EncodedSequence
    rejected: EncodedSequence


def encode_sequence(
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    *,
    max_length: int,
    max_prompt_length: int,
    bos_token_id: int | None,
) -> EncodedSequence:
    """Prompt + response ids, cut to fit.

    A long prompt keeps its BOS and its end (the latest turn and the generation tag, which
    condition the response); a long response keeps its beginning, so a cut response has
    no EOS, as it should.
    """
    prompt = list(prompt_ids)
    if len(prompt) > max_prompt_length:
        head = prompt[:1] if bos_token_id is not None and prompt[0] == bos_token_id else []
        prompt = head + prompt[len(prompt) - (max_prompt_length - len(head)) :]
    response = list(response_ids)[: max_length - len(prompt)]
    return EncodedSequence(input_ids=prompt + response, prompt_length=len(prompt))


def encode_pairs(
    tokenizer, rows: Sequence[dict[str, Any]], *, max_length: int, max_prompt_length: int,
    sampled_tokens: bool = False,
) -> list[EncodedPair]:
    """Tokenize rows exactly as sampling saw them: chat-template prompt, response + EOS.

    With sampled_tokens the responses are the rows' {chosen,rejected}_token_ids as sampled (an
    EOS only where sampling stopped on one), and a prompt longer than max_prompt_length is an
    error: the sampler's log-probs were conditioned on the whole of it."""
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token_id: responses cannot be terminated")
    prompt_ids = render_prompt_ids(tokenizer, [row["prompt"] for row in rows])
    if sampled_tokens:
        response_ids = [row["chosen_token_ids"] for row in rows] + [row["rejected_token_ids"] for row in rows]
        eos = []
        if too_long := [i for i, ids in enumerate(prompt_ids) if len(ids) > max_prompt_length]:
            raise ValueError(f"row {too_long[0]}: the prompt has {len(prompt_ids[too_long[0]])} tokens, more "
                             f"than train.max_prompt_length ({max_prompt_length}); reference_logps 'sampler' "
                             "cannot cut it (its log-probs were conditioned on the whole prompt)")
    else:
        responses = [row["chosen"] for row in rows] + [row["rejected"] for row in rows]
        response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
        eos = [tokenizer.eos_token_id]

    def encode(prompt: list[int], response: list[int]) -> EncodedSequence:
        return encode_sequence(
            prompt,
            list(response) + eos,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            bos_token_id=tokenizer.bos_token_id,
        )

    chosen_ids, rejected_ids = response_ids[: len(rows)], response_ids[len(rows) :]
    return [
        EncodedPair(chosen=encode(prompt, chosen), rejected=encode(prompt, rejected))
        for prompt, chosen, rejected in zip(prompt_ids, chosen_ids, rejected_ids)
    ]


def collate_pairs(pairs: Sequence[EncodedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of 2B sequences: the B chosen first, then the B rejected."""
    sequences = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    width = max(len(s.input_ids) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    loss_mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for i, seq in enumerate(sequences):
        length = len(seq.input_ids)
        input_ids[i, :length] = torch.tensor(seq.input_ids)
        attention_mask[i, :length] = 1
        loss_mask[i, seq.prompt_length : length] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def pair_logps(
    model, batch: dict[str, torch.Tensor], *, wpo_weights: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Summed response log-probs (chosen [B], rejected [B]) from one forward pass, and with
    wpo_weights WPO's pair weights [B] under this model from the same logits (else None)."""
    input_ids = batch["input_ids"]
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"], use_cache=False).logits
    logps = sequence_logps(logits, input_ids, batch["loss_mask"])
    half = logps.shape[0] // 2
    weights = None
    if wpo_weights:
        logweights = sequence_wpo_logweights(logits, input_ids, batch["loss_mask"])
        weights = wpo_pair_weights(logweights[:half], logweights[half:])
    return logps[:half], logps[half:], weights


@torch.no_grad()
def reference_logps(
    model, pairs: Sequence[EncodedPair], *, batch_size: int, pad_token_id: int, device=None
) -> torch.Tensor:
    """[N, 2] (chosen, rejected) log-probs of `pairs`, in batches of `batch_size`, float32 on CPU."""
    out = []
    for start in range(0, len(pairs), batch_size):
        batch = collate_pairs(pairs[start : start + batch_size], pad_token_id)
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        chosen, rejected, _ = pair_logps(model, batch)
        out.append(torch.stack([chosen, rejected], dim=1).float().cpu())
    return torch.cat(out)


def sampler_reference_logps(pairs: Sequence[EncodedPair], rows: Sequence[dict[str, Any]]) -> torch.Tensor:
    """[N, 2] (chosen, rejected) reference log-probs from the sampler's per-token log-probs:
    each summed over the response tokens that `encode_pairs(sampled_tokens=True)` kept."""

    def kept(seq: EncodedSequence, logps: list[float]) -> float:
        return math.fsum(logps[: len(seq.input_ids) - seq.prompt_length])

    return torch.tensor([[kept(pair.chosen, row["chosen_token_logps"]),
                          kept(pair.rejected, row["rejected_token_logps"])]
                         for pair, row in zip(pairs, rows, strict=True)], dtype=torch.float32)


# ---------------------------------------------------------------- pure core: schedule


def steps_per_epoch(num_rows: int, cfg: TrainConfig) -> int:
    """Optimizer steps per epoch; the rows past the last full global batch are left out."""
    steps = num_rows // cfg.global_batch_size
    if steps == 0:
        raise ValueError(
            f"{num_rows} pairs are fewer than one global batch of {cfg.global_batch_size} "
            f"(train.per_device_batch_size x train.gradient_accumulation_steps x train.num_workers)"
        )
    return steps


def total_steps(num_rows: int, cfg: TrainConfig) -> int:
    """Optimizer steps of the whole training: train.epochs epochs, cut at train.max_steps."""
    steps = steps_per_epoch(num_rows, cfg) * cfg.epochs
    return steps if cfg.max_steps is None else min(steps, cfg.max_steps)


def epoch_rows(
    num_rows: int, *, epoch: int, seed: int, rank: int, world_size: int, rows_per_rank: int
) -> list[int]:
    """This rank's row indices for one epoch, in order.

    One seeded permutation per epoch; rank r takes every world_size-th index starting at r,
    so optimizer step s trains on the permutation's s-th global batch across all ranks.
    """
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(num_rows, generator=generator)
    mine = order[rank::world_size][:rows_per_rank]
    return mine.tolist()


def reference_chunk(num_rows: int, *, rank: int, world_size: int) -> list[int]:
    """Rows whose reference log-probs this rank computes: a contiguous chunk, padded with row 0.

    Every chunk has the same length because ZeRO-3 forwards are collective: all ranks must
    run the same number of them. Concatenating the chunks by rank and keeping the first
    num_rows entries restores file order.
    """
    size = math.ceil(num_rows / world_size)
    rows = list(range(rank * size, min(num_rows, (rank + 1) * size)))
    return rows + [0] * (size - len(rows))


def worker_resources(cfg: TrainConfig) -> dict[str, float]:
    """What each Ray Train worker holds: train.cpus_per_worker CPUs, and one GPU with train.use_gpu."""
    return {"CPU": cfg.cpus_per_worker, **({"GPU": 1.0} if cfg.use_gpu else {})}


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": cfg.per_device_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": cfg.global_batch_size,
        "gradient_clipping": cfg.max_grad_norm,
        "bf16": {"enabled": cfg.bf16},
        "zero_optimization": {
            "stage": 3,
            # 0: partition every parameter, however small (the default keeps small ones whole).
            "stage3_param_persistence_threshold": 0,
        },
        # ZeRO only vouches for its own optimizers; RMSprop is what SPPO trains with.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


# ---------------------------------------------------------------- worker


def _train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train restarts the worker group on any exception (train.max_failures), which is right
    for a dead worker or node; a failure that would recur identically is returned instead."""
    try:
        return _train_worker(config)
    except (FloatingPointError, TimeoutError, OSError, ValueError) as err:  # loss, deadline, disk, data
        return {"error": f"{type(err).__name__}: {err}"}


def _train_worker(config: dict[str, Any]) -> dict[str, Any]:
    entered = time.time()  # wall clock: the driver's submit time is on the same clock
    import deepspeed
    import ray.train
    import torch.distributed as dist
    from transformers import AutoConfig, AutoTokenizer
    imported = time.time()

    cfg = TrainConfig.model_validate(config["cfg"])
    rows, policy_dir = config["rows"], local_model(config["policy_dir"])  # from shared storage if a URI
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    if rank == 0:  # progress lines, whatever level the worker's root logger is at
        logger.setLevel(logging.INFO)
    started = time.monotonic()
    torch.manual_seed(cfg.seed)
    # Ray Train has set up the process group; DeepSpeed wraps it instead of making its own.
    deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")
    device = ray.train.torch.get_device()

    remote_code = config["trust_remote_code"]
    tokenizer = AutoTokenizer.from_pretrained(policy_dir, trust_remote_code=remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    from_sampler = cfg.reference_logps == "sampler"
    pairs = encode_pairs(tokenizer, rows, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                         sampled_tokens=from_sampler)
    probs = torch.tensor([[r["chosen_probs_win"], r["chosen_probs_lose"], r["chosen_probs"]] for r in rows])
    per_epoch, num_steps = steps_per_epoch(len(rows), cfg), total_steps(len(rows), cfg)
    encoded = time.monotonic()

    engine, hf_ds_config = _load_engine(policy_dir, cfg, num_steps, remote_code)
    # The checkpoint is saved in the dtype the policy came in, whatever the training dtype.
    save_dtype = AutoConfig.from_pretrained(policy_dir, trust_remote_code=remote_code).dtype or torch.float32
    loaded = time.monotonic()

    if from_sampler:  # log pi_t(y|x) as vLLM computed it while pi_t sampled y
        ref = sampler_reference_logps(pairs, rows)
    else:  # pi_ref = the weights as loaded: every row's reference log-probs, before any step
        engine.eval()
        ref = _all_reference_logps(engine, pairs, cfg.per_device_batch_size, pad_id, device, rank, world_size)
    engine.train()
    largest = max(engine.module.parameters(), key=lambda p: p.ds_numel)
    partition = {
        "param_numel": int(largest.ds_numel),
        "local_numel": int(largest.ds_tensor.numel()),  # this rank's shard
        # After forward passes, only parameters ZeRO-3 keeps whole (persistent) are still held.
        "resident_numel": int(largest.data.numel()),
        "world_size": world_size,
    }
    if rank == 0:
        logger.info("reference log-probs of %d pairs (%s) in %.1fs", len(pairs), cfg.reference_logps,
                    time.monotonic() - loaded)
    referenced = reported = time.monotonic()

    loss_fn, loss_params = get_loss(cfg.loss), LossParams(beta=cfg.beta, gamma=cfg.simpo_gamma)
    tracker = _MlflowTracker(config["mlflow_tracking_uri"], config["mlflow_run_id"]) if rank == 0 else None
    history: list[dict[str, float]] = []
    rows_per_rank = per_epoch * cfg.per_device_batch_size * cfg.gradient_accumulation_steps
    sums = torch.zeros(4, dtype=torch.float64)  # loss, chosen logratio, rejected logratio, pairs
    for epoch in range(math.ceil(num_steps / per_epoch)):  # none at train.max_steps 0
        order = epoch_rows(len(pairs), epoch=epoch, seed=cfg.seed, rank=rank, world_size=world_size,
                           rows_per_rank=rows_per_rank)
        for start in range(0, len(order), cfg.per_device_batch_size):
            step = len(history) + 1
            if step > num_steps:  # train.max_steps reached inside this epoch
                break
            if time.time() > config["deadline"]:
                raise TimeoutError(f"training did not finish within timeout_s={config['timeout_s']} "
                                   f"(at step {step}/{num_steps})")
            index = order[start : start + cfg.per_device_batch_size]
            batch = {k: v.to(device) for k, v in collate_pairs([pairs[i] for i in index], pad_id).items()}
            policy_chosen, policy_rejected, wpo_weights = pair_logps(engine, batch, wpo_weights=cfg.loss == "wpo")
            ref_rows, prob_rows = ref[index].to(device), probs[index].to(device)
            lengths = response_lengths(batch["loss_mask"])
            losses = loss_fn(PairBatch(
                policy_chosen_logps=policy_chosen,
                policy_rejected_logps=policy_rejected,
                ref_chosen_logps=ref_rows[:, 0],
                ref_rejected_logps=ref_rows[:, 1],
                chosen_probs_win=prob_rows[:, 0],
                chosen_probs_lose=prob_rows[:, 1],
                chosen_probs=prob_rows[:, 2],
                chosen_lengths=lengths[: len(index)],
                rejected_lengths=lengths[len(index):],
                wpo_weights=wpo_weights,
            ), loss_params)
            # Summed over all ranks before backward, so every rank sees a bad loss at once.
            micro = torch.stack([
                losses.sum(),
                (policy_chosen - ref_rows[:, 0]).sum(),
                (policy_rejected - ref_rows[:, 1]).sum(),
                losses.new_tensor(len(index)),
            ]).detach().double()
            dist.all_reduce(micro)
            if not math.isfinite(micro[0].item()):
                raise FloatingPointError(
                    f"non-finite {cfg.loss} loss ({micro[0].item()}) at step {step}/{num_steps}, epoch {epoch}; "
                    f"learning rate {engine.get_lr()[0]:.3g}, eta {cfg.eta}: no checkpoint is written"
                )
            sums += micro.cpu()
            learning_rate = engine.get_lr()[0]
            engine.backward(losses.mean())
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            if not boundary:
                continue
            loss, chosen_logratio, rejected_logratio = (sums[:3] / sums[3]).tolist()
            metrics = {
                "step": step,
                "train/loss": loss,
                "train/chosen_logratio": chosen_logratio,
                "train/rejected_logratio": rejected_logratio,
                "train/learning_rate": learning_rate,
                "train/epoch": epoch + (start + cfg.per_device_batch_size) / len(order),
            }
            if (grad_norm := engine.get_global_grad_norm()) is not None:
                metrics["train/grad_norm"] = float(grad_norm)
            sums.zero_()
            history.append(metrics)
            if tracker is not None:
                tracker.log(metrics, step)
                if step in (1, num_steps) or time.monotonic() - reported >= PROGRESS_EVERY_S:
                    logger.info("training: %s, loss %.4g, lr %.3g", progress(step, num_steps,
                                time.monotonic() - referenced, "steps"), loss, learning_rate)
                    reported = time.monotonic()

    trained = time.monotonic()
    _publish_checkpoint(engine, rank, policy_dir, config["checkpoint_dir"], save_dtype)
    # worker_start: from fit() to this function (Ray Train's controller, the workers' processes,
    # the process group); setup = data (tokenize the pairs) + model_load (weights into ZeRO-3).
    timings = {"worker_start": entered - config["submitted_at"], "imports": imported - entered,
               "setup": loaded - started, "data": encoded - started, "model_load": loaded - encoded,
               "reference_logps": referenced - loaded, "train_steps": trained - referenced,
               "checkpoint_save": time.monotonic() - trained}
    engine.destroy()
    del hf_ds_config
    if rank == 0:
        logger.info("published %s after %d steps in %.1fs",
                    config["checkpoint_dir"], len(history), time.monotonic() - started)
    return {"history": history, "reference_logps": ref.tolist(), "zero3_partition": partition, "timings": timings}


def _load_engine(policy_dir: str, cfg: TrainConfig, num_steps: int, trust_remote_code: bool):
    """The policy as a ZeRO-3 DeepSpeed engine with RMSprop and a linear warmup/decay schedule.

    Also returns transformers' DeepSpeed config holder, which the caller keeps alive while it
    uses the model: transformers finds it through a weakref. from_pretrained then builds the
    model inside zero.Init and loads the weights straight into partitions.
    """
    import deepspeed
    from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup
    from transformers.integrations import HfDeepSpeedConfig

    ds_config = deepspeed_config(cfg)
    hf_ds_config = HfDeepSpeedConfig(ds_config)
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    warmup_steps = math.ceil(cfg.warmup_ratio * num_steps)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.RMSprop(model.parameters(), lr=cfg.learning_rate),
        # Built on the optimizer DeepSpeed returns, which steps it at each accumulation boundary.
        lr_scheduler=lambda optimizer: get_linear_schedule_with_warmup(optimizer, warmup_steps, num_steps),
        config=ds_config,
    )
    return engine, hf_ds_config


def _all_reference_logps(engine, pairs, batch_size, pad_id, device, rank, world_size) -> torch.Tensor:
    """[N, 2] reference log-probs of all pairs on every rank; each rank computes one chunk."""
    import torch.distributed as dist

    chunk = reference_chunk(len(pairs), rank=rank, world_size=world_size)
    local = reference_logps(
        engine, [pairs[i] for i in chunk], batch_size=batch_size, pad_token_id=pad_id, device=device
    )
    gathered = [torch.empty_like(local, device=device) for _ in range(world_size)]
    dist.all_gather(gathered, local.to(device))
    return torch.cat([g.cpu() for g in gathered])[: len(pairs)]


class _MlflowTracker:
    """Live per-step metrics on rank 0; a tracking outage costs metrics, not the run."""

    def __init__(self, tracking_uri: str | None, run_id: str | None):
        self._client = None
        self._run_id = run_id
        if run_id is not None:
            import mlflow

            self._client = mlflow.MlflowClient(tracking_uri)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items() if key != "step"]
        try:  # MLflow's client retries for tracking.outage_limit_s first
            self._client.log_batch(self._run_id, metrics=batch)
        except Exception as err:  # any transport or server error: the driver still gets the history
            logger.warning("MLflow log_batch for run %s at step %d failed, no more live steps from this "
                           "attempt (the driver logs the whole curve when the run is resumed): %s",
                           self._run_id, step, err)
            self._client = None  # each later step would wait out the limit again


def _publish_checkpoint(engine, rank: int, policy_dir: str, checkpoint_dir: str, dtype: torch.dtype) -> None:
    """Gather the ZeRO-3 partitions one parameter at a time and publish an HF checkpoint.

    Every rank takes part in the gathers; rank 0 writes a staging directory beside
    checkpoint_dir and renames it into place, so checkpoint_dir is complete or absent.
    """
    import deepspeed

    state_dict = {}
    for name, param in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if rank == 0:
                state_dict[name] = param.detach().to("cpu", dtype=dtype, copy=True)
    if rank != 0:
        return
    if is_uri(checkpoint_dir):  # shared storage: written here, then uploaded in place of any earlier one
        with tempfile.TemporaryDirectory(prefix="sppo-checkpoint-") as staging:
            _write_checkpoint(engine, policy_dir, Path(staging), checkpoint_dir, state_dict, dtype)
            try:
                fs, path = pafs.FileSystem.from_uri(checkpoint_dir)
                upload_dir(Path(staging), fs, path)
            except Exception as err:
                raise OSError(f"uploading the checkpoint to {checkpoint_dir} failed: {err}") from err
        return
    target = Path(checkpoint_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    replaced = target.parent / f".{target.name}.replaced-{uuid.uuid4().hex[:8]}"
    try:
        _write_checkpoint(engine, policy_dir, staging, str(target), state_dict, dtype)
        staging.chmod(0o755)  # mkdtemp makes it 0700
        if target.exists():  # an earlier attempt's checkpoint: set aside, never merged with
            target.rename(replaced)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(replaced, ignore_errors=True)  # only once the new checkpoint is in place


def _write_checkpoint(engine, policy_dir: str, staging: Path, target: str, state_dict: dict, dtype) -> None:
    """The HF checkpoint (weights, config, generation config) plus the policy's other files
    (tokenizer, chat template) into staging."""
    engine.module.config.dtype = dtype
    try:
        engine.module.save_pretrained(staging, state_dict=state_dict)
        for source in Path(policy_dir).iterdir():
            written_here = source.name in _MODEL_FILES or source.name.endswith(_WEIGHT_SUFFIXES)
            if source.is_file() and not written_here:
                shutil.copy2(source, staging / source.name)
    except Exception as err:  # safetensors reports a full disk as its own error type
        raise OSError(f"writing the checkpoint for {target} failed: {err}") from err


# ---------------------------------------------------------------- driver


def _fit_watching_nodes(trainer, watch: NodeWatch):
    """trainer.fit() in a thread while this one checks the nodes: a restarted worker group that
    cannot be placed would otherwise wait for a lost node's resources until timeout_s."""
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
        if thread.is_alive():
            watch.check()  # raises; the job's end takes Ray Train's controller and workers with it
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _absolute(spec: str) -> str:
    """Paths are handed to workers absolute; storage URIs and tiny: specs as they are."""
    return str(Path(spec).resolve()) if is_local_path(spec) else spec


def train_policy(
    pairs_path: str,
    policy_dir: str,
    checkpoint_dir: str,
    cfg: TrainConfig,
    *,
    storage_dir: str,
    mlflow_tracking_uri: str | None = None,
    mlflow_run_id: str | None = None,
    timeout_s: float | None = None,
    trust_remote_code: bool = False,
    node_lost_s: float | None = None,
) -> TrainResult:
    """Train pi_{t+1} from pi_t (policy_dir) on pairs_path; publish it at checkpoint_dir.

    An existing checkpoint_dir is replaced only once the new checkpoint is complete.
    timeout_s is enforced three ways, since fit() itself has no timeout: the workers check
    the deadline before each micro-batch, the process group times out any collective after
    timeout_s, and placing the workers is retried for about timeout_s (at least 60 s).
    node_lost_s: fail that long after a node the training started with leaves the cluster, if
    the training has not finished without it (`sppo.cluster.NodeWatch`); None: never.
    Raises TrainingError with the worker's message when training fails.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    if is_local_path(policy_dir) and not Path(policy_dir, "config.json").is_file():
        raise FileNotFoundError(f"policy_dir {policy_dir}: no config.json (needs a local model directory)")
    rows = read_pairs(pairs_path, sampled_tokens=cfg.reference_logps == "sampler")
    num_steps = total_steps(len(rows), cfg)
    get_loss(cfg.loss)

    resources = worker_resources(cfg)
    backend = "nccl" if cfg.use_gpu else "gloo"
    # A dead worker restarts the whole group, which retrains from pi_t: the checkpoint is
    # published only at the end, so a restart never resumes from a half-trained state.
    torch_config, failure_config = TorchConfig(backend=backend), FailureConfig(max_failures=cfg.max_failures)
    if timeout_s is not None:
        torch_config = TorchConfig(backend=backend, timeout_s=max(1, math.ceil(timeout_s)))
        # Ray Train retries placing the workers every WORKER_GROUP_START_TIMEOUT_S (60 s),
        # forever by default: this bounds the retries to about timeout_s.
        failure_config = FailureConfig(
            max_failures=cfg.max_failures, controller_failure_limit=max(0, math.ceil(timeout_s / 60) - 1)
        )
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(),
            "rows": rows,
            "policy_dir": _absolute(policy_dir),
            "checkpoint_dir": _absolute(checkpoint_dir),
            "mlflow_tracking_uri": mlflow_tracking_uri,
            "mlflow_run_id": mlflow_run_id,
            "deadline": time.time() + timeout_s if timeout_s is not None else math.inf,
            "timeout_s": timeout_s,
            "trust_remote_code": trust_remote_code,
            "submitted_at": time.time(),
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
        ),
        torch_config=torch_config,
        run_config=RunConfig(
            storage_path=_absolute(storage_dir),
            name=f"train-{Path(checkpoint_dir).name}-{uuid.uuid4().hex[:8]}",
            failure_config=failure_config,
        ),
    )
    logger.info(
        "training %s on %d pairs: %d steps of %d pairs on %d workers",
        policy_dir, len(rows), num_steps, cfg.global_batch_size, cfg.num_workers,
    )
    watch = NodeWatch("training", node_lost_s) if node_lost_s is not None else None
    try:
        result = trainer.fit() if watch is None else _fit_watching_nodes(trainer, watch)
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
