"""What a stage samples from: full weights, or a base model plus a LoRA adapter.

A policy with an adapter is served by a vLLM engine started on its base with LoRA enabled: each
call names the adapter in a `LoRARequest`, so moving to the next iteration's policy moves no
base weights. vLLM keys its prefix cache by the request's adapter id, so each adapter needs an
id of its own; it is derived from the adapter's directory, which each iteration publishes anew.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

ADAPTER_DIR = "adapter"  # in a checkpoint trained with train.lora: the trained adapter alone
ADAPTER_CONFIG = "adapter_config.json"  # peft's, in an adapter directory


@dataclass(frozen=True)
class Policy:
    """weights: a model directory, storage URI, hub id or `tiny:` spec. adapter: a PEFT adapter
    directory (`adapter_config.json`, `adapter_model.safetensors`) trained on those weights."""

    weights: str
    adapter: str | None = None

    def __str__(self) -> str:
        return self.weights if self.adapter is None else f"{self.weights} + adapter {self.adapter}"

    @property
    def adapter_id(self) -> int:
        """vLLM's `lora_int_id` for the adapter: positive, and the same wherever it is computed
        (the driver names the policy, every engine serves it)."""
        if self.adapter is None:
            raise ValueError(f"{self} has no adapter")
        return zlib.crc32(self.adapter.encode()) % (2**31 - 1) + 1

    def mapped(self, path: Callable[[str], str]) -> Policy:
        """The same policy with each path translated (the driver's paths as workers see them)."""
        return Policy(path(self.weights), None if self.adapter is None else path(self.adapter))

