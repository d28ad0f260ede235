"""The embedded tiny models: built deterministically from code on first use, then cached.

No weights live in git and no hub is needed. `resolve_model("tiny:policy")` returns the
directory of a tiny Llama policy (byte-level BPE tokenizer with a chat template);
`resolve_model("tiny:pairrm")` that of a tiny PairRM; `resolve_model("tiny:reward")` that of a
tiny scalar reward model. Any other string is returned as is
(a local directory or a hub id).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path

from sppo.storage import publish_directory

TINY_PREFIX = "tiny:"


def cache_root() -> Path:
    return Path(os.environ.get("SPPO_CACHE", Path.home() / ".cache" / "sppo"))


# name -> module with BUILD_VERSION and build(out_dir); imported lazily because building
# needs torch/transformers while resolving a real path does not.
_BUILDERS = {"policy": "sppo.tiny.policy", "pairrm": "sppo.tiny.pairrm", "reward": "sppo.tiny.reward"}


def _builder(name: str) -> tuple[str, Callable[[Path], None]]:
    module = importlib.import_module(_BUILDERS[name])
    return module.BUILD_VERSION, module.build


def resolve_model(spec: str) -> str:
    """Map "tiny:<name>" to its cached directory (building it once); pass anything else through."""
    if not spec.startswith(TINY_PREFIX):
        return spec
    name = spec[len(TINY_PREFIX):]
    if name not in _BUILDERS:
        raise ValueError(f"unknown tiny model {spec!r}; known: {sorted(TINY_PREFIX + n for n in _BUILDERS)}")
    version, build = _builder(name)
    target = cache_root() / f"tiny-{name}-{version}"
    if not (target / "config.json").exists():
        # A model directory in the cache is whole or absent; of concurrent builders, one wins.
        publish_directory(target, build, keep_existing=True)
    return str(target)


