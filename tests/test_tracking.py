"""Tracking against a real MLflow store (sqlite), as the controller uses it."""

import json

import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType

from sppo.run_directory import RUN_FILE, RunDirectory
from sppo.tracking import Tracker


@pytest.fixture()
def uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_parent_run_is_recorded_and_reopened(tmp_path, uri):
    out = tmp_path / "out"
    out.mkdir()
    first = Tracker(uri, "exp", RunDirectory(out))
    parent = first.start_parent("job", {"train.eta": 1000.0})
    assert json.loads((out / RUN_FILE).read_text())["parent_run_id"] == parent
    first.finish_parent("FAILED")

    again = Tracker(uri, "exp", RunDirectory(out))
    assert again.start_parent("job", {}) == parent
    assert MlflowClient(uri).get_run(parent).info.status == "RUNNING"
    assert MlflowClient(uri).get_run(parent).data.params["train.eta"] == "1000.0"


def test_redone_iteration_replaces_its_run(tmp_path, uri):
    out = tmp_path / "out"
    out.mkdir()
    tracker = Tracker(uri, "exp", RunDirectory(out))
    tracker.start_parent("job", {})
    one = tracker.start_iteration(1, {"k": 4})
    tracker.finish(one)
    interrupted = tracker.start_iteration(2, {"k": 4})  # never finished: a killed driver
    retry = tracker.start_iteration(2, {"k": 4})

    runs = tracker.iteration_runs()
    assert sorted(runs) == [1, 2]
    assert runs[2].info.run_id == retry
    assert {t: r.info.status for t, r in runs.items()} == {1: "FINISHED", 2: "RUNNING"}
    client = MlflowClient(uri)
    old = client.get_run(interrupted)
    assert old.info.status == "FAILED" and old.info.lifecycle_stage == "deleted"
    assert old.data.tags["sppo.replaced_by"] == retry
    every = client.search_runs([tracker.experiment_id], run_view_type=ViewType.ALL)
    assert len(every) == 4  # parent + iter-1 + both iter-2 attempts: nothing is lost


def test_history_and_metrics_are_logged_with_steps(tmp_path, uri):
    out = tmp_path / "out"
    out.mkdir()
    tracker = Tracker(uri, "exp", RunDirectory(out))
    tracker.start_parent("job", {})
    run = tracker.start_iteration(1, {})
    tracker.log_history(run, [{"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": 1.5}])
    tracker.log_metrics(run, {"time/sampling_s": 3.0})
    history = MlflowClient(uri).get_metric_history(run, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.5)]


def test_unreachable_server_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="not reachable"):
        Tracker("http://127.0.0.1:9", "exp", RunDirectory(tmp_path))


def test_params_never_carry_secrets(tmp_path, uri):
    from sppo.tracking import redact

    assert redact("tracking.tracking_uri", "https://alice:s3cr3t@mlflow.example.com/x") == \
        "https://alice:***@mlflow.example.com/x"
    assert redact("hub_token", "hf_abc") == "***" and redact("aws.secret_access_key", "k") == "***"
    assert redact("train.learning_rate", 1e-6) == "1e-06"
    out = tmp_path / "out"
    out.mkdir()
    tracker = Tracker(uri, "exp", RunDirectory(out))
    parent = tracker.start_parent("job", {"tracking.tracking_uri": "http://bob:hunter2@host:5000",
                                          "db_password": "hunter2", "train.eta": 1000})
    params = MlflowClient(uri).get_run(parent).data.params
    assert "hunter2" not in json.dumps(params)
    assert params["train.eta"] == "1000"


def test_experiments_are_marked_as_model_training_unless_a_kind_was_set(tmp_path, uri):
    """MLflow's UI opens an experiment on the view its kind names: ours on the runs table."""
    from sppo.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING

    client = MlflowClient(uri)
    out = tmp_path / "out"
    out.mkdir()
    made = Tracker(uri, "new", RunDirectory(out)).experiment_id
    assert client.get_experiment(made).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    older = client.create_experiment("older")  # made before experiments were tagged
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(older).tags
    Tracker(uri, "older", RunDirectory(out))
    assert client.get_experiment(older).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    Tracker(uri, "chosen", RunDirectory(out))
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_retry_env_waits_out_the_outage_limit():
    from sppo.tracking import retry_env

    # MLflow's own default: 7 retries wait 4 + 8 + 16 + 32 + 64 + 120 = 244 s.
    assert retry_env(240.0) == {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "7", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2"}
    assert retry_env(20.0)["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "4"  # 4 + 8 + 16 = 28 s
    assert retry_env(3.0)["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"


NAMES = ["", " ", "sppo", "sppo tiny-1_b", "a" * 500, "a" * 501, "team/sppo", "sppo:v1", ".", "..", "..sppo",
         "./sppo", "sppo/..", "a//b", "sppo.", "日本語"]


@pytest.mark.parametrize("name", NAMES)
def test_preflight_refuses_exactly_the_names_mlflow_refuses(name):
    """Preflight applies MLflow's naming rules before any compute; MLflow keeps its validators
    private, so ours are checked against them here."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_experiment_name, _validate_model_name

    from sppo.preflight import experiment_name_problem, model_name_problem

    for ours, theirs in ((experiment_name_problem, _validate_experiment_name),
                         (model_name_problem, _validate_model_name)):
        try:
            theirs(name)
            refused = False
        except MlflowException:
            refused = True
        assert (ours(name) is not None) == refused, (ours.__name__, name)


def test_the_champion_alias_moves_between_this_jobs_versions_and_leaves_another_jobs(tmp_path, uri):
    def job(name: str) -> tuple[Tracker, list[str]]:
        out = tmp_path / name
        (out / "checkpoint").mkdir(parents=True)
        (out / "checkpoint" / "config.json").write_text("{}")
        tracker = Tracker(uri, "exp", RunDirectory(out))
        tracker.start_parent(name, {})
        versions = []
        for t in (1, 2):
            run = tracker.start_iteration(t, {})
            tracker.log_artifacts(run, out / "checkpoint", "checkpoint")
            versions.append(tracker.register_checkpoint(run, "model", "checkpoint"))
        return tracker, versions

    client = MlflowClient(uri)
    mine, (first, second) = job("mine")
    mine.point_alias("model", "champion", second)
    assert client.get_registered_model("model").aliases == {"champion": second}
    mine.point_alias("model", "champion", None)  # no champion any more: the alias goes
    assert client.get_registered_model("model").aliases == {}
    mine.point_alias("model", "champion", first)
    other, _ = job("other")
    other.point_alias("model", "champion", None)  # another job without a champion leaves it
    assert client.get_model_version_by_alias("model", "champion").version == first
    other.point_alias("model", "champion", None)  # and again: nothing to remove
    assert client.get_registered_model("model").aliases == {"champion": first}
