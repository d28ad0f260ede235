"""MLflow record of a job: one parent run, one nested run `iter-N` per iteration.

The parent run id is kept in `<output_dir>/run.json`, so a re-submitted or resumed job
logs into the same parent. An iteration that is redone (interrupted, or re-run by
`--resume-from`) gets a fresh nested run: the old one is marked FAILED, tagged with its
replacement and soft-deleted (restorable with `MlflowClient.restore_run`), so the parent
shows exactly one `iter-N` run per iteration.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from sppo.run_directory import RunDirectory
from sppo.secrets import redact
from sppo.storage import read_parquet

log = logging.getLogger("sppo.tracking")

# MLflow caps a param value at 6000 characters and a log_batch at 100 params / 1000 metrics.
_MAX_PARAM_LEN = 6000
_PARAM_BATCH = 100
_METRIC_BATCH = 1000


def sample_table(judgments: Path, pairs: Path, rows: int) -> dict[str, list]:
    """The first `rows` prompts of an iteration as a table for `MlflowClient.log_table`: per prompt
    its candidates, win matrix (2 decimals), chosen and rejected response (from the pairs row of
    the same prompt). Only those rows are read: the table's size does not grow with the iteration."""
    judged = read_parquet(judgments, limit=rows)
    shown = pq.read_table(pairs, columns=["prompt", "chosen", "rejected"],
                          filters=[("prompt", "in", [row["prompt"] for row in judged])])
    pair_of = {row["prompt"]: row for row in shown.to_pylist()}
    return {
        "prompt": [row["prompt"] for row in judged],
        "candidates": [json.dumps(list(row["candidates"])) for row in judged],
        "win_matrix": [json.dumps([[round(p, 2) for p in r] for r in row["win_matrix"]]) for row in judged],
        "chosen": [pair_of.get(row["prompt"], {}).get("chosen") for row in judged],
        "rejected": [pair_of.get(row["prompt"], {}).get("rejected") for row in judged],
    }


def iteration_run_name(iteration: int) -> str:
    return f"iter-{iteration}"


def check_reachable(uri: str, attempts: int = 3, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes, when an HTTP tracking server does not answer: MLflow's
    own client retries with backoff for several minutes before giving up."""
    if not uri.startswith(("http://", "https://")):
        return
    error: Exception | None = None
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
                return
        except urllib.error.HTTPError:
            return  # it answered (an auth proxy may refuse /health)
        except OSError as err:
            error = err
            if attempt + 1 < attempts:
                time.sleep(1.0 + attempt)
    raise RuntimeError(f"MLflow tracking server {uri} is not reachable (MLFLOW_TRACKING_URI / "
                       f"tracking.tracking_uri): {error}")


def tracked_elsewhere(run_file: Path, record: Mapping[str, Any], uri: str) -> str | None:
    """Why an output directory whose run.json records another tracking URI cannot be tracked at
    `uri`: its parent run is on that server. None when it records this one (or, hand-made, none)."""
    recorded = record.get("tracking_uri")
    if recorded is None or recorded == uri:
        return None
    return (f"{run_file}: this output directory was tracked at {redact('uri', recorded)}, not "
            f"{redact('uri', uri)}; use that tracking URI (MLFLOW_TRACKING_URI or tracking.tracking_uri) "
            "or another --output-dir")


def answers(uri: str) -> bool:
    """Does the tracking server answer now (one try)? Non-HTTP stores always do."""
    try:
        check_reachable(uri, attempts=1)
    except RuntimeError:
        return False
    return True


# MLflow's HTTP client (urllib3) sleeps 0 s before its first retry, then backoff_factor x 2^(n-1)
# before retry n, at most 120 s each.
_BACKOFF_FACTOR, _BACKOFF_MAX_S = 2, 120


def retry_env(outage_limit_s: float) -> dict[str, str]:
    """MLflow's retry settings (environment variables, read by every MLflow client in the job)
    whose waits add up to at least `outage_limit_s`."""
    retries, waited = 1, 0.0
    while waited < outage_limit_s:
        retries += 1
        waited += min(_BACKOFF_FACTOR * 2 ** (retries - 1), _BACKOFF_MAX_S)
    return {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(_BACKOFF_FACTOR)}


# Checkpoint files of 500 MB or more go up in parallel parts when the server's artifact store
# takes multipart uploads (S3, GCS, Azure); other stores get the file streamed in one request.
LARGE_ARTIFACT_ENV = {"MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "true"}


# MLflow's UI opens an experiment on the view its kind names; an untagged one opens on the GenAI
# traces overview. Ours train models: the runs table, with the parent run and its iter-N runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
EXPERIMENT_KIND = {EXPERIMENT_KIND_TAG: MODEL_TRAINING}


def ui_links(tracking_uri: str, experiment_id: str, parent_run_id: str) -> dict[str, str]:
    """Where to watch a run in MLflow's UI: its runs table (parent and iter-N runs) and the parent's
    per-iteration charts. `workflowType` picks the UI's model-training view: without it, MLflow
    3.17 opens every experiment on its GenAI traces overview, whatever the experiment's kind."""
    base = f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}"
    view = "?workflowType=machine_learning"
    return {"runs": f"{base}/runs{view}", "curves": f"{base}/runs/{parent_run_id}/model-metrics{view}"}


def run_links(output_dir: Path) -> dict[str, str]:
    """ui_links of the run an output directory records (its run.json)."""
    record = json.loads(RunDirectory(Path(output_dir)).run_file.read_text())
    return ui_links(record["tracking_uri"], record["experiment_id"], record["parent_run_id"])


class Tracker:
    def __init__(self, uri: str, experiment: str, run: RunDirectory, system_metrics: bool = False):
        """run: the run directory whose run.json records the parent run."""
        check_reachable(uri)
        self.uri = uri
        self.client = MlflowClient(uri)
        self.run = run
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            self.experiment_id = self.client.create_experiment(experiment, tags=EXPERIMENT_KIND)
        else:
            self.experiment_id = found.experiment_id
            if EXPERIMENT_KIND_TAG not in found.tags:  # made before we tagged it; a kind set by hand stays
                self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        self.parent_id: str | None = None
        self.system_metrics = system_metrics
        self._monitors: dict[str, Any] = {}  # run id -> its SystemMetricsMonitor

    # -- parent run ---------------------------------------------------------------------
    def start_parent(self, run_name: str, params: Mapping[str, Any]) -> str:
        """Reopen the parent run recorded in the output directory, or create it."""
        record = self.run.run_file
        if record.exists():
            saved = json.loads(record.read_text())
            if problem := tracked_elsewhere(record, saved, self.uri):  # preflight refuses it first
                raise RuntimeError(problem)
            self.parent_id = saved["parent_run_id"]
            self.client.update_run(self.parent_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, run_name=run_name)
            self.parent_id = run.info.run_id
            self.log_params(self.parent_id, params)
            self.run.write_text(
                record,
                json.dumps(
                    {"parent_run_id": self.parent_id, "experiment_id": self.experiment_id, "tracking_uri": self.uri},
                    indent=2,
                ),
            )
        return self.parent_id

    def ui_links(self) -> dict[str, str]:
        return ui_links(self.uri, self.experiment_id, self.parent_id)

    def finish_parent(self, status: str = "FINISHED") -> None:
        if self.parent_id and self._answers(self.parent_id):
            self.client.set_terminated(self.parent_id, status=status)

    def _answers(self, run_id: str) -> bool:
        """Ending a run needs the server; one that does not answer (the job is stopping because
        of it) would only make each end wait out tracking.outage_limit_s again."""
        if answers(self.uri):
            return True
        log.warning("MLflow run %s stays RUNNING: the tracking server %s does not answer", run_id, self.uri)
        return False

    # -- nested iteration runs ------------------------------------------------------------
    def iteration_runs(self) -> dict[int, Any]:
        """Active nested runs of the parent, by iteration number."""
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent_id}'"
        )
        out = {}
        for run in runs:
            name = run.data.tags.get(MLFLOW_RUN_NAME, "")
            if name.startswith("iter-") and name[5:].isdigit():
                out[int(name[5:])] = run
        return out

    def start_iteration(self, iteration: int, params: Mapping[str, Any]) -> str:
        """A fresh nested run `iter-N`; an earlier one for the same iteration is replaced."""
        previous = self.iteration_runs().get(iteration)
        run = self.client.create_run(
            self.experiment_id,
            run_name=iteration_run_name(iteration),
            tags={MLFLOW_PARENT_RUN_ID: self.parent_id, "sppo.iteration": str(iteration)},
        )
        run_id = run.info.run_id
        if previous is not None:
            old_id = previous.info.run_id
            self.client.set_tag(old_id, "sppo.replaced_by", run_id)
            if previous.info.status != "FINISHED":
                self.client.set_terminated(old_id, status="FAILED")
            self.client.delete_run(old_id)
            self.client.set_tag(run_id, "sppo.replaces", old_id)
        self.log_params(run_id, params)
        if self.system_metrics:  # the driver machine's CPU, memory, disk, network (and GPU) as system/*
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitors[run_id] = SystemMetricsMonitor(run_id, tracking_uri=self.uri)
            self._monitors[run_id].start()
        return run_id

    # -- logging helpers -----------------------------------------------------------------
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(k, redact(k, v)[:_MAX_PARAM_LEN]) for k, v in sorted(params.items())]
        for start in range(0, len(items), _PARAM_BATCH):
            self.client.log_batch(run_id, params=items[start : start + _PARAM_BATCH])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for start in range(0, len(items), _METRIC_BATCH):
            self.client.log_batch(run_id, metrics=items[start : start + _METRIC_BATCH])

    def log_history(self, run_id: str, history: list[Mapping[str, float]]) -> None:
        """Per-step metric dicts, each with a 'step' key."""
        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, int(row["step"])) for row in history for k, v in row.items() if k != "step"
        ]
        for start in range(0, len(items), _METRIC_BATCH):
            self.client.log_batch(run_id, metrics=items[start : start + _METRIC_BATCH])

    def log_artifacts(self, run_id: str, local_dir: Path, artifact_path: str) -> None:
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)

    def log_artifact(self, run_id: str, local_file: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(local_file), artifact_path)

    def log_table(self, run_id: str, data: Mapping[str, list], artifact_file: str) -> None:
        self.client.log_table(run_id, dict(data), artifact_file)

    def register_checkpoint(self, run_id: str, model_name: str, artifact_path: str, description: str = "",
                            tags: Mapping[str, str] | None = None) -> str:
        """A new version of registered model `model_name` (created if missing) from a logged
        checkpoint, with a description and tags; returns the version number."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(model_name)
        except MlflowException:
            self.client.create_registered_model(model_name)
        source = f"{self.client.get_run(run_id).info.artifact_uri}/{artifact_path}"
        return self.client.create_model_version(model_name, source, run_id=run_id, tags=dict(tags or {}),
                                                description=description or None).version

    def point_alias(self, model_name: str, alias: str, version: str | None) -> None:
        """Point registered model `model_name`'s `alias` at `version`. None takes the alias away
        where it points at a version this job registered; one another job registered keeps it."""
        if version is not None:
            self.client.set_registered_model_alias(model_name, alias, version)
            return
        current = self.client.get_registered_model(model_name).aliases.get(alias)
        if current is None:
            return
        source_run = self.client.get_run(self.client.get_model_version(model_name, current).run_id)
        if source_run.data.tags.get(MLFLOW_PARENT_RUN_ID) == self.parent_id:
            self.client.delete_registered_model_alias(model_name, alias)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        monitor = self._monitors.pop(run_id, None)
        if not self._answers(run_id):
            return  # the monitor's thread is a daemon: left behind, not waited for
        if monitor is not None:
            monitor.finish()
        self.client.set_terminated(run_id, status=status)


class LiveMetrics:
    """Per-step metrics to an MLflow run as they happen (rank 0); a tracking outage costs
    metrics, not the training: the caller still gets the whole history."""

    def __init__(self, tracking_uri: str | None, run_id: str):
        self._client = MlflowClient(tracking_uri)
        self._run_id = run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._client is None:
            return
        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items() if key != "step"]
        try:  # MLflow's client retries for tracking.outage_limit_s first
            self._client.log_batch(self._run_id, metrics=batch)
        except Exception as err:  # any transport or server error: the driver still gets the history
            log.warning("MLflow log_batch for run %s at step %d failed, no more live steps from this "
                           "attempt (the driver logs the whole curve when the run is resumed): %s",
                           self._run_id, step, err)
            self._client = None  # each later step would wait out the limit again
