"""sppo.report: the iteration table and the win-rate/loss plot from an output directory."""

from __future__ import annotations

import json

from mlflow import MlflowClient

from sppo.report import main, table
from sppo.run_directory import RunDirectory


def _write_run(out, tracking_uri=None):
    for t, (base, prev, loss) in enumerate([(0.66, 0.66, 22.5), (0.82, 0.70, 18.1), (0.93, 0.71, 14.3)], start=1):
        RunDirectory(out).iteration(t).add_metrics({
            "eval/win_rate_vs_base": base, "eval/win_rate_vs_base_ci_low": base - 0.05,
            "eval/win_rate_vs_base_ci_high": base + 0.04, "eval/win_rate_vs_prev": prev,
            "eval/win_rate_vs_prev_ci_low": prev - 0.06, "eval/win_rate_vs_prev_ci_high": prev + 0.05,
            "train/final_loss": loss, "time/sampling_s": 30.0 + t, "time/training_s": 60.0, "time/evaluation_s": 40.0})
    RunDirectory(out).iteration(0).path.mkdir(parents=True)  # the base policy's eval samples live here: not an iteration


def test_table_lists_every_iteration_with_intervals_loss_and_times(tmp_path):
    _write_run(tmp_path)
    from sppo.report import iteration_metrics

    lines = table(iteration_metrics(tmp_path)).splitlines()
    assert lines[0].split()[:2] == ["iter", "win"] and len(lines) == 4
    assert lines[1].split()[:4] == ["1", "0.660", "[0.61,", "0.70]"]
    assert "0.930 [0.88, 0.97]" in lines[3] and "14.3" in lines[3] and "33.0" in lines[3]
    assert lines[3].split()[-3] == "-"  # judging time was not recorded


def test_main_writes_the_png_and_logs_it_to_the_parent_run(tmp_path, capsys):
    _write_run(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("report-test", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    (tmp_path / "run.json").write_text(json.dumps({"parent_run_id": run_id, "tracking_uri": uri,
                                                   "experiment_id": experiment}))

    assert main(["--output-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "0.820 [0.77, 0.86]" in printed and f"logged to MLflow run {run_id}" in printed
    # Links that open MLflow's model-training view: the runs table and the parent's curves.
    assert f"MLflow runs:      {uri}/#/experiments/{experiment}/runs?workflowType=machine_learning" in printed
    assert f"/#/experiments/{experiment}/runs/{run_id}/model-metrics?workflowType=machine_learning" in printed
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert [f.path for f in client.list_artifacts(run_id, "report")] == ["report/report.png"]


def test_main_without_iterations_fails_clearly(tmp_path, capsys):
    assert main(["--output-dir", str(tmp_path), "--no-mlflow"]) == 2
    assert "no iterations with metrics" in capsys.readouterr().err
