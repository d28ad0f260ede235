"""storage_uri: a run's outputs live in shared storage, here a real S3 API (moto's server,
reached by pyarrow's S3 client) and a plain shared directory. No Ray: the storage layer itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from sppo.config import RunConfig, load_config
from sppo.preflight import PreflightError, preflight
from sppo.models import local_model
from sppo.run_directory import RunDirectory
from sppo.storage import SharedStorage, atomic_write_parquet, atomic_write_text, read_parquet, upload_dir


def remote_files(uri: str) -> dict[str, bytes]:
    fs, base = pafs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    out = {}
    for info in infos:
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as fh:
                out[info.path[len(base) + 1:]] = fh.read()
    return out


@pytest.fixture
def storage(s3_bucket, tmp_path):
    return SharedStorage.open(f"{s3_bucket}/runs/a", tmp_path / "out")


def test_every_file_the_run_directory_publishes_is_uploaded_to_the_same_place(storage, tmp_path):
    run = RunDirectory(tmp_path / "out", storage)
    it = run.iteration(1)
    run.write_rows(it.samples, [{"prompt": "p", "candidates": ["a", "b"]}])
    it.add_metrics({"time/sampling_s": 1.5})
    run.write_text(run.manifest_file, "{}")
    # A plain atomic write publishes locally only: uploading is explicit, never a side effect.
    atomic_write_text(it.path / "scratch.txt", "not published")

    files = remote_files(storage.uri)
    assert set(files) == {"iter-1/samples.parquet", "iter-1/stage_metrics.json", "manifest.json"}
    assert files["iter-1/samples.parquet"] == it.samples.read_bytes()
    assert json.loads(files["iter-1/stage_metrics.json"]) == {"time/sampling_s": 1.5}


def test_workers_are_given_storage_uris_for_paths_under_output_dir(storage, tmp_path):
    ckpt = RunDirectory(tmp_path / "out").iteration(2).checkpoint
    assert storage.worker_spec(str(ckpt)) == f"{storage.uri}/iter-2/checkpoint"
    # The base model, a hub id or a path outside the run: every node resolves those itself.
    for spec in ("tiny:policy", "google/gemma-2-9b-it", "/models/llama", "s3://other/model"):
        assert storage.worker_spec(spec) == spec


def test_local_model_fetches_a_checkpoint_once_per_content(s3_bucket, tmp_path, monkeypatch, tiny_policy_dir):
    monkeypatch.setenv("SPPO_CACHE", str(tmp_path / "node-cache"))
    fs, base = pafs.FileSystem.from_uri(f"{s3_bucket}/run/iter-1/checkpoint")
    upload_dir(Path(tiny_policy_dir), fs, base)
    uri = f"{s3_bucket}/run/iter-1/checkpoint"

    first = Path(local_model(uri))
    assert first.is_relative_to(tmp_path / "node-cache")
    assert sorted(p.name for p in first.iterdir()) == sorted(p.name for p in Path(tiny_policy_dir).iterdir())
    assert (first / "config.json").read_bytes() == (Path(tiny_policy_dir) / "config.json").read_bytes()
    assert local_model(uri) == str(first)  # cached

    # A retrained checkpoint at the same URI is a different download, never the stale copy.
    changed = tmp_path / "changed"
    shutil.copytree(tiny_policy_dir, changed)
    (changed / "generation_config.json").write_text(json.dumps({"changed": True}))
    upload_dir(changed, fs, base)
    second = Path(local_model(uri))
    assert second != first and json.loads((second / "generation_config.json").read_text()) == {"changed": True}

    with pytest.raises(FileNotFoundError, match=f"{s3_bucket}/run/iter-9/checkpoint: no config.json"):
        local_model(f"{s3_bucket}/run/iter-9/checkpoint")


def test_checkpoint_upload_replaces_the_earlier_one_without_stale_files(storage, tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    for d, names in ((old, ["config.json", "model-00001.safetensors"]), (new, ["config.json", "model.safetensors"])):
        d.mkdir()
        for name in names:
            (d / name).write_text(d.name)
    fs, base = pafs.FileSystem.from_uri(f"{storage.uri}/iter-1/checkpoint")
    upload_dir(old, fs, base)
    upload_dir(new, fs, base)
    assert remote_files(f"{storage.uri}/iter-1/checkpoint") == {"config.json": b"new", "model.safetensors": b"new"}

    local = RunDirectory(tmp_path / "out", storage).iteration(1).checkpoint
    local.parent.mkdir(parents=True)
    RunDirectory(tmp_path / "out", storage).pull(local)
    assert sorted(p.name for p in local.iterdir()) == ["config.json", "model.safetensors"]


def test_a_fresh_driver_disk_is_filled_from_storage_and_unpublished_files_set_aside(s3_bucket, tmp_path):
    uri = f"{s3_bucket}/run"
    first = RunDirectory(tmp_path / "first", SharedStorage.open(uri, tmp_path / "first"))
    first.write_text(first.manifest_file, json.dumps({"iterations": {}}))
    first.write_rows(first.iteration(1).samples, [{"prompt": "p"}])

    fresh = SharedStorage.open(uri, tmp_path / "second")  # the driver's disk is gone: a new one
    stray = RunDirectory(tmp_path / "second").iteration(1).judgments  # written, but the upload never happened
    stray.parent.mkdir(parents=True)
    stray.write_text("half a stage")
    fresh.sync_down()
    second = RunDirectory(tmp_path / "second").iteration(1)
    assert read_parquet(second.samples) == [{"prompt": "p"}]
    assert json.loads((tmp_path / "second" / "manifest.json").read_text()) == {"iterations": {}}
    assert not stray.exists()  # a resumed job redoes judging rather than trusting it
    [aside] = (tmp_path / "second" / ".unpublished").glob("*/iter-1/judgments.parquet")
    assert aside.read_text() == "half a stage"  # nothing is lost


def test_archive_moves_the_stored_iteration_too(storage, tmp_path):
    run = RunDirectory(tmp_path / "out", storage)
    run.write_rows(run.iteration(1).samples, [{"prompt": "p"}])
    assert run.archive(1) == tmp_path / "out" / "iter-1.superseded-1"
    assert set(remote_files(storage.uri)) == {"iter-1.superseded-1/samples.parquet"}


def test_a_shared_directory_works_the_same_way(tmp_path):
    run = RunDirectory(tmp_path / "out", SharedStorage.open(str(tmp_path / "nfs" / "run"), tmp_path / "out"))
    run.write_rows(run.iteration(1).pairs, [{"chosen": "a"}])
    assert run.for_workers(str(tmp_path / "out" / "iter-1" / "checkpoint")) == f"{tmp_path}/nfs/run/iter-1/checkpoint"
    assert read_parquet(tmp_path / "nfs" / "run" / "iter-1" / "pairs.parquet") == [{"chosen": "a"}]
    assert not list((tmp_path / "nfs" / "run" / "iter-1").glob("*.uploading-*"))


def test_workers_are_given_a_relative_model_path_made_absolute(tmp_path, monkeypatch):
    """An actor's working directory is not the driver's: `policy.path: models/pi0` reached the
    engines, judges and evaluation as written (training alone made it absolute)."""
    (tmp_path / "models" / "pi0").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    run = RunDirectory(tmp_path / "out")
    assert run.for_workers("models/pi0") == str(tmp_path / "models" / "pi0")
    assert run.for_workers("./models/pi0") == str(tmp_path / "models" / "pi0")
    for as_is in ("tiny:policy", "google/gemma-2-9b-it", "s3://bucket/m", "", str(tmp_path / "models" / "pi0")):
        assert run.for_workers(as_is) == as_is


def _cfg(tmp_path: Path, **overrides) -> RunConfig:
    return RunConfig.model_validate({"output_dir": str(tmp_path / "out"), **overrides})


def test_preflight_names_storage_uri_when_the_bucket_is_missing(s3_server, monkeypatch, tmp_path):
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    cfg = _cfg(tmp_path, storage_uri="s3://no-such-bucket/run")
    with pytest.raises(PreflightError, match="storage_uri: s3://no-such-bucket/run is not writable"):
        preflight(cfg, storage=SharedStorage.open(cfg.storage_uri, Path(cfg.output_dir)))


def test_preflight_refuses_a_storage_uri_that_does_not_hold_the_local_run(storage, s3_bucket, tmp_path):
    cfg = _cfg(tmp_path, storage_uri=storage.uri)
    (tmp_path / "out" / "iter-1").mkdir(parents=True)
    (tmp_path / "out" / "iter-1" / "samples.parquet").write_text("an earlier run without storage_uri")
    with pytest.raises(PreflightError, match=f"storage_uri: {storage.uri} holds no run, but output_dir"):
        preflight(cfg, storage=storage)
    assert (tmp_path / "out" / "iter-1" / "samples.parquet").exists()  # untouched


@pytest.mark.parametrize("uri", ["s3://bucket/run?endpoint_override=http://x", "/"])
def test_config_rejects_storage_uris_it_cannot_extend(uri, tmp_path):
    with pytest.raises(ValueError, match="storage_uri"):
        _cfg(tmp_path, storage_uri=uri)


def test_tiny_config_accepts_a_storage_uri_override(tmp_path):
    cfg = load_config("configs/tiny.yaml", overrides={"storage_uri": "s3://team-bucket/sppo/tiny"})
    assert cfg.storage_uri == "s3://team-bucket/sppo/tiny"


def test_a_failed_write_keeps_the_published_file_and_leaves_no_temporary(tmp_path):
    """Stage outputs are whole or absent: a write that fails midway changes nothing on disk."""
    pairs = tmp_path / "out" / "pairs.parquet"
    atomic_write_parquet(pairs, [{"chosen": "a"}])
    with pytest.raises(Exception, match="int|str"):  # pyarrow: one column cannot hold both
        atomic_write_parquet(pairs, [{"chosen": 1}, {"chosen": "b"}])
    metrics = tmp_path / "out" / "stage_metrics.json"
    atomic_write_text(metrics, "{}")
    with pytest.raises(TypeError):
        atomic_write_text(metrics, {"not": "text"})
    assert read_parquet(pairs) == [{"chosen": "a"}]
    assert metrics.read_text() == "{}"
    assert sorted(p.name for p in pairs.parent.iterdir()) == ["pairs.parquet", "stage_metrics.json"]
