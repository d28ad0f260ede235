"""The embedded tiny models' cache: whole directories only, whichever process builds them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sppo import tiny
from sppo.devtools.localstack import free_port

REPO = Path(__file__).resolve().parents[1]

# One rank of a 2-process gloo group resolving tiny:policy into its own cache (SPPO_CACHE), as a
# training worker on a node with its own disk does once Ray Train has set the group up.
RANK_SCRIPT = """
import sys
import torch.distributed as dist
dist.init_process_group("gloo")
from sppo.tiny import resolve_model
print(resolve_model("tiny:policy"))
dist.barrier()
"""


def test_a_rank_1_of_a_process_group_builds_a_whole_tiny_model(tmp_path):
    """transformers' save_pretrained writes a model only on rank 0 of an initialized process group:
    a rank-1 training worker that built tiny:policy published a directory of tokenizer files alone,
    and its from_pretrained failed while rank 0 waited in the first broadcast."""
    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path),
                                   "HF_HUB_OFFLINE": "1", "SPPO_CACHE": str(tmp_path / f"cache-{rank}"),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2",
                                   "RANK": str(rank), "LOCAL_RANK": str(rank)})
             for rank in (0, 1)]
    outputs = [process.communicate(timeout=300) for process in ranks]
    for rank, (process, (out, err)) in enumerate(zip(ranks, outputs)):
        assert process.returncode == 0, f"rank {rank}: {err[-2000:]}"
        built = Path(out.strip().splitlines()[-1])
        assert built.parent == tmp_path / f"cache-{rank}"
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in built.iterdir()}, \
            f"rank {rank} built {sorted(p.name for p in built.iterdir())}"


def test_a_cached_tiny_model_without_its_config_is_replaced(tmp_path, monkeypatch):
    """What the bug above left in a node's cache (the tokenizer's files alone) is built again."""
    monkeypatch.setenv("SPPO_CACHE", str(tmp_path))
    version, _ = tiny._builder("policy")
    partial = tmp_path / f"tiny-policy-{version}"
    partial.mkdir()
    (partial / "tokenizer.json").write_text("{}")
    assert Path(tiny.resolve_model("tiny:policy")) == partial
    assert {"config.json", "model.safetensors"} <= {p.name for p in partial.iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == [partial.name], "a staging or set-aside directory was left"


def test_a_build_that_writes_no_model_publishes_nothing(tmp_path, monkeypatch):
    import torch.distributed

    monkeypatch.setenv("SPPO_CACHE", str(tmp_path))
    # Built in this process, where the builder below is seen: another test in it (a session's
    # process group of one) may have left a process group, which sends builds to a child process.
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(tiny, "_builder", lambda name: ("v0", lambda out: (out / "tokenizer.json").write_text("{}")))
    with pytest.raises(RuntimeError, match=r"building tiny:policy wrote no config.json or weights .*tokenizer.json"):
        tiny.resolve_model("tiny:policy")
    assert list(tmp_path.iterdir()) == []
