"""The training recipe: pi_t -> pi_{t+1} on preference pairs with DeepSpeed ZeRO-3 and RMSprop,
in whatever torch.distributed process group it starts in: Ray Train's (`sppo.training`, as a
job runs it), torchrun's, or a one-process group in a test. Nothing here imports Ray.

`train` reads top to bottom: setup (tokenize the pairs, load pi_t into ZeRO-3 partitions),
reference log-probs, the train loop, save. Where log pi_ref comes from (train.reference_logps):
- policy: the model being trained, once, before its first optimizer step (its weights are then
  pi_t), so no second copy is held;
- sampler: the log-probs vLLM reported while pi_t sampled the responses: no reference pass;
- online: the reference pipeline's way, a frozen second copy of pi_t under ZeRO-3 run forward
  at every step (twice the weights held: the training benchmark's baseline); with train.lora,
  the same model under pi_t's adapter frozen (or switched off when pi_t is the base): no second
  copy of the weights.

With train.lora, pi_t is the base plus an adapter (`--adapter`; none at the first iteration): the
base loads frozen, pi_t's adapter (or a fresh one, B = 0) is the only trainable state and is
continued, so pi_{t+1} is the same base plus one adapter, published alone in the checkpoint's
adapter/.

Without any orchestrator, on the job's own config:

    torchrun --nproc-per-node 2 -m sppo.training_recipe --pairs outputs/tiny/iter-1/pairs.parquet \\
        --policy tiny:policy --checkpoint /tmp/pi1 [--config configs/tiny.yaml] [--set train.epochs=1 ...]
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from sppo.checkpoint import publish_checkpoint
from sppo.config import LoraConfig, TrainConfig
from sppo.losses import (
    LossParams,
    PairBatch,
    get_loss,
    response_lengths,
    sequence_logps,
    sequence_wpo_logweights,
    wpo_pair_weights,
)
from sppo.policy import ADAPTER_CONFIG
from sppo.progress import PROGRESS_EVERY_S, progress
from sppo.training_data import (
    EncodedPair,
    EncodedSequence,
    collate_pairs,
    encode_pairs,
    epoch_rows,
    read_pairs,
    reference_chunk,
    steps_per_epoch,
    total_steps,
)

if TYPE_CHECKING:
    from sppo.tracking import LiveMetrics

logger = logging.getLogger("sppo.training")


T = TypeVar("T")


@dataclass(frozen=True)
class RecipeResult:
    history: list[dict[str, float]]  # one entry per optimizer step, with "step"
    # Per pairs-file row, [chosen, rejected] summed response log-probs under pi_t; none with 'online'.
    reference_logps: list[list[float]]
    # Evidence that ZeRO-3 sharded the weights: the largest parameter's full size, this rank's
    # shard of it and what this rank still holds of it between forward passes; all parameters'
    # size, and the trainable ones' (with train.lora, the adapter's) and this rank's shards of them.
    zero3_partition: dict[str, int]
    # Seconds per phase: setup (= data + model_load), reference_logps, train_steps, checkpoint_save.
    timings: dict[str, float]


# ---------------------------------------------------------------- components


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
            # A gathered layer is freed after its use and at most 1e8 parameters are gathered
            # ahead. DeepSpeed's defaults (1e9 each) kept a whole 1B model gathered on every
            # worker through each step (docs/performance.md, "LoRA at a billion parameters"):
            # its memory, against re-gathering the last layers for the backward pass.
            "stage3_max_reuse_distance": 0,
            "stage3_max_live_parameters": 100_000_000,
        },
        # ZeRO only vouches for its own optimizers; RMSprop is what SPPO trains with.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


# glibc's own initial threshold (bytes), kept fixed by setting it (`release_freed_blocks`).
MMAP_THRESHOLD = 128 * 1024


def release_freed_blocks() -> None:
    """Have glibc give every block above MMAP_THRESHOLD its own mapping, returned to the OS when freed.

    By default glibc raises that threshold to the largest block freed so far (up to 32 MiB), and
    blocks under it come from the heap, whose freed space stays resident. ZeRO-3 gathers each
    layer's weights into new blocks of a few MiB and frees them after use, so a worker's resident
    memory grew by most of the gathered model in the first optimizer step (docs/performance.md,
    "LoRA at a billion parameters"). No-op where the C library has no mallopt.
    """
    import ctypes
    import ctypes.util

    mallopt = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallopt", None)
    if mallopt is not None:
        M_MMAP_THRESHOLD = -3  # malloc.h
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


@contextlib.contextmanager
def stacks_if_setup_stuck(after_s: float) -> Iterator[None]:
    """Within the block, write every thread's stack to stderr once, after_s from its start, unless
    `train` has loaded the model by then (which cancels it). A rank stuck in setup outside any
    collective (imports, the data, DeepSpeed's comm layer) is otherwise silent: only its peers
    time out, in their next collective, and they cannot say where it is. faulthandler's watchdog
    is a C thread, so the dump comes even if the stuck thread holds the GIL; it starts with
    `Timeout (h:mm:ss)!`."""
    faulthandler.dump_traceback_later(after_s, repeat=False, file=sys.stderr)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def on_every_rank(step: Callable[[], T]) -> T:
    """step() on this rank, agreed with the others by one all_gather: if it raised OSError or
    ValueError on any rank, every rank raises it (the lowest such rank's, naming it). Raised on
    one rank alone, it would be returned by that rank alone (the Ray shell returns such errors),
    its peers waiting in the model load's first broadcast until timeouts.collective_s, and the
    driver, which sees rank 0's result only, would never see it."""
    import torch.distributed as dist

    try:
        value, failure = step(), None
    except (OSError, ValueError) as err:
        value, failure = None, (isinstance(err, ValueError), f"{type(err).__name__}: {err}")
        own = err
    failures: list[tuple[bool, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    for rank, failed in enumerate(failures):
        if failed is not None:
            is_value_error, message = failed
            error = (ValueError if is_value_error else OSError)(f"rank {rank}: {message}")
            raise error from (own if failure is not None else None)
    return value


def init_deepspeed(backend: str) -> None:
    """DeepSpeed's comm layer on the caller's process group, without DeepSpeed's CPU shared-memory op.

    That op serves only the all-reduce of DeepSpeed inference's tensor-parallel layers, which
    ZeRO-3 training never calls, yet DeepSpeed compiles it (g++ against torch's headers, most of
    a minute on 2 cores) into TORCH_EXTENSIONS_DIR the first time a process initializes on CPUs
    (docs/performance.md, "Install"). Marked incompatible, it is neither built nor loaded, and
    collectives go through torch.distributed as with any other backend.
    """
    import deepspeed
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    deepspeed.init_distributed(dist_backend=backend)


def load_engine(policy_dir: str, cfg: TrainConfig, num_steps: int, trust_remote_code: bool,
                adapter_dir: str | None = None):
    """The policy as a ZeRO-3 DeepSpeed engine with RMSprop and a linear warmup/decay schedule.
    With train.lora, policy_dir is the base and adapter_dir pi_t's adapter (None: pi_t is the base).

    Also returns transformers' DeepSpeed config holder, which the caller keeps alive while it
    loads or uses models: transformers finds it through a weakref, and from_pretrained then
    builds the model inside zero.Init and loads the weights straight into partitions.
    """
    import deepspeed
    from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup
    from transformers.integrations import HfDeepSpeedConfig

    ds_config = deepspeed_config(cfg)
    hf_ds_config = HfDeepSpeedConfig(ds_config)
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=_train_dtype(cfg),
                                                 trust_remote_code=trust_remote_code)
    # Also makes the embeddings' output require grad, so that checkpointed layers of a frozen base
    # still pass gradients to their adapters (tests/test_lora.py).
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.lora is not None:
        model = add_adapter(model, cfg.lora, adapter_dir, reference_copy=cfg.reference_logps == "online")
    warmup_steps = math.ceil(cfg.warmup_ratio * num_steps)
    engine, *_ = deepspeed.initialize(
        model=model,
        # With an adapter, its parameters only: DeepSpeed keeps optimizer state for these alone.
        optimizer=torch.optim.RMSprop([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate),
        # Built on the optimizer DeepSpeed returns, which steps it at each accumulation boundary.
        lr_scheduler=lambda optimizer: get_linear_schedule_with_warmup(optimizer, warmup_steps, num_steps),
        config=ds_config,
    )
    return engine, hf_ds_config


REFERENCE_ADAPTER = "reference"  # train.reference_logps 'online' with an adapter: pi_t's, frozen


def add_adapter(model, lora: LoraConfig, adapter_dir: str | None = None, reference_copy: bool = False):
    """`model` (the base, possibly ZeRO-3 partitioned) frozen under a peft LoRA adapter, the only
    trainable parameters: pi_t's adapter from adapter_dir, continued, or a fresh one (B = 0, so
    the model is exactly the base until a step). reference_copy: pi_t's adapter also loaded
    frozen as REFERENCE_ADAPTER, for the online reference."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    config = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")
    # Whatever their names: vLLM's log-probs ignore adapters on the LM head and embeddings.
    embeddings = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    try:
        # The adapter in the base's dtype: DeepSpeed keeps float32 masters itself under bf16.
        if adapter_dir is None:
            model = get_peft_model(model, config, autocast_adapter_dtype=False)
        else:
            model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True, autocast_adapter_dtype=False)
            check_adapter_config(model.peft_config["default"], config, adapter_dir)
            if reference_copy:
                model.load_adapter(adapter_dir, adapter_name=REFERENCE_ADAPTER, is_trainable=False,
                                   autocast_adapter_dtype=False)
    except ValueError as err:  # peft names the modules it did not find
        raise ValueError(f"train.lora.target_modules: {err}") from err
    wrapped = [name for name, module in model.named_modules()
               if isinstance(module, BaseTunerLayer) and id(module.get_base_layer()) in embeddings]
    if wrapped:
        raise ValueError(f"train.lora.target_modules {lora.target_modules} wrap the LM head or embeddings "
                         f"({', '.join(wrapped)}); vLLM's log-probs ignore adapters there")
    return model


def check_adapter_config(loaded, asked, adapter_dir: str) -> None:
    """pi_t's adapter is continued as it was trained: train.lora must still describe it."""
    differ = [f"train.lora.{field} is {mine!r}, the adapter's {theirs!r}"
              for field, mine, theirs in (("rank", asked.r, loaded.r), ("alpha", asked.lora_alpha, loaded.lora_alpha),
                                          ("target_modules", set(asked.target_modules), set(loaded.target_modules)))
              if mine != theirs]
    if differ:
        raise ValueError(f"pi_t's adapter {adapter_dir} cannot be continued: {'; '.join(differ)}")


def load_frozen_reference(policy_dir: str, cfg: TrainConfig, trust_remote_code: bool):
    """train.reference_logps 'online': a second copy of pi_t, ZeRO-3 partitioned, for forward
    passes only. Load it while load_engine's config holder lives."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=_train_dtype(cfg),
                                                 trust_remote_code=trust_remote_code)
    reference, *_ = deepspeed.initialize(model=model, config=deepspeed_config(cfg))
    reference.eval()
    return reference


def _train_dtype(cfg: TrainConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.bf16 else torch.float32


@torch.no_grad()
def online_reference_logps(engine, frozen, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """train.reference_logps 'online': [B, 2] (chosen, rejected) log-probs under pi_t of this batch:
    the frozen copy's, or with an adapter (no second model), the model's under pi_t's adapter
    frozen (REFERENCE_ADAPTER, by peft's per-row adapter names), or with the adapter switched off
    when pi_t is the base. In eval mode, as the other modes."""
    if frozen is not None:
        return torch.stack(pair_logps(frozen, batch)[:2], dim=1)
    engine.eval()
    try:
        if REFERENCE_ADAPTER in engine.module.peft_config:
            names = [REFERENCE_ADAPTER] * batch["input_ids"].shape[0]
            return torch.stack(pair_logps(engine, batch, adapter_names=names)[:2], dim=1)
        with engine.module.disable_adapter():
            return torch.stack(pair_logps(engine, batch)[:2], dim=1)
    finally:
        engine.train()


def pair_logps(
    model, batch: dict[str, torch.Tensor], *, wpo_weights: bool = False, adapter_names: list[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Summed response log-probs (chosen [B], rejected [B]) from one forward pass, and with
    wpo_weights WPO's pair weights [B] under this model from the same logits (else None).
    adapter_names: a peft model's adapter for each row (eval mode only)."""
    input_ids = batch["input_ids"]
    extra = {} if adapter_names is None else {"adapter_names": adapter_names}
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"], use_cache=False, **extra).logits
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


def all_reference_logps(engine, pairs: Sequence[EncodedPair], *, batch_size: int, pad_token_id: int,
                        device) -> torch.Tensor:
    """[N, 2] reference log-probs of all pairs on every rank; each rank computes one chunk."""
    import torch.distributed as dist

    world_size = dist.get_world_size()
    chunk = reference_chunk(len(pairs), rank=dist.get_rank(), world_size=world_size)
    local = reference_logps(engine, [pairs[i] for i in chunk], batch_size=batch_size, pad_token_id=pad_token_id,
                            device=device)
    gathered = [torch.empty_like(local, device=device) for _ in range(world_size)]
    dist.all_gather(gathered, local.to(device))
    return torch.cat([g.cpu() for g in gathered])[: len(pairs)]


def sampler_reference_logps(pairs: Sequence[EncodedPair], rows: Sequence[dict[str, Any]]) -> torch.Tensor:
    """[N, 2] (chosen, rejected) reference log-probs from the sampler's per-token log-probs:
    each summed over the response tokens that `encode_pairs(sampled_tokens=True)` kept."""

    def kept(seq: EncodedSequence, logps: list[float]) -> float:
        return math.fsum(logps[: len(seq.input_ids) - seq.prompt_length])

    return torch.tensor([[kept(pair.chosen, row["chosen_token_logps"]),
                          kept(pair.rejected, row["rejected_token_logps"])]
                         for pair, row in zip(pairs, rows, strict=True)], dtype=torch.float32)


# ---------------------------------------------------------------- the recipe


def train(
    cfg: TrainConfig,
    rows: list[dict[str, Any]],
    policy_dir: str,
    checkpoint_dir: str,
    *,
    device: torch.device,
    timeout_s: float | None = None,
    started_at: float | None = None,
    live_metrics: LiveMetrics | None = None,
    trust_remote_code: bool = False,
    adapter_dir: str | None = None,
) -> RecipeResult:
    """Train pi_{t+1} from pi_t (the local model directory policy_dir) on the pairs `rows`
    (`read_pairs`), publish it at checkpoint_dir, on every rank of the current process group.
    With train.lora, pi_t is policy_dir plus the adapter in adapter_dir (None: a fresh one).

    timeout_s: checked at each micro-batch against started_at (wall clock; default now), every
    rank stopping at the same one.
    live_metrics: where rank 0 logs each optimizer step. Raises FloatingPointError (a
    non-finite loss), TimeoutError, OSError (a checkpoint that cannot be written) or ValueError
    (the data); nothing is published then. What each rank reads for itself before the model load
    (the tokenizer, the pairs, the config, the weights' and adapter's presence) raises on every rank if it fails
    on any (`on_every_rank`).
    """
    import torch.distributed as dist
    from transformers import AutoConfig, AutoTokenizer

    release_freed_blocks()
    # The process group is the caller's (Ray Train, torchrun); DeepSpeed wraps it.
    init_deepspeed("nccl" if cfg.use_gpu else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if world_size != cfg.num_workers:  # the global batch, and so the schedule, counts them
        raise ValueError(f"train.num_workers is {cfg.num_workers}, but the process group has {world_size} processes")
    deadline = (started_at or time.time()) + timeout_s if timeout_s is not None else math.inf
    torch.manual_seed(cfg.seed)

    # Setup: the pairs tokenized as sampling saw them, then pi_t into ZeRO-3 partitions.
    started = time.monotonic()

    def read_inputs():
        tokenizer = AutoTokenizer.from_pretrained(policy_dir, trust_remote_code=trust_remote_code)
        pairs = encode_pairs(tokenizer, rows, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                             sampled_tokens=cfg.reference_logps == "sampler")
        # The checkpoint is saved in the dtype the policy came in, whatever the training dtype.
        config = AutoConfig.from_pretrained(policy_dir, trust_remote_code=trust_remote_code)
        if Path(policy_dir).is_dir() and not any(Path(policy_dir).glob("*.safetensors")):
            raise FileNotFoundError(f"policy {policy_dir}: no *.safetensors weights on this node")
        if adapter_dir is not None and not Path(adapter_dir, ADAPTER_CONFIG).is_file():
            raise FileNotFoundError(f"pi_t's adapter {adapter_dir}: no {ADAPTER_CONFIG} on this node")
        return tokenizer, pairs, config.dtype or torch.float32

    # What this node reads for itself, agreed before the first collective of the model load.
    tokenizer, pairs, save_dtype = on_every_rank(read_inputs)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    probs = torch.tensor([[r["chosen_probs_win"], r["chosen_probs_lose"], r["chosen_probs"]] for r in rows])
    per_epoch, num_steps = steps_per_epoch(len(rows), cfg), total_steps(len(rows), cfg)
    encoded = time.monotonic()
    engine, hf_ds_config = load_engine(policy_dir, cfg, num_steps, trust_remote_code, adapter_dir)
    frozen = None
    try:
        if cfg.reference_logps == "online" and cfg.lora is None:
            frozen = load_frozen_reference(policy_dir, cfg, trust_remote_code)
        loaded = time.monotonic()
        faulthandler.cancel_dump_traceback_later()  # setup is over (stacks_if_setup_stuck)

        # Reference log-probs: every row's, before any step (or, online, at each step).
        ref = torch.empty((0, 2))
        if cfg.reference_logps == "sampler":  # log pi_t(y|x) as vLLM computed it while pi_t sampled y
            ref = sampler_reference_logps(pairs, rows)
        elif cfg.reference_logps == "policy":  # pi_ref = the weights as loaded
            engine.eval()
            ref = all_reference_logps(engine, pairs, batch_size=cfg.per_device_batch_size, pad_token_id=pad_id,
                                      device=device)
        engine.train()
        largest = max(engine.module.parameters(), key=lambda p: p.ds_numel)
        trainable = [p for p in engine.module.parameters() if p.requires_grad]  # with train.lora, the adapter's
        partition = {
            "param_numel": int(largest.ds_numel),
            "local_numel": int(largest.ds_tensor.numel()),  # this rank's shard
            # After forward passes, only parameters ZeRO-3 keeps whole (persistent) are still held.
            "resident_numel": int(largest.data.numel()),
            "world_size": world_size,
            "numel": sum(int(p.ds_numel) for p in engine.module.parameters()),
            "trainable_numel": sum(int(p.ds_numel) for p in trainable),
            "trainable_local_numel": sum(int(p.ds_tensor.numel()) for p in trainable),
        }
        if rank == 0:
            logger.info("reference log-probs of %d pairs (%s) in %.1fs", len(pairs), cfg.reference_logps,
                        time.monotonic() - loaded)
            if cfg.lora is not None:
                logger.info("LoRA rank %d: %d trainable parameters, %.2f%% of %d", cfg.lora.rank,
                            partition["trainable_numel"], 100 * partition["trainable_numel"] / partition["numel"],
                            partition["numel"])
        referenced = reported = time.monotonic()

        # The train loop: train.epochs seeded shuffles, cut at train.max_steps.
        loss_fn, loss_params = get_loss(cfg.loss), LossParams(beta=cfg.beta, gamma=cfg.simpo_gamma)
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
                late = time.time() > deadline  # agreed below, so that every rank stops at the same micro-batch
                index = order[start : start + cfg.per_device_batch_size]
                batch = {k: v.to(device) for k, v in collate_pairs([pairs[i] for i in index], pad_id).items()}
                # The reference first: with an adapter it is a forward pass of the engine itself.
                if cfg.reference_logps == "online":
                    ref_rows = online_reference_logps(engine, frozen, batch)
                else:
                    ref_rows = ref[index].to(device)
                policy_chosen, policy_rejected, wpo_weights = pair_logps(engine, batch, wpo_weights=cfg.loss == "wpo")
                prob_rows = probs[index].to(device)
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
                # Summed over all ranks before backward, so every rank sees a bad loss, or a rank past
                # the deadline, at once.
                micro = torch.stack([
                    losses.sum(),
                    (policy_chosen - ref_rows[:, 0]).sum(),
                    (policy_rejected - ref_rows[:, 1]).sum(),
                    losses.new_tensor(len(index)),
                    losses.new_tensor(float(late)),
                ]).detach().double()
                dist.all_reduce(micro)
                if micro[4].item() > 0:
                    raise TimeoutError(f"training did not finish within timeout_s={timeout_s} "
                                       f"(at step {step}/{num_steps})")
                if not math.isfinite(micro[0].item()):
                    raise FloatingPointError(
                        f"non-finite {cfg.loss} loss ({micro[0].item()}) at step {step}/{num_steps}, epoch {epoch}; "
                        f"learning rate {engine.get_lr()[0]:.3g}, eta {cfg.eta}: no checkpoint is written"
                    )
                sums += micro[:4].cpu()
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
                if rank == 0:
                    if live_metrics is not None:
                        live_metrics.log(metrics, step)
                    if step in (1, num_steps) or time.monotonic() - reported >= PROGRESS_EVERY_S:
                        logger.info("training: %s, loss %.4g, lr %.3g", progress(step, num_steps,
                                    time.monotonic() - referenced, "steps"), loss, learning_rate)
                        reported = time.monotonic()

        # Save: gathered, written beside checkpoint_dir and renamed into place.
        trained = time.monotonic()
        publish_checkpoint(engine, policy_dir, checkpoint_dir, save_dtype)
    finally:  # a failed attempt frees its partitions, and later loads in this process are not partitioned
        for model in (engine, frozen):
            if model is not None:
                model.destroy()
        del hf_ds_config
    saved = time.monotonic()
    if rank == 0:
        logger.info("published %s after %d steps in %.1fs", checkpoint_dir, len(history), saved - started)
    timings = {"setup": loaded - started, "data": encoded - started, "model_load": loaded - encoded,
               "reference_logps": referenced - loaded, "train_steps": trained - referenced,
               "checkpoint_save": saved - trained}
    return RecipeResult(history=history, reference_logps=ref.tolist(), zero3_partition=partition, timings=timings)


# ---------------------------------------------------------------- torchrun


def main(argv: list[str] | None = None) -> None:
    from sppo.config import ConfigError, load_config, parse_override
    from sppo.tiny import resolve_model

    parser = argparse.ArgumentParser(prog="python -m sppo.training_recipe",
                                     description="One SPPO training stage in a torch.distributed process group "
                                                 "(start it with torchrun).")
    parser.add_argument("--pairs", required=True, help="a pairs.parquet file, as the pairs stage writes it")
    parser.add_argument("--policy", required=True, help="pi_t: a local model directory or tiny:policy (with "
                        "train.lora and --adapter: the base)")
    parser.add_argument("--adapter", help="with train.lora: pi_t's adapter directory, continued (default: a fresh one)")
    parser.add_argument("--checkpoint", required=True, help="where pi_{t+1} is published")
    parser.add_argument("--config", help="a job config (YAML): its train section (default: the defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="train.KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, dict(parse_override(text) for text in args.overrides)).train
    except ConfigError as err:
        parser.error(str(err))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cfg.use_gpu else torch.device("cpu")
    if cfg.use_gpu:
        torch.cuda.set_device(device)
    result = train(cfg, read_pairs(args.pairs, sampled_tokens=cfg.reference_logps == "sampler"),
                   resolve_model(args.policy), args.checkpoint, device=device, adapter_dir=args.adapter)
    if int(os.environ.get("RANK", "0")) == 0 and result.history:
        print(f"trained {len(result.history)} steps, last loss {result.history[-1]['train/loss']:.4g}; "
              f"published {args.checkpoint}")


if __name__ == "__main__":
    main()
