"""The trained policy's checkpoint: gathered from its ZeRO-3 partitions one parameter at a time,
written shard by shard as a Hugging Face model directory (safetensors, config, generation config)
with the policy's tokenizer and chat template, and published atomically (locally) or uploaded
(shared storage).

Rank 0 holds at most one shard of the gathered model at a time (`SHARD_BYTES`), never the whole
model: a 9B policy in bf16 is 18 GB, on top of what ZeRO-3 already keeps on each rank.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs
import torch

from sppo.storage import follow_umask, is_uri, publish_directory, upload_dir

# Files of a model directory that the checkpoint writes itself rather than copies.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
_MODEL_FILES = ("config.json", "generation_config.json")
SHARD_BYTES = 2 * 2**30
INDEX_FILE = "model.safetensors.index.json"


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
    """Gather the ZeRO-3 partitions shard by shard and publish an HF checkpoint.

    Every rank takes part in the gathers; rank 0 writes each shard as it is gathered and
    publishes the directory (`publish_directory`), so checkpoint_dir is complete or absent, and an
    earlier attempt's is replaced, never merged with.
    """
    import torch.distributed as dist

    params = dict(engine.module.named_parameters())
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
            _write_model_files(engine, policy_dir, staging, shards, sum(size for _, size in sizes), dtype)
        except Exception as err:  # safetensors reports a full disk as its own error type
            raise OSError(f"writing the checkpoint for {checkpoint_dir} failed: {err}") from err

    if is_uri(checkpoint_dir):  # shared storage: written here, then uploaded in place of any earlier one
        with tempfile.TemporaryDirectory(prefix="sppo-checkpoint-") as staging:
            fill(Path(staging))
            try:
                fs, path = pafs.FileSystem.from_uri(checkpoint_dir)
                upload_dir(Path(staging), fs, path)
            except Exception as err:
                raise OSError(f"uploading the checkpoint to {checkpoint_dir} failed: {err}") from err
        return
    publish_directory(Path(checkpoint_dir), fill)


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


def _write_model_files(engine, policy_dir: str, staging: Path, shards: list[list[str]], total_bytes: int,
                       dtype: torch.dtype) -> None:
    """Beside the shards: the index (more than one shard), config, generation config, and the
    policy's other files (tokenizer, chat template)."""
    if len(shards) > 1:
        weight_map = {name: shard_file(i, len(shards)) for i, names in enumerate(shards) for name in names}
        (staging / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=2))
    model = engine.module
    model.config.dtype = dtype
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(staging)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(staging)
    for source in Path(policy_dir).iterdir():
        written_here = source.name in _MODEL_FILES or source.name.endswith(_WEIGHT_SUFFIXES)
        if source.is_file() and not written_here:
            shutil.copyfile(source, staging / source.name)  # the umask's mode, not the policy's files
