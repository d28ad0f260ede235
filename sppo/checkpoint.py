"""The trained policy's checkpoint: gathered from its ZeRO-3 partitions one parameter at a time,
written as a Hugging Face model directory with the policy's tokenizer and chat template, and
published atomically (locally) or uploaded (shared storage).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs
import torch

from sppo.storage import is_uri, publish_directory, upload_dir

# Files of a model directory that the checkpoint writes itself rather than copies.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
_MODEL_FILES = ("config.json", "generation_config.json")


def publish_checkpoint(engine, policy_dir: str, checkpoint_dir: str, dtype: torch.dtype) -> None:
    """Gather the ZeRO-3 partitions one parameter at a time and publish an HF checkpoint.

    Every rank takes part in the gathers; rank 0 writes and publishes it (`publish_directory`), so
    checkpoint_dir is complete or absent, and an earlier attempt's is replaced, never merged with.
    """
    import deepspeed
    import torch.distributed as dist

    rank = dist.get_rank()
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
    publish_directory(Path(checkpoint_dir),
                      lambda staging: _write_checkpoint(engine, policy_dir, staging, checkpoint_dir, state_dict, dtype))


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
