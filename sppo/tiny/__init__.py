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
import subprocess
import sys
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
    version, _ = _builder(name)
    target = cache_root() / f"tiny-{name}-{version}"
    if not (target / "config.json").exists():
        # A model directory in the cache is whole or absent; of concurrent builders, one wins. A
        # directory there without its config is not ours to keep (earlier versions could leave one,
        # below): it is replaced.
        publish_directory(target, lambda staging: _build_whole(name, staging),
                          keep_existing=not target.exists())
    return str(target)


def _build_whole(name: str, out_dir: Path) -> None:
    """The tiny model `name` built into out_dir, in a child process where this one is in a
    torch.distributed process group: there transformers' save_pretrained writes a model only on
    rank 0 (a training worker of rank 1 got a directory holding just the tokenizer's files).
    Refuses a directory without config.json and weights, so that none is ever published."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        child = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                                "from sppo.tiny import _builder; _builder(sys.argv[1])[1](Path(sys.argv[2]))",
                                name, str(out_dir)], capture_output=True, text=True)
        if child.returncode != 0:
            raise RuntimeError(f"building {TINY_PREFIX}{name} in a child process failed (exit {child.returncode}): "
                               f"{child.stderr.strip()[-2000:]}")
    else:
        _builder(name)[1](out_dir)
    if not (out_dir / "config.json").is_file() or not any(out_dir.glob("*.safetensors")):
        raise RuntimeError(f"building {TINY_PREFIX}{name} wrote no config.json or weights in {out_dir}: "
                           f"{sorted(p.name for p in out_dir.iterdir())}")


