import hashlib
import json
from pathlib import Path

import pytest

from sppo.config import load_config
from sppo.preflight import preflight
from sppo.manifest import STAGES, LineageError, RunManifest, content_hash
from sppo.run_directory import RunDirectory
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
    manifest = RunManifest(RunDirectory(root))
    manifest.record_stage(1, "pairs", cfg, {"pairs": pairs}, "run-a")
    manifest.record_stage(1, "training", cfg, {"checkpoint": root / "iter-1" / "checkpoint"}, "run-a")

    again = RunManifest(RunDirectory(root))  # what a resumed job reads back
    pairs_entry = again.stage(1, "pairs")
    assert pairs_entry["status"] == "done" and pairs_entry["outputs"] == {"pairs": "iter-1/pairs.parquet"}
    assert pairs_entry["sha256"]["pairs"] == hashlib.sha256(b"rows").hexdigest()
    assert again.stage(1, "training")["sha256"]["checkpoint"] == content_hash(root / "iter-1" / "checkpoint")
    assert again.stage(1, "training")["mlflow_run_id"] == "run-a"
    # The training stage's digest follows train.*; the pairs stage depends on no config field.
    other = tiny(tmp_path, **{"train.learning_rate": 1e-4})
    manifest.record_stage(1, "training", other, {}, "run-b")
    assert RunManifest(RunDirectory(root)).stage(1, "training")["config_digest"] != again.stage(1, "training")["config_digest"]
    again.forget(1)
    assert RunManifest(RunDirectory(root)).stage(1, "pairs") is None


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


def _publish_iteration(manifest: RunManifest, cfg, t: int) -> dict[str, Path]:
    """Every stage of iteration t recorded as a job records it, each output a small file."""
    it = manifest.root / f"iter-{t}"
    outputs = {"sampling": {"samples": it / "samples.parquet"}, "judging": {"judgments": it / "judgments.parquet"},
               "pairs": {"pairs": it / "pairs.parquet"},
               "training": {"checkpoint": it / "checkpoint", "train_history": it / "train_history.json"},
               "evaluation": {"eval_judgments": it / "eval_judgments.parquet"},
               # The model card goes into the checkpoint directory after training recorded it.
               "tracking": {"card": it / "checkpoint" / "README.md"}}
    (it / "checkpoint").mkdir(parents=True, exist_ok=True)
    (it / "checkpoint" / "model.safetensors").write_bytes(b"weights")
    for stage, files in outputs.items():
        for path in files.values():
            if not path.is_dir():
                path.write_text(f"{stage} of iteration {t}")
        manifest.record_stage(t, stage, cfg, files, f"run-{t}")
    return {name: path for files in outputs.values() for name, path in files.items()}


def test_the_manifest_alone_decides_what_a_resubmission_redoes(tmp_path):
    """A stage is done when recorded, its outputs hash as recorded, its config fields are unchanged
    and no stage it reads from is redone; everything else runs again. No MLflow."""
    cfg = tiny(tmp_path, iterations=3)
    manifest = RunManifest(RunDirectory(tmp_path / "out"))
    assert manifest.redo_plan(cfg) == {1: STAGES, 2: STAGES, 3: STAGES}
    first = _publish_iteration(manifest, cfg, 1)
    _publish_iteration(manifest, cfg, 2)
    assert RunManifest(manifest.run).redo_plan(cfg) == {3: STAGES}
    assert manifest.redo_plan(tiny(tmp_path, iterations=2)) == {}  # all done
    # Resources and restarts change how training runs, not what it makes: nothing is redone.
    assert manifest.redo_plan(tiny(tmp_path, iterations=3, **{"train.max_failures": 5, "sampling.num_engines": 2,
                                                                "tracking.outage_limit_s": 5})) == {3: STAGES}

    # A changed training field: training of iteration 1 and all after it; what came before stays.
    changed = tiny(tmp_path, iterations=3, **{"train.learning_rate": 1e-4})
    assert RunManifest(manifest.run).redo_plan(changed) == {1: ("training", "evaluation", "tracking"),
                                                            2: STAGES, 3: STAGES}
    again = RunManifest(manifest.run)  # the entries made from what is redone are gone from the file
    assert set(again.data["iterations"]) == {"1"} and set(again.stage(1, "pairs")) and not again.stage(1, "training")

    # An output that no longer hashes as recorded (edited, or half-restored from a backup): that
    # stage, the stages reading it, and what reads those in later iterations.
    manifest = RunManifest(RunDirectory(tmp_path / "out"))
    for stage in ("training", "evaluation", "tracking"):
        manifest.record_stage(1, stage, cfg, {"training": {"checkpoint": first["checkpoint"],
                                                           "train_history": first["train_history"]},
                                              "evaluation": {"eval_judgments": first["eval_judgments"]},
                                              "tracking": {"card": first["card"]}}[stage], "run-1")
    assert manifest.redo_plan(cfg) == {2: STAGES, 3: STAGES}
    _publish_iteration(manifest, cfg, 2)
    third = _publish_iteration(manifest, cfg, 3)
    assert manifest.redo_plan(cfg) == {}
    first["card"].write_text("edited card")  # the tracking stage's own output, not training's
    assert RunManifest(manifest.run).redo_plan(cfg) == {1: ("tracking",), 2: ("tracking",), 3: ("tracking",)}
    manifest = RunManifest(manifest.run)
    assert not manifest.stage(3, "tracking") and manifest.stage(3, "evaluation")
    for t in (1, 2, 3):
        manifest.record_stage(t, "tracking", cfg, {"card": manifest.root / f"iter-{t}" / "checkpoint" / "README.md"},
                              f"run-{t}")
    third["eval_judgments"].write_text("edited")  # the last iteration's evaluation, and its tracking
    assert manifest.redo_plan(cfg) == {3: ("evaluation", "tracking")}
    _publish_iteration(manifest, cfg, 3)
    first["judgments"].write_text("edited")
    assert manifest.redo_plan(cfg) == {1: ("judging", "pairs", "training", "evaluation", "tracking"),
                                       2: STAGES, 3: STAGES}
    first["samples"].unlink()
    assert RunManifest(manifest.run).redo_plan(cfg) == {1: STAGES, 2: STAGES, 3: STAGES}


def test_a_changed_evaluation_field_redoes_evaluations_not_training(tmp_path):
    """eval.* decides how pi_{t+1} is graded, not what it is: a finished run re-submitted with a
    changed eval field re-evaluates (and re-tracks) every iteration, and keeps every sample,
    judgment, pair set and checkpoint with its manifest entry."""
    cfg = tiny(tmp_path, iterations=3)
    manifest = RunManifest(RunDirectory(tmp_path / "out"))
    for t in (1, 2, 3):
        _publish_iteration(manifest, cfg, t)
    kept = {t: {s: manifest.stage(t, s) for s in ("sampling", "judging", "pairs", "training")} for t in (1, 2, 3)}
    regraded = tiny(tmp_path, iterations=3, **{"eval.bootstrap_samples": 200})
    assert manifest.redo_plan(regraded) == {t: ("evaluation", "tracking") for t in (1, 2, 3)}
    after = RunManifest(manifest.run)
    assert {t: {s: after.stage(t, s) for s in kept[t]} for t in (1, 2, 3)} == kept
    assert not any(after.stage(t, s) for t in (1, 2, 3) for s in ("evaluation", "tracking"))
    # Fewer iterations than recorded: the later ones' entries made from what is redone go too.
    assert RunManifest(manifest.run).redo_plan(tiny(tmp_path, iterations=2, **{"train.epochs": 1})) == {
        1: ("training", "evaluation", "tracking"), 2: STAGES}
    assert set(RunManifest(manifest.run).data["iterations"]) == {"1"}


def test_an_unset_evaluation_judge_keeps_the_record_and_a_set_one_redoes_only_evaluation_on(tmp_path):
    """eval.judge unset is left out of the config's record, so output directories evaluated before
    it existed keep their evaluation's digest (nothing is redone); set, evaluation is redone."""
    cfg = tiny(tmp_path, iterations=1)
    assert not any(key.startswith("eval.judge") for key in cfg.flat())
    assert "judge:" not in cfg.to_yaml().split("eval:")[1]
    manifest = RunManifest(RunDirectory(tmp_path / "out"))
    _publish_iteration(manifest, cfg, 1)
    assert manifest.redo_plan(cfg) == {}
    judged = tiny(tmp_path, iterations=1, **{"eval.judge.kind": "pairrm"})
    assert judged.flat()["eval.judge.kind"] == "pairrm"
    assert RunManifest(manifest.run).redo_plan(judged) == {1: ("evaluation", "tracking")}
