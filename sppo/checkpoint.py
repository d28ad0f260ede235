"""The trained policy's checkpoint: gathered from its ZeRO-3 partitions one parameter at a time,
written shard by shard as a Hugging Face model directory (safetensors, config, generation config)
with the policy's tokenizer and chat template, and published atomically (locally) or uploaded
(shared storage).

Rank 0 holds at most one shard of the gathered model at a time (`SHARD_BYTES`), never the whole
model: a 9B policy in bf16 is 18 GB, on top of what ZeRO-3 already keeps on each rank.

A policy trained as a LoRA adapter (train.lora) is published as its adapter alone, in
`adapter/` (peft's adapter_config.json + adapter_model.safetensors): pi_{t+1} is the base plus it,
served as such, and `python -m sppo.export` merges the two into a full model on request.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs
import torch

from sppo.policy import ADAPTER_DIR
from sppo.storage import follow_umask, is_uri, publish_directory, upload_dir

# Files of a model directory that the checkpoint writes itself rather than copies.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
_MODEL_FILES = ("config.json", "generation_config.json")
SHARD_BYTES = 2 * 2**30
INDEX_FILE = "model.safetensors.index.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def shard_plan(sizes: list[tuple[str, int]], limit: int) -> list[list[str]]:
    """Parameter names, in order, cut into consecutive shards of at most `limit` bytes (a larger
    parameter alone in a shard of its own)."""
    shards: list[list[str]] = []
    used = 0
    for name, size in sizes:
        if not shards or (used + size > limit and shards[-1]):
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def shard_file(index: int, count: int) -> str:
    """Hugging Face's names: one file is model.safetensors, more are model-0000i-of-0000n."""
    return "model.safetensors" if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def publish_checkpoint(engine, policy_dir: str, checkpoint_dir: str, dtype: torch.dtype) -> None:
    """Gather the ZeRO-3 partitions shard by shard and publish an HF checkpoint (a peft model,
    train.lora: its trained adapter alone, in adapter/).

    Every rank takes part in the gathers; rank 0 writes each shard as it is gathered and
    publishes the directory, so checkpoint_dir is complete or absent, and an earlier attempt's is
    replaced, never merged with.
    """
    model = engine.module
    peft = sys.modules.get("peft")  # not imported: no adapter
    if peft is not None and isinstance(model, peft.PeftModel):
        _publish_adapter(model, checkpoint_dir)
    else:
        _publish(model, policy_dir, checkpoint_dir, dtype)


def _publish_adapter(model, checkpoint_dir: str) -> None:
    """Gather the adapter's ZeRO-3 partitions (every rank) and, on rank 0, publish it with peft's
    save into checkpoint_dir/adapter/."""
    import deepspeed
    import torch.distributed as dist

    adapter = {name: p for name, p in model.named_parameters() if p.requires_grad}
    with deepspeed.zero.GatheredParameters(list(adapter.values()), modifier_rank=None):
        # Handed to peft's save whole: its own state dict would take this rank's partitions.
        state = {name: p.detach().to("cpu", copy=True) for name, p in adapter.items()} if dist.get_rank() == 0 else None
    if state is None:
        return

    def fill(staging: Path) -> None:
        try:
            # The trained adapter alone: with an online reference, pi_t's frozen copy is loaded beside it.
            model.save_pretrained(str(staging / ADAPTER_DIR), state_dict=state, selected_adapters=["default"])
            for written in (staging / ADAPTER_DIR).iterdir():
                follow_umask(written)
        except Exception as err:  # safetensors reports a full disk as its own error type
            raise OSError(f"writing the adapter ({ADAPTER_DIR}/{ADAPTER_WEIGHTS}) for {checkpoint_dir} failed: "
                          f"{err}") from err
        check_adapter(staging / ADAPTER_DIR)

    _publish_directory(checkpoint_dir, fill)


def check_adapter(directory: Path) -> None:
    """A saved adapter whose tensors are all whole matrices (ZeRO-3 saves of adapters have produced
    empty ones: peft #2892)."""
    from safetensors.torch import load_file

    tensors = load_file(directory / ADAPTER_WEIGHTS)
    empty = [name for name, t in tensors.items() if t.dim() != 2 or t.numel() == 0]
    if not tensors or empty:
        raise ValueError(f"the adapter saved in {directory} is empty or partial: {empty or 'no tensors'}")


def _publish(model, policy_dir: str, checkpoint_dir: str, dtype: torch.dtype) -> None:
    import torch.distributed as dist

    params = dict(model.named_parameters())
    itemsize = torch.empty((), dtype=dtype).element_size()
    # ZeRO-3 leaves each rank a partition; ds_numel is the whole parameter's size.
    sizes = [(name, getattr(p, "ds_numel", p.numel()) * itemsize) for name, p in params.items()]
    shards = shard_plan(sizes, SHARD_BYTES)
    if dist.get_rank() != 0:
        _gather_shards(params, shards, dtype, write=None)
        return

    def fill(staging: Path) -> None:
        try:
            _gather_shards(params, shards, dtype,
                           write=lambda name, tensors: _save_shard(tensors, staging / name))
            _write_model_files(model, policy_dir, staging, shards, sum(size for _, size in sizes), dtype)
        except Exception as err:  # safetensors reports a full disk as its own error type
            raise OSError(f"writing the checkpoint for {checkpoint_dir} failed: {err}") from err

    _publish_directory(checkpoint_dir, fill)


def _publish_directory(checkpoint_dir: str, fill: Callable[[Path], None]) -> None:
    """checkpoint_dir filled by `fill`, whole or not at all: locally by `publish_directory`; on
    shared storage written here, then uploaded in place of any earlier one."""
    if not is_uri(checkpoint_dir):
        publish_directory(Path(checkpoint_dir), fill)
        return
    with tempfile.TemporaryDirectory(prefix="sppo-checkpoint-") as staging:
        fill(Path(staging))
        try:
            fs, path = pafs.FileSystem.from_uri(checkpoint_dir)
            upload_dir(Path(staging), fs, path)
        except Exception as err:
            raise OSError(f"uploading the checkpoint to {checkpoint_dir} failed: {err}") from err


def _gather_shards(params: dict, shards: list[list[str]], dtype: torch.dtype,
                   write: Callable[[str, dict], None] | None) -> None:
    """Gather every parameter, shard by shard, on every rank (the gathers are collective); on rank
    0 (`write` given) each shard is copied out and written before the next is gathered. A failed
    write is raised only after the last gather, so that the other ranks are never left waiting
    in one."""
    import deepspeed

    failed: Exception | None = None
    for index, names in enumerate(shards):
        tensors = {}
        for name in names:
            with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=None):
                if write is not None and failed is None:
                    tensors[name] = params[name].detach().to("cpu", dtype=dtype, copy=True)
        if write is not None and failed is None:
            try:
                write(shard_file(index, len(shards)), tensors)
            except Exception as err:
                failed = err
        del tensors
    if failed is not None:
        raise failed


def _save_shard(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})  # transformers loads "pt" safetensors
    follow_umask(path)  # safetensors leaves its temporary file's 0600


def _write_model_files(model, policy_dir: str, staging: Path, shards: list[list[str]], total_bytes: int,
                       dtype: torch.dtype) -> None:
    """Beside the shards: the index (more than one shard), config, generation config, and the
    policy's other files (tokenizer, chat template)."""
    if len(shards) > 1:
        weight_map = {name: shard_file(i, len(shards)) for i, names in enumerate(shards) for name in names}
        (staging / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=2))
    model.config.dtype = dtype
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(staging)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(staging)
    for source in Path(policy_dir).iterdir():
        written_here = source.name in _MODEL_FILES or source.name.endswith(_WEIGHT_SUFFIXES)
        if source.is_file() and not written_here:
            shutil.copyfile(source, staging / source.name)  # the umask's mode, not the policy's files
