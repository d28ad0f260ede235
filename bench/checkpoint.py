"""A checkpoint of about a billion parameters through the checkpoint path once, on one local Ray
head and MLflow server: a Llama-shaped model built in code (random weights, bf16, no download),
ZeRO-3 on 2 Ray Train workers (bf16; no optimizer step at the full size), the consolidated checkpoint
published atomically (`sppo.training.train_policy`), uploaded to MLflow and registered as a
model version (`sppo.tracking.Tracker`, with MLflow's multipart upload switched on as the job
switches it on), and a vLLM engine loading it and sampling (`sppo.sampling.EnginePool`).

Per step: seconds and the peak RSS of each process taking part (the builder, the training
workers, this driver, the engine), against the model's size in fp32. The save and upload
throughput is compared with a plain `cp -r` of the same checkpoint on the same disk, measured
in the same run: `checkpoint_publish_vs_cp` = (bytes / (save s + upload s)) / (bytes / cp s).

    python -m bench.checkpoint [--size full|smoke]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.common import (ProcessPeaks, Timer, check_size, envelope, local_stack, peak_rss_mib, print_table,
                          ray_daemon_pids)

# full: about 0.97B parameters (hidden 2048, 22 layers, GQA with 4 KV heads: TinyLlama's shape);
# smoke: the same code on a model small enough for the test suite.
SHAPES = {
    "full": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
             "num_key_value_heads": 4},
    "smoke": {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2},
}


def build_model(out_dir: Path, size: str) -> dict:
    """A Llama-shaped causal LM with random bf16 weights (never an fp32 copy) and the tiny
    policy's tokenizer, saved as safetensors; run in its own process so its peak is its own."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sppo.tiny import resolve_model

    tokenizer_dir = resolve_model("tiny:policy")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    with Timer() as built:
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)
        config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=False,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **SHAPES[size])
        config.dtype = torch.bfloat16
        model = LlamaForCausalLM(config)
    with Timer() as saved:
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return {"parameters": sum(p.numel() for p in model.parameters()), "build_s": built.seconds,
            "save_s": saved.seconds, "peak_rss_mib": peak_rss_mib()}


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# bf16 as the GPU configs train, one pair per worker. No optimizer step at the full size: with one,
# RMSprop's state and the gradients of ~1B parameters on both workers outgrew this machine's 23.5 GiB
# (Ray's memory monitor killed the workers); the checkpoint path is the same either way.
TRAIN = {"bf16": True, "per_device_batch_size": 1, "num_workers": 2, "cpus_per_worker": 1, "epochs": 1,
         "max_length": 48, "max_prompt_length": 24, "learning_rate": 1e-6}
OPTIMIZER_STEPS = {"full": 0, "smoke": 1}


def _through_the_checkpoint_path(stack, root: Path, model_dir: Path, pairs: Path, steps: int):
    """Train (save and publish included), upload, register, load in vLLM: each step's record."""
    from sppo.config import SamplingConfig, TrainConfig
    from sppo.roles import sampling_role, training_role
    from sppo.policy import Policy
    from sppo.sampling import EnginePool
    from sppo.run_directory import RunDirectory
    from sppo.tracking import Tracker
    from sppo.training import train_policy

    tracker = Tracker(stack.mlflow_url, "sppo-bench-checkpoint", RunDirectory(root))
    tracker.start_parent("checkpoint", {})
    run_id = tracker.start_iteration(1, {})
    checkpoint = root / "out" / "iter-1" / "checkpoint"
    with ProcessPeaks(os.getpid(), ray_daemon_pids(stack)) as peaks:
        peaks.enter("train")
        with Timer() as trained:
            train_cfg = TrainConfig(**TRAIN, max_steps=steps)
            result = train_policy(str(pairs), Policy(str(model_dir)), str(checkpoint), train_cfg,
                                  storage_dir=str(root / "ray_train"), mlflow_tracking_uri=stack.mlflow_url,
                                  mlflow_run_id=run_id, role=training_role(train_cfg, timeout_s=3600))
        peaks.enter("upload")
        with Timer() as uploaded:
            tracker.log_artifacts(run_id, checkpoint, "checkpoint")
        peaks.enter("register")
        with Timer() as registered:
            version = tracker.register_checkpoint(run_id, "sppo-bench-1b", "checkpoint")
        peaks.enter("vllm")
        engine_cfg = SamplingConfig(k=2, max_tokens=8, max_model_len=256, cpu_kvcache_gib=1, engine_mode="restart")
        with Timer() as sampled, EnginePool(engine_cfg, sampling_role(engine_cfg, timeout_s=3600)) as engines:
            samples = engines.sample(Policy(str(checkpoint)), ["Say hello."], seed=0)
    tracker.finish(run_id)
    tracker.finish_parent()
    return checkpoint, result, {
        "train": {"seconds": trained.seconds, "timings": result.timings, "peak_rss_mib": peaks.peaks.get("train", {})},
        "upload": {"seconds": uploaded.seconds, "peak_rss_mib": peaks.peaks.get("upload", {}),
                   "bytes": sum(a.file_size or 0 for a in tracker.client.list_artifacts(run_id, "checkpoint"))},
        "register": {"seconds": registered.seconds, "model_version": int(version)},
        "vllm_load": {"seconds": sampled.seconds, "engine_start_s": samples.engine_start_s,
                      "generated_tokens": samples.num_generated_tokens, "dtype": engine_cfg.dtype,
                      "peak_rss_mib": peaks.peaks.get("vllm", {})},
    }


def run(size: str = "full") -> dict:
    import ray

    from sppo.pairs import training_rows
    from sppo.storage import atomic_write_parquet
    from sppo.tracking import LARGE_ARTIFACT_ENV

    check_size(size)
    steps: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="sppo-bench-checkpoint-") as tmp, local_stack(Path(tmp)) as stack:
        root = Path(tmp)
        model_dir = root / "model"
        with Timer() as wall:
            done = subprocess.run([sys.executable, "-m", "bench.checkpoint", "--build", str(model_dir),
                                   "--size", size], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building the model failed:\n{done.stderr[-4000:]}")
        built = json.loads(done.stdout.strip().splitlines()[-1])
        steps["build"] = {"seconds": wall.seconds, "peak_rss_mib": {"builder": built["peak_rss_mib"]}}

        # Two pairs, one per worker.
        prompts = ["Name a colour.", "Say hello."]
        candidates = [["Blue.", "zz q"], ["Hello there.", "x y"]]
        matrices = [np.array([[0.5, 0.8], [0.2, 0.5]])] * 2
        pairs = root / "pairs.parquet"
        atomic_write_parquet(pairs, training_rows(prompts, candidates, matrices, [[False, False]] * 2))
        os.environ.update({"RAY_AUTH_TOKEN_PATH": str(stack.auth_token_path), **LARGE_ARTIFACT_ENV})
        ray.init(address=f"127.0.0.1:{stack.ray_port}", log_to_driver=False)
        try:
            checkpoint, result, timed = _through_the_checkpoint_path(stack, root, model_dir, pairs,
                                                                     OPTIMIZER_STEPS[size])
            steps.update(timed)
        finally:
            ray.shutdown()  # before the stack stops: a driver whose head went away is killed
        checkpoint_bytes = _bytes(checkpoint)
        with Timer() as copied:
            subprocess.run(["cp", "-r", str(checkpoint), str(root / "cp-copy")], check=True)
        steps["cp"] = {"seconds": copied.seconds}
    save_s = result.timings["checkpoint_save"]
    fp32_mib = built["parameters"] * 4 / 2**20
    peaks_by_process = {f"{step}/{kind}": mib for step, record in steps.items()
                        for kind, mib in record.get("peak_rss_mib", {}).items()}
    results = {
        "parameters": built["parameters"], "checkpoint_bytes": checkpoint_bytes, "mlflow_bytes": steps["upload"]["bytes"],
        "fp32_model_mib": fp32_mib, "steps": steps,
        "largest_process_peak_mib": max(peaks_by_process.values()),
        "largest_process": max(peaks_by_process, key=peaks_by_process.get),
        "publish_and_upload_mib_per_s": checkpoint_bytes / 2**20 / (save_s + steps["upload"]["seconds"]),
        "cp_mib_per_s": checkpoint_bytes / 2**20 / copied.seconds,
        "checkpoint_publish_vs_cp": copied.seconds / (save_s + steps["upload"]["seconds"]),
    }
    inputs = {"size": size, "shape": SHAPES[size], "dtype": "bfloat16", "train": {**TRAIN, "max_steps": OPTIMIZER_STEPS[size]},
              "zero_stage": 3,
              "artifact_store": "MLflow server's local artifact destination, through its proxy"}
    return envelope("checkpoint", size, inputs, results)


SHOWN = ("builder", "driver", "RayTrainWorker", "VLLMEngine")  # the table's processes; the record has all


def report(record: dict) -> None:
    r = record["results"]
    rows = []
    for step, s in r["steps"].items():
        peaks = ", ".join(f"{k} {v:.0f}" for k, v in s.get("peak_rss_mib", {}).items() if k in SHOWN)
        rows.append([step, s["seconds"], peaks])
    print_table(f"a {r['parameters'] / 1e9:.2f}B-parameter checkpoint ({r['checkpoint_bytes'] / 2**30:.2f} GiB), "
                f"fp32 size {r['fp32_model_mib']:.0f} MiB", ["step", "seconds", "peak RSS MiB"], rows)
    print(f"largest process: {r['largest_process']} at {r['largest_process_peak_mib']:.0f} MiB")
    print(f"checkpoint_publish_vs_cp={r['checkpoint_publish_vs_cp']:.3f}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SHAPES), default="full")
    parser.add_argument("--build", type=Path, help="only build the model into this directory (a JSON line out)")
    args = parser.parse_args()
    if args.build:
        print(json.dumps(build_model(args.build, args.size)))
    else:
        report(run(args.size))
