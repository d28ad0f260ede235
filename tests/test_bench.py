"""The benchmarks under bench/ at their smallest setting: each runs for real (PairRM, DeepSpeed
ZeRO-3 in Ray Train, TRL, vLLM, one SPPO iteration with MLflow) and writes the keys that
`make bench` and docs/performance.md rely on. Speed itself is not asserted here: the figures
are `make bench`'s job."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from bench.common import ProcessPeaks, check_size, print_table, write_latest
from sppo.config import SamplingConfig


def test_sizes_are_checked():
    with pytest.raises(ValueError, match="benchmark size must be one of"):
        check_size("huge")


def test_synthetic_judge_texts_have_the_asked_lengths(tiny_pairrm_dir):
    from bench.judge import load_blender, synthetic_texts

    tokenizer = load_blender(tiny_pairrm_dir).ranker_tokenizer
    texts = synthetic_texts(tokenizer, count=20, mean_tokens=200, rng=np.random.default_rng(0))
    lengths = [len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    # Decoding and re-encoding may merge a token or two at the cut.
    assert all(140 <= n <= 255 for n in lengths), lengths
    assert 180 <= np.mean(lengths) <= 220
    assert len(set(lengths)) > 5  # mixed lengths, as real batches have


def _flop_formula(model_dir: str) -> tuple[int, int]:
    """PaLM's count for a forward pass, written out independently of FlopCounterMode: 2 FLOPs per
    matmul weight per token, plus 4 x layers x attention width per (query, key) pair (QK^T and AV)."""
    import torch
    from transformers import AutoConfig

    from bench.common import meta_model

    config = AutoConfig.from_pretrained(model_dir)
    model = meta_model(model_dir)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return 2 * weights, 4 * config.num_hidden_layers * config.num_attention_heads * config.head_dim


def test_training_flops_count_one_reference_forward_and_policy_forward_backward_per_epoch(tiny_policy_dir):
    from bench.train import training_flops
    from sppo.training_data import EncodedSequence

    per_token, per_query_key = _flop_formula(tiny_policy_dir)
    forward = lambda t: per_token * t + per_query_key * t * t  # noqa: E731
    sequences = [EncodedSequence(input_ids=[5] * t, prompt_length=3) for t in (100, 37, 100)]
    # Backward costs twice the forward; the reference adds one forward, however many epochs.
    needed = 2 * forward(100) + forward(37)
    assert training_flops(tiny_policy_dir, sequences, epochs=1) == 4 * needed
    assert training_flops(tiny_policy_dir, sequences, epochs=2) == 7 * needed


def test_sampling_flops_are_two_per_weight_per_generated_token(tiny_policy_dir):
    from bench.sample import flops_per_generated_token

    per_token, per_query_key = _flop_formula(tiny_policy_dir)
    assert flops_per_generated_token(tiny_policy_dir) == per_token + per_query_key


def test_results_file_has_the_summary_and_every_record(tmp_path, capsys):
    path = write_latest({"judge": {"results": {"ratio": 6.0}}}, {"judge_ratio": 6.0}, tmp_path / "r" / "latest.json")
    assert json.loads(path.read_text()) == {"judge_ratio": 6.0, "benchmarks": {"judge": {"results": {"ratio": 6.0}}}}
    print_table("t", ["name", "value"], [["a", 1.23456], ["bb", 2]])
    assert "a     1.235" in capsys.readouterr().out


def test_memory_sampling_goes_on_after_a_failed_sample(monkeypatch):
    """A sample that raises (psutil reading the process table while another job's processes
    die) is skipped. It used to end the sampling thread silently: the likeliest cause of a 24 s
    training run in the benchmarks' smoke recording a worker peak of 0 beside the two-node
    tests (7 December's suite; not reproduced alone)."""
    import os
    import time

    reads = []
    whole_table = ProcessPeaks._processes

    def failing_once(self):
        reads.append(1)
        if len(reads) == 1:
            raise ValueError("a process's stat read while it exits")
        return whole_table(self)

    monkeypatch.setattr(ProcessPeaks, "_processes", failing_once)
    with ProcessPeaks(os.getpid(), [], interval_s=0.01) as peaks:
        time.sleep(0.3)
    assert peaks.failed_samples == 1 and len(reads) > 2
    assert peaks.peak("driver") > 0


def run_bench(*args: str) -> str:
    """`python -m bench` in a process of its own (it starts and stops Ray clusters of its own); its output."""
    done = subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout


@pytest.mark.slow
def test_make_bench_smoke_writes_every_key(tmp_path):
    # The TRL baseline is installed by `make bench` only (it is not in the lock): without it the
    # other measurements still run and the train record says why TRL's is missing.
    has_trl = importlib.util.find_spec("trl") is not None
    out = run_bench("--size", "smoke", "--out", str(tmp_path / "latest.json"))
    results = json.loads((tmp_path / "latest.json").read_text())
    keys = ["judge_ratio", "train_ratio_vs_online_ref", "sample_ratio_vs_sequential", "sample_overhead_vs_bare",
            "iteration_ratio"]
    for key in keys + (["train_ratio_vs_trl"] if has_trl else []):
        assert np.isfinite(results[key]), key
    assert set(results["benchmarks"]) == {"judge", "train", "sample", "iteration"}
    for record in results["benchmarks"].values():
        assert record["machine"]["cpu_count"] >= 1 and record["versions"]["torch"]
        assert record["inputs"]
    judge = results["benchmarks"]["judge"]["results"]
    assert judge["scores_equal"] and judge["max_abs_score_diff"] <= 1e-4
    assert 0 < judge["ours_fraction_of_matmul_peak"] < 1
    train = results["benchmarks"]["train"]["results"]
    assert set(train["runs"]) == ({"ours", "ours_sampler_reference", "online_reference", "ours_2_epochs",
                                   "online_reference_2_epochs"} | ({"trl"} if has_trl else set()))
    assert np.isfinite(results["train_ratio_vs_online_ref_sampler_reference"])
    # The sampler supplied the reference: no reference forward pass is counted for it.
    assert train["runs"]["ours_sampler_reference"]["flops"] < train["runs"]["ours"]["flops"]
    for run in train["runs"].values():
        assert run["response_tokens_per_s"] > 0 and run["peak_worker_rss_mib"] > 100
        assert 0 < run["fraction_of_matmul_peak"] < 1
    assert train["runs"]["ours_2_epochs"]["steps"] == 2 * train["runs"]["ours"]["steps"]
    assert set(train["logits_memory"]) == {"plain", "ours"}
    assert all(m["seconds"] > 0 and m["peak_above_logits_mib"] >= 0 for m in train["logits_memory"].values())
    assert np.isfinite(train["ratio_vs_online_ref_2_epochs"])
    if has_trl:
        assert train["runs"]["trl"]["steps"] == results["benchmarks"]["train"]["inputs"]["steps"]
    else:
        assert "train_ratio_vs_trl" not in results and "trl" in train["trl_error"]
    sample = results["benchmarks"]["sample"]["results"]
    assert all(r["tokens_per_s"] > 0 and 0 < r["fraction_of_matmul_peak"] < 1 for r in sample["runs"].values())
    # The bare engine ran with the actor's thread count and priority, or the overhead means nothing.
    assert sample["bare_threads"]["torch_threads"] == sample["engine_threads"]["torch_threads"]
    # Both engines took our max_num_seqs; the same-run comparison, vLLM's own (256 on a CPU).
    expected = SamplingConfig().max_num_seqs
    seqs = results["benchmarks"]["sample"]["inputs"]["max_num_seqs"]
    assert (seqs["actor"], seqs["bare"]) == (expected, expected) and seqs["vllm_default"] >= 1
    assert sample["ratio_vs_vllm_default_max_num_seqs"] > 0
    assert sample["runs"]["ours_token_logps"]["tokens_per_s"] > 0 and np.isfinite(results["sample_logprobs_overhead"])
    # One iteration both ways: restart starts an engine for sampling and for pi_0's and pi_1's
    # held-out samples, resident one for all three.
    iteration = results["benchmarks"]["iteration"]["results"]
    assert {mode: side["engine_starts"] for mode, side in iteration["sides"].items()} == {"restart": 3, "resident": 1}
    for side in iteration["sides"].values():
        for stage in ("sampling", "sampling/engine_start", "judging", "training", "training/worker_start",
                      "training/model_load", "training/reference_logps", "training/train_steps",
                      "training/checkpoint_save", "evaluation", "tracking"):
            assert side["stage_seconds"][f"time/{stage}_s"] > 0, stage
    assert np.isfinite(results["iteration_ratio"]) and results["iteration_ratio"] > 0
    assert out.count("\nratio=") == 3  # judge, train, sample each end with their ratio line


def test_generated_prompts_are_distinct_and_varied():
    from bench.scale import generated_prompts

    prompts = generated_prompts(5000)
    assert len(set(prompts)) == 5000 and generated_prompts(5000) == prompts
    assert len({p.split(" (case")[0] for p in prompts}) > 500  # not one prompt numbered 5,000 times
    assert len({len(p) for p in prompts}) > 20


def test_scale_ratio_is_the_worst_stages_growth_per_prompt():
    from bench.scale import STAGES, scale_ratio

    def record(prompts, seconds):
        return {"stages": {s: {"seconds_per_prompt": seconds.get(s, 10.0) / prompts} for s in STAGES}}

    # 20x the prompts: judging took 25x the time (1.25 per prompt), sampling 10x, the rest the same.
    assert scale_ratio([record(1000, {}), record(20000, {"judging": 250.0, "sampling": 100.0})]) == (1.25, "judging")


@pytest.mark.slow
def test_scale_benchmarks_smoke_write_scale_json(tmp_path):
    """`python -m bench --only scale,checkpoint` at its smallest: each benchmark on its own Ray head
    and MLflow server."""
    from bench.scale import SETTINGS, STAGES

    out = run_bench("--size", "smoke", "--only", "scale,checkpoint", "--out", str(tmp_path / "latest.json"))
    assert "\nscale_ratio=" in out and "\ncheckpoint_publish_vs_cp=" in out
    results = json.loads((tmp_path / "scale.json").read_text())
    assert set(results["benchmarks"]) == {"scale", "checkpoint"}
    assert np.isfinite(results["scale_ratio"]) and results["scale_ratio"] > 0
    record = results["benchmarks"]["scale"]["results"]
    sizes = record["sizes"]
    assert [r["prompts"] for r in sizes] == SETTINGS["smoke"]["sizes"]
    for r in sizes:
        assert r["train_steps"] == SETTINGS["smoke"]["train_steps"]
        assert r["mlflow_table_rows"] == r["prompts"]  # under the table's cap of 200 prompts
        for stage in STAGES:
            assert r["stages"][stage]["seconds"] > 0, stage
        # Each stage that publishes data wrote it; the engine and the trainer's workers were seen.
        assert all(r["stages"][s]["output_dir_bytes"] > 0 for s in ("sampling", "judging", "pairs", "training"))
        assert r["stages"]["sampling"]["peak_rss_mib"]["VLLMEngine"] > 100
        assert r["stages"]["training"]["peak_rss_mib"]["RayTrainWorker"] > 100
        assert 50 < r["driver_peak_rss_mib"] < 4096
        assert r["stages"]["tracking"]["mlflow_bytes"] == sum(r["mlflow_artifact_bytes"].values()) > 0
    # The larger size wrote more samples: the outputs grow with the prompts.
    assert sizes[1]["stages"]["sampling"]["output_dir_bytes"] > sizes[0]["stages"]["sampling"]["output_dir_bytes"]
    # The largest size again with 16-token samples published before the job: sampling is skipped.
    presampled = record["presampled"]
    assert presampled["prompts"] == sizes[-1]["prompts"] and "sampling" not in presampled["stages"]
    assert all(presampled["stages"][s]["seconds"] > 0 for s in STAGES if s != "sampling")
    assert results["driver_peak_rss_mib"] == max(sizes[-1]["driver_peak_rss_mib"], presampled["driver_peak_rss_mib"])

    checkpoint = results["benchmarks"]["checkpoint"]["results"]
    assert 0 < results["checkpoint_publish_vs_cp"] == checkpoint["checkpoint_publish_vs_cp"]
    # Published, uploaded byte for byte, registered, and loaded by a vLLM engine that sampled from it.
    assert checkpoint["mlflow_bytes"] == checkpoint["checkpoint_bytes"] > 0
    steps = checkpoint["steps"]
    assert steps["register"]["model_version"] >= 1 and steps["vllm_load"]["generated_tokens"] > 0
    assert steps["train"]["peak_rss_mib"]["RayTrainWorker"] > 100 and steps["vllm_load"]["peak_rss_mib"]["VLLMEngine"] > 100
    assert {"model_load", "train_steps", "checkpoint_save"} <= set(steps["train"]["timings"])


@pytest.mark.slow
def test_lora_benchmark_smoke_measures_both_trainings_and_both_switches(tmp_path):
    """`python -m bench --only lora` at its smallest: the full-parameter and the LoRA run on 2
    ZeRO-3 workers, and a kept engine moving by adapter and by reload; its keys in the results."""
    from bench.lora import KEYS

    out = run_bench("--size", "smoke", "--only", "lora", "--out", str(tmp_path / "latest.json"))
    results = json.loads((tmp_path / "latest.json").read_text())
    record = results["benchmarks"]["lora"]["results"]
    for key in KEYS:
        assert f"\n{key}=" in out and results[key] == record[key] and np.isfinite(results[key]), key
    full, lora = record["full"], record["lora"]
    assert results["lora_step_fits_1b"] == 1.0 and lora["optimizer_steps"] == 1
    assert lora["partition"]["trainable_numel"] < full["partition"]["trainable_numel"] / 2
    assert full["worker_peak_rss_mib"] > 100 and lora["worker_peak_rss_mib"] > 100
    # The adapter alone was published: smaller than the full checkpoint, which holds its own weights.
    assert 0 < lora["published_bytes"] < full["published_bytes"]
    by_adapter, by_reload = record["engine"]["by_adapter"], record["engine"]["by_reload"]
    assert by_adapter["weights_load_s"] == 0 and by_reload["weights_load_s"] > 0
    assert by_reload["switch_s"] > 0 and all(s["new_policy_s"] > 0 for s in (by_adapter, by_reload))


def test_the_gpu_lora_script_dry_runs_on_cpu_at_a_small_shape(tmp_path):
    """bench/gpu_lora.py, the script a GPU machine runs with torch, transformers and peft only:
    both ways at a small Gemma-2 shape on CPU, one timed step each."""
    from bench.gpu_lora import main

    record = main(["--shape", "small", "--device", "cpu", "--pairs", "2", "--tokens", "32", "--steps", "1",
                   "--out", str(tmp_path / "gpu.json")])
    assert json.loads((tmp_path / "gpu.json").read_text()) == record
    lora, full = record["ways"]["lora"], record["ways"]["full"]
    assert lora["fits"] and full["fits"]
    # The adapter alone trains (rank 128 on the seven projections of a small model is not small).
    assert 0 < lora["trainable_parameters"] < lora["parameters"] and full["trainable_parameters"] == full["parameters"]
    assert all(np.isfinite(way["final_loss"]) and way["tokens_per_s"] > 0 for way in (lora, full))
