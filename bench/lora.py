"""LoRA at about a billion parameters (the checkpoint benchmark's model), on one local Ray head,
against full-parameter training of the same model in the same run:

- `lora_step_fits_1b`: 1 when `train.lora` (rank 16, the seven projections) takes at least one
  real optimizer step on 2 ZeRO-3 Ray Train workers here, else 0; with each worker's peak RSS,
  against the full-parameter run's (which takes no step at the full size: its RMSprop state and
  gradients do not fit, see bench/checkpoint.py): `lora_worker_peak_vs_full` = the LoRA
  workers' peak / the full-parameter workers' peak (and the same of anonymous memory alone,
  which leaves out the checkpoint's file pages that loading maps).
- `adapter_bytes_vs_full`: the bytes an iteration publishes, its adapter / the full checkpoint.
- `adapter_switch_vs_reload`: what a kept vLLM engine spends moving to another policy, by
  adapter (`LoRARequest`) / by loading other full weights in place (`reload_weights`): each the
  median, over 3 rounds, of a sampling call that moves less the same call on the policy already
  held (one prompt, one token a candidate, the same seed).

    python -m bench.lora [--size full|smoke]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.checkpoint import SHAPES, TRAIN
from bench.common import ProcessPeaks, Timer, check_size, envelope, local_stack, print_table, ray_daemon_pids

LORA = {"rank": 16, "alpha": 32}  # the seven projections: train.lora's default target modules
FULL_STEPS = {"full": 0, "smoke": 1}  # as the checkpoint benchmark: no full-parameter step fits at 1B
LORA_STEPS = 1
PROMPTS = ["Say hello."]


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _train(stack, root: Path, name: str, model_dir: Path, pairs: Path, train_cfg: dict) -> dict:
    """One training stage through `sppo.training.train_policy`: its record, the workers' peaks."""
    from sppo.config import TrainConfig
    from sppo.policy import Policy
    from sppo.roles import training_role
    from sppo.training import train_policy

    cfg = TrainConfig(**train_cfg)
    checkpoint = root / name / "checkpoint"
    with ProcessPeaks(os.getpid(), ray_daemon_pids(stack)) as peaks, Timer() as trained:
        peaks.enter("train")
        result = train_policy(str(pairs), Policy(str(model_dir)), str(checkpoint), cfg,
                              storage_dir=str(root / name / "ray_train"), role=training_role(cfg, timeout_s=3600))
    return {"checkpoint": checkpoint, "seconds": trained.seconds, "optimizer_steps": len(result.history),
            "timings": result.timings, "partition": result.zero3_partition,
            "worker_peak_rss_mib": peaks.peak("RayTrainWorker"),
            "worker_peak_anon_mib": peaks.peak("RayTrainWorker", anon=True), "published_bytes": _bytes(checkpoint)}


def _switch_seconds(engines, policies: tuple, rounds: int = 3) -> dict:
    """Calls that alternate between two policies (each call moves the engine to the other one),
    each after a call on the policy already held; the switch is the median extra time."""
    import statistics

    same, moved, loads = [], [], []
    for n in range(rounds):
        held, other = policies[n % 2], policies[(n + 1) % 2]
        with Timer() as timed:
            engines.sample(held, PROMPTS, seed=0)
        same.append(timed.seconds)
        with Timer() as timed:
            loads.append(engines.sample(other, PROMPTS, seed=0).weights_load_s)
        moved.append(timed.seconds)
    return {"same_policy_s": statistics.median(same), "new_policy_s": statistics.median(moved),
            "switch_s": max(statistics.median(m - s for m, s in zip(moved, same)), 0.0),
            "weights_load_s": statistics.median(loads), "same_policy_rounds_s": same, "new_policy_rounds_s": moved}


def _engine_switches(model_dir: Path, adapter: Path, full_checkpoint: Path, root: Path) -> dict:
    """One kept engine per way: by adapter (started on the base with LoRA; one adapter slot, so
    each call on the other adapter loads it), by reload (the base and the full checkpoint)."""
    from sppo.config import SamplingConfig
    from sppo.policy import Policy
    from sppo.roles import sampling_role
    from sppo.sampling import EnginePool

    # One prompt, one new token a candidate: the call is little more than the move itself.
    cfg = SamplingConfig(k=2, max_tokens=1, max_model_len=256, cpu_kvcache_gib=1, engine_mode="resident")
    role = sampling_role(cfg, timeout_s=3600)
    other_adapter = root / "adapter-b"  # the same tensors at another path: another adapter id, loaded anew
    shutil.copytree(adapter, other_adapter)
    base = str(model_dir)
    adapters = (Policy(base, str(adapter)), Policy(base, str(other_adapter)))
    with EnginePool(cfg, role, max_lora_rank=LORA["rank"]) as engines:
        engines.sample(adapters[0], PROMPTS, seed=0)  # the start, and adapter a loaded
        by_adapter = _switch_seconds(engines, adapters)
    full = (Policy(base), Policy(str(full_checkpoint)))
    with EnginePool(cfg, role) as engines:
        engines.sample(full[0], PROMPTS, seed=0)
        by_reload = _switch_seconds(engines, full)
    return {"by_adapter": by_adapter, "by_reload": by_reload}


def run(size: str = "full") -> dict:
    import ray

    from sppo.pairs import training_rows
    from sppo.storage import atomic_write_parquet

    check_size(size)
    with tempfile.TemporaryDirectory(prefix="sppo-bench-lora-") as tmp, local_stack(Path(tmp)) as stack:
        root = Path(tmp)
        model_dir = root / "model"
        done = subprocess.run([sys.executable, "-m", "bench.checkpoint", "--build", str(model_dir), "--size", size],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building the model failed:\n{done.stderr[-4000:]}")
        parameters = json.loads(done.stdout.strip().splitlines()[-1])["parameters"]
        prompts, candidates = ["Name a colour.", "Say hello."], [["Blue.", "zz q"], ["Hello there.", "x y"]]
        pairs = root / "pairs.parquet"  # two pairs, one per worker
        atomic_write_parquet(pairs, training_rows(prompts, candidates, [np.array([[0.5, 0.8], [0.2, 0.5]])] * 2,
                                                  [[False, False]] * 2))
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(stack.auth_token_path)
        ray.init(address=f"127.0.0.1:{stack.ray_port}", log_to_driver=False)
        try:
            full = _train(stack, root, "full", model_dir, pairs, {**TRAIN, "max_steps": FULL_STEPS[size]})
            lora = _train(stack, root, "lora", model_dir, pairs, {**TRAIN, "max_steps": LORA_STEPS, "lora": LORA})
            switches = _engine_switches(model_dir, lora["checkpoint"] / "adapter", full["checkpoint"], root)
        finally:
            ray.shutdown()  # before the stack stops: a driver whose head went away is killed
    for record in (full, lora):
        record["checkpoint"] = str(record["checkpoint"].relative_to(root))
    results = {
        "parameters": parameters, "full": full, "lora": lora, "engine": switches,
        "lora_step_fits_1b": float(lora["optimizer_steps"] >= 1),
        "lora_worker_peak_vs_full": lora["worker_peak_rss_mib"] / full["worker_peak_rss_mib"],
        "lora_worker_anon_peak_vs_full": lora["worker_peak_anon_mib"] / full["worker_peak_anon_mib"],
        "adapter_bytes_vs_full": lora["published_bytes"] / full["published_bytes"],
        "adapter_switch_vs_reload": switches["by_adapter"]["switch_s"] / switches["by_reload"]["switch_s"],
    }
    inputs = {"size": size, "shape": SHAPES[size], "dtype": "bfloat16", "zero_stage": 3, "lora": LORA,
              "train": TRAIN, "full_steps": FULL_STEPS[size], "lora_steps": LORA_STEPS,
              "engine": {"prompts": len(PROMPTS), "k": 2, "max_tokens": 1}}
    return envelope("lora", size, inputs, results)


KEYS = ("lora_step_fits_1b", "lora_worker_peak_vs_full", "adapter_switch_vs_reload", "adapter_bytes_vs_full")


def report(record: dict) -> None:
    r = record["results"]
    rows = [[name, r[name]["optimizer_steps"], r[name]["seconds"], r[name]["worker_peak_rss_mib"],
             r[name]["worker_peak_anon_mib"], r[name]["published_bytes"]] for name in ("full", "lora")]
    print_table(f"{r['parameters']:,} parameters, 2 ZeRO-3 workers",
                ["training", "optimizer steps", "seconds", "worker peak RSS MiB", "of it anonymous, peak MiB",
                 "published bytes"], rows)
    rows = [[way, s["same_policy_s"], s["new_policy_s"], s["switch_s"], s["weights_load_s"]]
            for way, s in r["engine"].items()]
    print_table("a kept vLLM engine moving to a new policy",
                ["way", "same policy s", "new policy s", "switch s", "weights load s"], rows)
    print(f"lora_worker_anon_peak_vs_full={r['lora_worker_anon_peak_vs_full']:.4g}")
    for key in KEYS:
        print(f"{key}={r[key]:.4g}")


if __name__ == "__main__":
    from bench.common import cli

    cli(__doc__, run, report)
