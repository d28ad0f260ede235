"""Where one iteration's time goes: one tiny SPPO iteration with the tiny PairRM judge
(`python -m sppo.run --config configs/tiny-pairrm.yaml`), then its per-stage wall times read
back from the iteration's MLflow run, where every run logs them.

Stages: prompt selection is not timed; `time/sampling_s` holds `time/engine_start_s`;
`time/training_s` holds `time/training/{setup,reference_logps,train_steps,checkpoint_save}_s`
(the rest of it is starting the Ray Train workers); `time/tracking_s` is the artifact upload.

    python -m bench.iteration
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import Timer, check_size, cli, envelope, print_table

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny-pairrm.yaml"


def run(size: str = "full") -> dict:
    from mlflow import MlflowClient

    check_size(size)
    with tempfile.TemporaryDirectory(prefix="sppo-bench-iteration-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        # A local sqlite store: no server needed; artifacts go under the working directory.
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1"}
        command = [sys.executable, "-m", "sppo.run", "--config", str(CONFIG), "--iters", "1",
                   "--output-dir", f"{tmp}/out", "--set", "tracking.experiment=sppo-bench"]
        if size == "smoke":
            command += ["--set", "prompts.per_iteration=8", "--set", "train.per_device_batch_size=2"]
        with Timer() as wall:
            done = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("sppo-bench")
        (run_,) = client.search_runs([experiment.experiment_id], filter_string="tags.mlflow.runName = 'iter-1'")
        times = {k: v for k, v in sorted(run_.data.metrics.items()) if k.startswith("time/")}
    inputs = {"config": f"configs/{CONFIG.name}", "iterations": 1, "size": size, "tracking": "MLflow, sqlite store"}
    return envelope("iteration", size, inputs, {"stage_seconds": times, "job_wall_s": wall.seconds})


def report(record: dict) -> None:
    r = record["results"]
    rows = [[name, seconds] for name, seconds in r["stage_seconds"].items()]
    rows.append(["whole job (python -m sppo.run, Ray start included)", r["job_wall_s"]])
    print_table("one tiny-config iteration, from its MLflow run", ["metric", "seconds"], rows)


if __name__ == "__main__":
    cli(__doc__, run, report)
