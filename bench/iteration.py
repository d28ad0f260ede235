"""Where a job's time goes, and what keeping the vLLM engines saves: the tiny 3-iteration job
(`python -m sppo.run --config configs/tiny.yaml`) twice on one local Ray head and MLflow server
(`sppo.devtools.localstack`), first with `sampling.engine_mode=restart` (engines started for every
sampling call: each iteration's sampling and each policy's held-out samples), then with
`resident` (one engine start per job, each new policy loaded in place).

Per side: the job's wall time (`python -m sppo.run`, Ray already up), its engine starts and its
per-stage seconds summed over the iterations, read back from the iterations' MLflow runs, where
every run logs them. `iteration_ratio` = restart wall time / resident wall time.

Stages: prompt selection is not timed; `time/sampling_s` holds `time/sampling/engine_start_s`
and `time/sampling/weights_load_s`; `time/training_s` holds `time/training/{worker_start,
imports,setup,reference_logps,train_steps,checkpoint_save}_s`; `time/tracking_s` is the
artifact upload.

    python -m bench.iteration [--size full|smoke]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import Timer, check_size, cli, envelope, local_stack, print_table

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "tiny.yaml"
MODES = ("restart", "resident")
SETTINGS = {
    "full": {"iterations": 3, "overrides": []},
    # One iteration, few prompts, short answers: restart still starts 3 engines (sampling, pi_0's
    # and pi_1's held-out samples), resident 1.
    "smoke": {"iterations": 1, "overrides": ["prompts.per_iteration=8", "prompts.eval_size=4",
                                             "sampling.max_tokens=8", "train.epochs=1",
                                             "train.per_device_batch_size=2"]},
}


def _job(stack, out: Path, mode: str, setting: dict) -> dict:
    from mlflow import MlflowClient

    experiment = f"sppo-bench-{mode}"
    command = [sys.executable, "-m", "sppo.run", "--config", str(CONFIG), "--iters", str(setting["iterations"]),
               "--output-dir", str(out), "--set", f"tracking.experiment={experiment}",
               "--set", f"sampling.engine_mode={mode}", "--set", "tracking.register_model=null"]
    for override in setting["overrides"]:
        command += ["--set", override]
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{stack.ray_port}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(stack.auth_token_path), "MLFLOW_TRACKING_URI": stack.mlflow_url,
           "HF_HUB_OFFLINE": "1"}
    with Timer() as wall:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    client = MlflowClient(stack.mlflow_url)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              filter_string="tags.mlflow.runName LIKE 'iter-%'")
    stages: dict[str, float] = {}
    starts = 0
    for run in runs:
        metrics = run.data.metrics
        for key, value in metrics.items():
            if key.startswith("time/"):
                stages[key] = stages.get(key, 0.0) + value
        starts += int(metrics.get("sampling/engine_starts", 0) + metrics.get("evaluation/engine_starts", 0))
    return {"job_wall_s": wall.seconds, "engine_starts": starts, "iterations": len(runs),
            "stage_seconds": dict(sorted(stages.items()))}


def run(size: str = "full") -> dict:
    setting = SETTINGS[check_size(size)]
    with tempfile.TemporaryDirectory(prefix="sppo-bench-iteration-") as tmp, local_stack(Path(tmp)) as stack:
        sides = {mode: _job(stack, Path(tmp) / mode, mode, setting) for mode in MODES}
    inputs = {"config": f"configs/{CONFIG.name}", "size": size, **setting, "cluster_cpus": stack.num_cpus,
              "tracking": "MLflow server (sppo.devtools.localstack)"}
    results = {"sides": sides, "iteration_ratio": sides["restart"]["job_wall_s"] / sides["resident"]["job_wall_s"]}
    return envelope("iteration", size, inputs, results)


def report(record: dict) -> None:
    sides = record["results"]["sides"]
    keys = sorted({key for side in sides.values() for key in side["stage_seconds"]})
    rows = [[key] + [sides[mode]["stage_seconds"].get(key, 0.0) for mode in MODES] for key in keys]
    rows.append(["engine starts"] + [sides[mode]["engine_starts"] for mode in MODES])
    rows.append(["whole job (python -m sppo.run, Ray up)"] + [sides[mode]["job_wall_s"] for mode in MODES])
    print_table(f"the tiny job, {record['inputs']['iterations']} iteration(s), seconds summed over iterations",
                ["metric", "engine_mode restart", "engine_mode resident"], rows)
    print(f"iteration_ratio={record['results']['iteration_ratio']:.3f}")


if __name__ == "__main__":
    cli(__doc__, run, report)
