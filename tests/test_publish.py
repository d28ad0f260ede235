"""`publish_directory`, the one way a directory (a checkpoint, a pulled or cached model, an
export) appears: whole or not at all, with nothing left beside it."""

from __future__ import annotations

from pathlib import Path

import pytest

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
    assert oct(target.stat().st_mode & 0o777) == "0o755"
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
