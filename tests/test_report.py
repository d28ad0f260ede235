"""sppo.report: the iteration table (as the published cards: LC, raw win rate, length), the
champion, the length warnings and the plot, from an output directory."""

from __future__ import annotations

import json

from mlflow import MlflowClient

from sppo.report import iteration_metrics, main, table
from sppo.run_directory import RunDirectory


def _write_run(out, tracking_uri=None, length_controlled: bool = True):
    """Three iterations; length_controlled False: evaluated before the LC win rate existed."""
    for t, (base, prev, loss, lc) in enumerate([(0.66, 0.66, 22.5, 0.52), (0.82, 0.70, 18.1, 0.70),
                                                 (0.93, 0.71, 14.3, 0.58)], start=1):
        metrics = {
            "eval/win_rate_vs_base": base, "eval/win_rate_vs_base_ci_low": base - 0.05,
            "eval/win_rate_vs_base_ci_high": base + 0.04, "eval/win_rate_vs_prev": prev,
            "eval/win_rate_vs_prev_ci_low": prev - 0.06, "eval/win_rate_vs_prev_ci_high": prev + 0.05,
            "eval/mean_response_chars": 40.0 + 10 * t,
            "train/final_loss": loss, "time/sampling_s": 30.0 + t, "time/training_s": 60.0, "time/evaluation_s": 40.0}
        if length_controlled:
            metrics.update({"registry/model_version": 4.0 + t,"eval/lc_win_rate_vs_base": lc, "eval/lc_win_rate_vs_base_ci_low": lc - 0.04,
                            "eval/lc_win_rate_vs_base_ci_high": lc + 0.04, "eval/base_mean_response_chars": 40.0})
        RunDirectory(out).iteration(t).add_metrics(metrics)
    RunDirectory(out).iteration(0).path.mkdir(parents=True)  # the base policy's eval samples live here: not an iteration


def test_table_lists_every_iteration_as_the_published_cards_with_the_champion_and_warnings(tmp_path):
    _write_run(tmp_path)
    lines = table(iteration_metrics(tmp_path)).splitlines()
    assert lines[0].split()[:4] == ["iter", "LC", "win", "rate"] and len(lines) == 8
    assert lines[1].split()[:4] == ["base", "-", "-", "40"]
    assert lines[2].split()[:8] == ["1", "0.520", "[0.48,", "0.56]", "0.660", "[0.61,", "0.70]", "50"]
    assert lines[3].split()[:8] == ["2*", "0.700", "[0.66,", "0.74]", "0.820", "[0.77,", "0.86]", "60"]
    assert "0.930 [0.88, 0.97]" in lines[4] and "14.3" in lines[4] and "33.0" in lines[4]
    assert lines[4].split()[-3] == "-"  # judging time was not recorded
    assert lines[5] == ("* champion: iteration 2 has the highest length-controlled win rate vs the base, 0.700 "
                        "[0.66, 0.74], of the iterations whose interval lies above 0.5 (registered version 6, alias "
                        "'champion')")
    # Iterations 1 and 3 gained mostly length; iteration 2's gain holds at equal length.
    assert lines[6].startswith("iteration 1: the gain over the base is mostly length: by the evaluation judge, "
                               "win rate 0.660 [0.61, 0.70] but 0.520 [0.48, 0.56] at equal length")
    assert lines[7].startswith("iteration 3: the gain over the base is mostly length")


def test_a_run_evaluated_before_length_control_is_shown_as_such(tmp_path):
    _write_run(tmp_path, length_controlled=False)
    lines = table(iteration_metrics(tmp_path)).splitlines()
    assert len(lines) == 5 and lines[1].split()[:5] == ["1", "-", "0.660", "[0.61,", "0.70]"]
    assert lines[4] == ("champion: no iteration has a length-controlled win rate vs the base; iteration(s) 1, 2, 3 "
                        "have no length-controlled win rate (no held-out evaluation, or one from before sppo "
                        "computed it) and are not candidates")


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
    assert "0.820 [0.77, 0.86]" in printed and "* champion: iteration 2" in printed
    assert f"logged to MLflow run {run_id}" in printed
    # Links that open MLflow's model-training view: the runs table and the parent's curves.
    assert f"MLflow runs:      {uri}/#/experiments/{experiment}/runs?workflowType=machine_learning" in printed
    assert f"/#/experiments/{experiment}/runs/{run_id}/model-metrics?workflowType=machine_learning" in printed
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert [f.path for f in client.list_artifacts(run_id, "report")] == ["report/report.png"]


def test_main_without_iterations_fails_clearly(tmp_path, capsys):
    assert main(["--output-dir", str(tmp_path), "--no-mlflow"]) == 2
    assert "no iterations with metrics" in capsys.readouterr().err
