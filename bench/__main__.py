"""`python -m bench`: every benchmark in turn, then bench/results/latest.json.

    python -m bench [--size full|smoke] [--only judge,train,sample,iteration,scale,checkpoint,lora] [--out PATH]
                    [--max-tokens N]

The scale benchmarks run only when named in --only: `scale` (an iteration at 1,000 to 20,000
prompts), `checkpoint` (a checkpoint of about 1B parameters through save, upload, registry
and a vLLM engine) and `lora` (LoRA against full-parameter training at that size: the results
file's lora_step_fits_1b, lora_worker_peak_vs_full, adapter_bytes_vs_full, adapter_switch_vs_reload). Their records also go to scale.json beside the results file, whose top level
holds scale_ratio, driver_peak_rss_mib, mlflow_table_rows and checkpoint_publish_vs_cp.

Top-level numbers in the results file: judge_ratio, train_ratio_vs_online_ref,
train_ratio_vs_trl, sample_ratio_vs_sequential (each ours / baseline throughput) and
sample_overhead_vs_bare (the fraction of the bare engine's throughput lost); the two training
ratios also with the reference log-probs from the sampler (`..._sampler_reference`), and
sample_logprobs_overhead (what asking vLLM for them costs sampling), and iteration_ratio (the
tiny job's wall time with engines restarted per sampling call / kept for the whole job).
"""

from __future__ import annotations

import argparse
import json
import os
import traceback
from pathlib import Path

from bench import checkpoint, iteration, judge, lora, sample, scale, train
from bench.common import LATEST, write_latest

BENCHMARKS = {"judge": judge, "train": train, "sample": sample, "iteration": iteration, "scale": scale,
              "checkpoint": checkpoint, "lora": lora}
DEFAULT = ("judge", "train", "sample", "iteration")
SCALE_FILE = "scale.json"  # beside the results file: the scale and checkpoint records


def summary(records: dict[str, dict]) -> dict[str, float]:
    """The headline ratios of whichever benchmarks ran."""
    out = {}
    if "judge" in records:
        out["judge_ratio"] = records["judge"]["results"]["ratio"]
    if "train" in records:
        train = records["train"]["results"]
        out["train_ratio_vs_online_ref"] = train["ratio_vs_online_ref"]
        # train.reference_logps: sampler, where the records have it (older ones do not).
        if "ratio_vs_online_ref_sampler_reference" in train:
            out["train_ratio_vs_online_ref_sampler_reference"] = train["ratio_vs_online_ref_sampler_reference"]
        if "ratio_vs_trl" in train:  # absent when the TRL baseline failed
            out["train_ratio_vs_trl"] = train["ratio_vs_trl"]
            out["train_ratio_vs_trl_sampler_reference"] = train["ratio_vs_trl_sampler_reference"]
    if "sample" in records:
        out["sample_ratio_vs_sequential"] = records["sample"]["results"]["ratio_vs_sequential"]
        out["sample_overhead_vs_bare"] = records["sample"]["results"]["overhead_vs_bare"]
        if "logprobs_overhead" in records["sample"]["results"]:  # older records do not have it
            out["sample_logprobs_overhead"] = records["sample"]["results"]["logprobs_overhead"]
    if "iteration" in records and "iteration_ratio" in records["iteration"]["results"]:  # older records do not
        out["iteration_ratio"] = records["iteration"]["results"]["iteration_ratio"]
    if "scale" in records:
        out.update({key: records["scale"]["results"][key]
                    for key in ("scale_ratio", "driver_peak_rss_mib", "mlflow_table_rows")})
    if "checkpoint" in records:
        out["checkpoint_publish_vs_cp"] = records["checkpoint"]["results"]["checkpoint_publish_vs_cp"]
    if "lora" in records:
        out.update({key: records["lora"]["results"][key] for key in lora.KEYS})
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["full", "smoke"], default="full")
    parser.add_argument("--only", default=",".join(DEFAULT), help=f"comma-separated, of {list(BENCHMARKS)}")
    parser.add_argument("--out", type=Path, default=LATEST)
    parser.add_argument("--max-tokens", type=int, help="scale only: the sampled answers' length (default: the size's)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {unknown}; known: {list(BENCHMARKS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    records, failed = {}, {}
    for name in names:
        module = BENCHMARKS[name]
        try:
            records[name] = module.run(args.size, max_tokens=args.max_tokens) if name == "scale" else module.run(args.size)
        except Exception:  # the others still run and are written; the command still fails
            failed[name] = traceback.format_exc()
            print(f"\nbenchmark {name} failed:\n{failed[name]}")
            continue
        module.report(records[name])
    if scaled := {n: records[n] for n in ("scale", "checkpoint") if n in records}:
        scale_path = args.out.parent / SCALE_FILE  # one of the two run alone keeps the other's record
        scaled = {**(json.loads(scale_path.read_text())["benchmarks"] if scale_path.is_file() else {}), **scaled}
        print(f"wrote {write_latest(scaled, summary(scaled), scale_path)}")
    # A partial run (--only) replaces its own benchmarks' records and keeps the others'.
    kept = json.loads(args.out.read_text())["benchmarks"] if args.out.is_file() and set(DEFAULT) - set(names) else {}
    records = {n: r for n, r in {**kept, **records}.items() if n not in failed and "error" not in r}
    path = write_latest({**records, **{n: {"benchmark": n, "error": e} for n, e in failed.items()}},
                        summary(records), args.out)
    print(f"\nwrote {path}")
    for key, value in summary(records).items():
        print(f"{key}={value:.3f}")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")
    return path


if __name__ == "__main__":
    main()
