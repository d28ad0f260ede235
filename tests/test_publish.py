"""`publish_directory`, the one way a directory (a checkpoint, a pulled or cached model, an
export) appears: whole or not at all, with nothing left beside it."""

from __future__ import annotations

from pathlib import Path

import pytest

from sppo.run_directory import RunDirectory
from sppo.storage import publish_directory


def _fill(text: str):
    def fill(staging: Path) -> None:
        (staging / "config.json").write_text(text)
        (staging / "sub").mkdir()
        (staging / "sub" / "weights").write_text(text * 3)
    return fill


def test_a_directory_replaces_an_earlier_one_whole(tmp_path):
    target = tmp_path / "checkpoint"
    publish_directory(target, _fill("one"))
    (target / "stale").write_text("from the earlier attempt")
    publish_directory(target, _fill("two"))
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "sub"]  # replaced, never merged
    assert (target / "sub" / "weights").read_text() == "twotwotwo"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def test_a_failed_fill_leaves_the_published_directory_and_nothing_beside_it(tmp_path):
    target = tmp_path / "checkpoint"
    publish_directory(target, _fill("one"))

    def broken(staging: Path) -> None:
        (staging / "config.json").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left on device"):
        publish_directory(target, broken)
    assert (target / "config.json").read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def test_with_keep_existing_a_concurrent_publishers_directory_stays(tmp_path):
    target = tmp_path / "tiny-policy"

    def late(staging: Path) -> None:  # another builder publishes while this one fills
        _fill("this")(staging)
        publish_directory(target, _fill("theirs"))

    publish_directory(target, late, keep_existing=True)
    assert (target / "config.json").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-policy"]


def test_published_files_follow_the_umask(umask, tmp_path, tiny_policy_dir):
    """A checkpoint as rank 0 publishes it (safetensors shards, model files, the policy's tokenizer
    files), then its card and a stage's rows: 0644 under umask 022, 0600 under 077, like any write,
    not the owner-only mode of a temporary file (mkstemp's, safetensors')."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from sppo.checkpoint import _save_shard, _write_model_files

    policy = tmp_path / "policy"
    shutil.copytree(tiny_policy_dir, policy)
    for path in policy.iterdir():
        path.chmod(0o600)  # its own files' modes are not the checkpoint's
    model = AutoModelForCausalLM.from_pretrained(policy)
    run = RunDirectory(tmp_path / "run")
    it = run.iteration(1)

    def fill(staging: Path) -> None:
        _save_shard({"weight": torch.zeros(2)}, staging / "model.safetensors")
        _write_model_files(model, str(policy), staging, [["weight"]], 8, torch.float32)

    publish_directory(it.checkpoint, fill)
    run.write_text(it.checkpoint / "README.md", "card")
    run.write_rows(it.samples, [{"prompt": "p"}])
    published = {p.name: oct(p.stat().st_mode & 0o777) for p in [it.checkpoint, *it.checkpoint.iterdir(), it.samples]}
    assert {"model.safetensors", "config.json", "tokenizer_config.json", "README.md"} <= set(published)
    assert published == {name: oct((0o777 if name == "checkpoint" else 0o666) & ~umask) for name in published}
