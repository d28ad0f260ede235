"""How an iteration's cost grows with its prompts: one iteration of the tiny policy
(`configs/tiny.yaml`, the rule judge) at 1,000, 5,000 and 20,000 generated prompts, K = 5, on one
local Ray head and MLflow server (`sppo.devtools.localstack`).

Per size and stage (sampling, judging, pairs, training, evaluation, tracking): wall seconds (the
iteration's `time/<stage>_s`, read back from its MLflow run), seconds per prompt, the peak RSS of
the driver and of each actor kind while the stage ran (every process sampled twice a second,
attributed to the stage the job's log last announced), and the bytes the stage published to the
output directory (the manifest's outputs) and sent to MLflow (the iteration run's artifacts;
metrics are not counted). Training takes a fixed number of optimizer steps at every size
(`train.max_steps`): its reference pass, data encoding and checkpoint still cover the whole
iteration. Evaluation uses the same 32 held-out prompts at every size.

`--max-tokens N` shortens the responses (256 by default, as users sample): the record says so.

    python -m bench --only scale [--size full|smoke]
    python -m bench.scale [--size full|smoke] [--max-tokens N]

`scale_ratio` = the worst stage's seconds per prompt at the largest size / at the smallest.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import ProcessPeaks, Timer, check_size, envelope, local_stack, print_table, ray_daemon_pids
from sppo.manifest import STAGES

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "tiny.yaml"
SETTINGS = {
    "full": {"sizes": [1000, 5000, 20000], "k": 5, "max_tokens": 256, "train_steps": 8, "eval_size": 32},
    "smoke": {"sizes": [16, 48], "k": 5, "max_tokens": 8, "train_steps": 2, "eval_size": 4},
}
# The largest size once more with its samples published beforehand at 256 tokens a candidate: the
# driver and every later stage at the text volume users have, whatever --max-tokens sampled.
PRESAMPLED_TOKENS = {"full": 256, "smoke": 16
}
_WORDS = ("river mountain engine garden winter market signal orbit lantern harbor violin desert forest "
          "copper glacier thunder meadow compass pepper canyon falcon velvet marble pencil ladder").split()
_ASKS = ("Explain how", "Write a short story about", "List three facts about", "Compare", "Describe why",
         "Give advice on", "Summarize what you know about", "Write a poem on")


def generated_prompts(count: int, seed: int = 0) -> list[str]:
    """`count` distinct prompts of varied wording and length (not one prompt repeated)."""
    rng = random.Random(seed)
    prompts: list[str] = []
    seen: set[str] = set()
    while len(prompts) < count:
        words = " and ".join(rng.sample(_WORDS, rng.randint(1, 4)))
        text = f"{rng.choice(_ASKS)} the {words} (case {rng.randrange(10**6)})."
        if text not in seen:
            seen.add(text)
            prompts.append(text)
    return prompts


def _size_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def _artifact_bytes(client, run_id: str, path: str | None = None) -> dict[str, int]:
    """Every artifact of a run: its path -> bytes."""
    out: dict[str, int] = {}
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            out.update(_artifact_bytes(client, run_id, item.path))
        else:
            out[item.path] = item.file_size or 0
    return out


def presampled_candidates(prompts: list[str], k: int, tokens: int, seed: int = 0) -> list[dict]:
    """samples.parquet rows with k candidates of `tokens` tokens of the tiny policy's tokenizer
    each (varied words), as a sampling stage of that length would publish them."""
    from transformers import AutoTokenizer

    from sppo.tiny import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("tiny:policy"))
    word_ids = [tokenizer(f" {w}", add_special_tokens=False).input_ids for w in _WORDS]
    rng = random.Random(seed)

    def candidate_ids() -> list[int]:  # random words' token ids, cut at `tokens`
        ids: list[int] = []
        while len(ids) < tokens:
            ids += rng.choice(word_ids)
        return ids[:tokens]

    texts: list[str] = []
    for start in range(0, len(prompts) * k, 5000):  # decoded in batches: few ids in memory at once
        texts += tokenizer.batch_decode([candidate_ids() for _ in range(min(5000, len(prompts) * k - start))])
    return [{"prompt": p, "candidates": texts[n * k:(n + 1) * k]} for n, p in enumerate(prompts)]


def _job(stack, root: Path, prompts: int, setting: dict, max_tokens: int, presampled: bool = False) -> dict:
    """One iteration at `prompts` prompts. presampled: the samples are published before the job
    (candidates of max_tokens tokens, `presampled_candidates`), so the job skips sampling."""
    from mlflow import MlflowClient

    from sppo.config import load_config, parse_override
    from sppo.manifest import RunManifest
    from sppo.run_directory import RunDirectory
    from sppo.storage import atomic_write_parquet

    source = root / f"prompts-{prompts}.jsonl"
    every = generated_prompts(prompts + setting["eval_size"], seed=prompts)
    source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in every))
    name = f"{prompts}{'-presampled' if presampled else ''}"
    out, experiment = root / f"out-{name}", f"sppo-bench-scale-{name}-{root.name}"
    overrides = [f"prompts.source={source}", "prompts.num_splits=1", f"prompts.per_iteration={prompts}",
                 f"prompts.eval_size={setting['eval_size']}", f"sampling.k={setting['k']}",
                 f"sampling.max_tokens={max_tokens}", f"train.max_steps={setting['train_steps']}",
                 "train.epochs=1", f"train.max_length={96 + max_tokens + 1}", f"tracking.experiment={experiment}",
                 "tracking.register_model=null", "timeouts.sampling_s=36000", "timeouts.judging_s=36000",
                 "timeouts.training_s=36000"]
    if presampled:  # published and recorded as the sampling stage does, so that the job skips it
        samples = RunDirectory(out).iteration(1).samples
        atomic_write_parquet(samples, presampled_candidates(every[:prompts], setting["k"], max_tokens))
        cfg = load_config(CONFIG, {**dict(parse_override(o) for o in overrides), "iterations": 1,
                                   "output_dir": str(out)})
        RunManifest(RunDirectory(out)).record_stage(1, "sampling", cfg, {"samples": samples}, mlflow_run_id="presampled")
    command = [sys.executable, "-m", "sppo.run", "--config", str(CONFIG), "--iters", "1", "--output-dir", str(out)]
    for override in overrides:
        command += ["--set", override]
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{stack.ray_port}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(stack.auth_token_path), "MLFLOW_TRACKING_URI": stack.mlflow_url,
           "HF_HUB_OFFLINE": "1"}
    log = []
    with Timer() as wall:
        job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        with ProcessPeaks(job.pid, ray_daemon_pids(stack)) as peaks:
            for line in job.stdout:  # "iteration 1: sampling ..." opens a stage, "... done in" closes it
                log.append(line)
                for stage in STAGES:
                    if f"iteration 1: {stage} ..." in line:
                        peaks.enter(stage)
                    elif f"iteration 1: {stage} done in" in line:
                        peaks.enter("between stages")
            job.wait()
    if job.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({job.returncode}):\n{''.join(log[-60:])}")

    client = MlflowClient(stack.mlflow_url)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                                filter_string="tags.mlflow.runName = 'iter-1'")
    metrics = run.data.metrics
    artifacts = _artifact_bytes(client, run.info.run_id)
    table = Path(client.download_artifacts(run.info.run_id, "samples.json", str(root / f"table-{prompts}")))
    manifest = json.loads((out / "manifest.json").read_text())["iterations"]["1"]["stages"]
    stages = {}
    for stage in STAGES:
        if f"time/{stage}_s" not in metrics:  # sampling, when presampled
            continue
        seconds = metrics[f"time/{stage}_s"]
        stages[stage] = {
            "seconds": seconds,
            "seconds_per_prompt": seconds / prompts,
            "peak_rss_mib": peaks.peaks.get(stage, {}),
            "output_dir_bytes": sum(_size_bytes(out / p) for p in manifest[stage]["outputs"].values()),
            "mlflow_bytes": sum(artifacts.values()) if stage == "tracking" else 0,
        }
    return {
        "prompts": prompts, "presampled": presampled, "job_wall_s": wall.seconds, "stages": stages,
        "driver_peak_rss_mib": peaks.driver_hwm_mib,
        "peak_rss_mib_outside_stages": {k: v for k, v in peaks.peaks.items() if k not in STAGES},
        "mlflow_artifact_bytes": artifacts,
        "mlflow_table_rows": len(json.loads(table.read_text())["data"]),
        "mean_response_tokens": metrics.get("sampling/mean_response_tokens", max_tokens if presampled else None),
        "train_steps": len(json.loads((out / "iter-1" / "train_history.json").read_text())),
    }


def scale_ratio(records: list[dict]) -> tuple[float, str]:
    """The worst stage's seconds per prompt at the largest size over the smallest, and the stage."""
    small, large = records[0]["stages"], records[-1]["stages"]
    ratios = {s: large[s]["seconds_per_prompt"] / small[s]["seconds_per_prompt"] for s in STAGES}
    worst = max(ratios, key=ratios.get)
    return ratios[worst], worst


def run(size: str = "full", max_tokens: int | None = None) -> dict:
    setting = SETTINGS[check_size(size)]
    max_tokens = max_tokens or setting["max_tokens"]
    with tempfile.TemporaryDirectory(prefix="sppo-bench-scale-") as tmp, local_stack(Path(tmp)) as stack:
        records = []
        for prompts in setting["sizes"]:
            records.append(_job(stack, Path(tmp), prompts, setting, max_tokens))
            print(f"scale: {prompts} prompts done in {records[-1]['job_wall_s']:.0f} s: {json.dumps(records[-1])}",
                  flush=True)
        presampled = _job(stack, Path(tmp), setting["sizes"][-1], setting, PRESAMPLED_TOKENS[size], presampled=True)
        print(f"scale: {presampled['prompts']} prompts presampled at {PRESAMPLED_TOKENS[size]} tokens done in "
              f"{presampled['job_wall_s']:.0f} s", flush=True)
    ratio, worst = scale_ratio(records)
    inputs = {"config": f"configs/{CONFIG.name}", "size": size, **setting, "max_tokens": max_tokens,
              "presampled_tokens": PRESAMPLED_TOKENS[size],
              "max_tokens_asked": SETTINGS["full"]["max_tokens"], "cluster_cpus": stack.num_cpus,
              "judge": "rule", "training": f"train.max_steps={setting['train_steps']} at every size",
              "tracking": "MLflow server (sppo.devtools.localstack)"}
    largest = records[-1]
    results = {"sizes": records, "presampled": presampled, "scale_ratio": ratio, "worst_stage": worst,
               "driver_peak_rss_mib": max(largest["driver_peak_rss_mib"], presampled["driver_peak_rss_mib"]),
               "mlflow_table_rows": largest["mlflow_table_rows"]}
    return envelope("scale", size, inputs, results)


def report(record: dict) -> None:
    results, inputs = record["results"], record["inputs"]
    sizes = [*results["sizes"], results["presampled"]]
    header = ["stage"] + [f"{r['prompts']}{' presampled' if r['presampled'] else ''} prompts: "
                          "s, ms/prompt, driver MiB, out MiB" for r in sizes]
    rows = []
    for stage in STAGES:
        row = [stage]
        for r in sizes:
            s = r["stages"].get(stage)
            row.append("-" if s is None else f"{s['seconds']:.1f}, {1000 * s['seconds_per_prompt']:.2f}, "
                       f"{s['peak_rss_mib'].get('driver', 0):.0f}, {s['output_dir_bytes'] / 2**20:.1f}")
        rows.append(row)
    rows.append(["whole job"] + [f"{r['job_wall_s']:.0f} s, driver peak {r['driver_peak_rss_mib']:.0f} MiB, "
                                 f"MLflow {sum(r['mlflow_artifact_bytes'].values()) / 2**20:.1f} MiB"
                                 for r in sizes])
    print_table(f"one iteration, K={inputs['k']}, sampled responses up to {inputs['max_tokens']} tokens; presampled "
                f"{inputs['presampled_tokens']} tokens", header, rows)
    results = record["results"]
    print(f"worst stage: {results['worst_stage']}; sample table rows at {sizes[-1]['prompts']} prompts: "
          f"{results['mlflow_table_rows']}")
    print(f"scale_ratio={results['scale_ratio']:.3f}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SETTINGS), default="full")
    parser.add_argument("--max-tokens", type=int, default=None, help="response length (default: the size's)")
    args = parser.parse_args()
    report(run(args.size, args.max_tokens))
