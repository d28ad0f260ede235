import hashlib
import json

import pytest

from sppo.config import load_config
from sppo.preflight import preflight
from sppo.manifest import LineageError, RunManifest, content_hash
from tests.test_config import CONFIGS
from tests.test_run_cli import run_cli


@pytest.fixture(autouse=True)
def tracking_store(tmp_path, monkeypatch):
    """Preflight checks the tracking URI: a local sqlite store (preflight does not create it)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")


def tiny(tmp_path, **overrides):
    return load_config(CONFIGS / "tiny.yaml", {"output_dir": str(tmp_path / "out"), **overrides})


def test_lineage_change_is_refused_unless_forced(tmp_path):
    preflight(tiny(tmp_path))
    preflight(tiny(tmp_path, **{"train.learning_rate": 1e-4, "sampling.num_engines": 2}))  # same lineage
    with pytest.raises(LineageError, match=r"sampling.k: 4 -> 3.*--force"):
        preflight(tiny(tmp_path, **{"sampling.k": 3}))
    with pytest.raises(LineageError, match=r"judge.path: 'tiny:pairrm' -> 'llm-blender/PairRM'"):
        preflight(tiny(tmp_path, **{"judge.path": "llm-blender/PairRM"}))
    preflight(tiny(tmp_path, **{"sampling.k": 3}), force=True)
    recorded = json.loads((tmp_path / "out" / "manifest.json").read_text())["lineage"]
    assert recorded["sampling.k"] == 3  # forcing adopts the new lineage


def test_cli_refuses_a_changed_lineage_before_ray_starts(tmp_path):
    preflight(tiny(tmp_path))
    done = run_cli("--config", "configs/tiny.yaml", "--output-dir", str(tmp_path / "out"), "--set", "sampling.k=3")
    assert done.returncode == 2 and "sampling.k: 4 -> 3" in done.stderr and "--force" in done.stderr


def test_stage_records_hash_outputs(tmp_path):
    cfg = tiny(tmp_path)
    root = tmp_path / "out"
    (root / "iter-1" / "checkpoint").mkdir(parents=True)
    pairs = root / "iter-1" / "pairs.parquet"
    pairs.write_bytes(b"rows")
    (root / "iter-1" / "checkpoint" / "config.json").write_text("{}")
    manifest = RunManifest(root)
    manifest.record_stage(1, "pairs", cfg, {"pairs": pairs}, "run-a")
    manifest.record_stage(1, "training", cfg, {"checkpoint": root / "iter-1" / "checkpoint"}, "run-a")

    again = RunManifest(root)  # what a resumed job reads back
    pairs_entry = again.stage(1, "pairs")
    assert pairs_entry["status"] == "done" and pairs_entry["outputs"] == {"pairs": "iter-1/pairs.parquet"}
    assert pairs_entry["sha256"]["pairs"] == hashlib.sha256(b"rows").hexdigest()
    assert again.stage(1, "training")["sha256"]["checkpoint"] == content_hash(root / "iter-1" / "checkpoint")
    assert again.stage(1, "training")["mlflow_run_id"] == "run-a"
    # The training stage's digest follows train.*; the pairs stage depends on no config field.
    other = tiny(tmp_path, **{"train.learning_rate": 1e-4})
    manifest.record_stage(1, "training", other, {}, "run-b")
    assert RunManifest(root).stage(1, "training")["config_digest"] != again.stage(1, "training")["config_digest"]
    again.forget(1)
    assert RunManifest(root).stage(1, "pairs") is None


def test_preflight_rejects_missing_models_and_unwritable_output(tmp_path):
    with pytest.raises(ValueError, match=r"policy.path: .*nope is not a readable model directory"):
        preflight(tiny(tmp_path, **{"policy.path": str(tmp_path / "nope")}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"judge.path: .*empty is not a readable model directory"):
        preflight(tiny(tmp_path, **{"judge.kind": "pairrm", "judge.path": str(tmp_path / "empty")}))
    preflight(tiny(tmp_path / "rule", **{"judge.path": str(tmp_path / "empty")}))  # the rule judge has no model
    # /proc refuses new entries even to root, who passes permission-bit checks.
    with pytest.raises(ValueError, match="output_dir: /proc/sppo-out is not writable"):
        preflight(tiny(tmp_path, output_dir="/proc/sppo-out"))
