"""Training benchmark: SPPO step throughput (response tokens/s) and peak worker memory.

Three runs of one epoch on the same model, pairs and batch, each 2 Ray Train workers under
DeepSpeed ZeRO-3 (gloo, fp32 on CPU), RMSprop, loss `sppo_hard` (the one TRL also has), then
ours and the online reference again at `more_epochs` epochs:

- ours: `sppo.training.train_policy` as the pipeline runs it; reference log-probs are
  computed once, before the first step, from the policy itself. Its time counts that pass
  plus the optimizer steps.
- ours with the sampler's log-probs (`train.reference_logps: sampler`): the same, on rows that
  carry each response's token ids and log pi_t of each token, as the sampling stage writes them
  in that mode; no reference pass runs. The log-probs are computed for the benchmark by a float32
  forward pass outside any timing (vLLM reports the same values while it samples, to 1e-5 a
  token: tests/test_sampling.py); what asking vLLM for them costs is measured in bench/sample.py.
- online reference (the reference pipeline's way): the same `train_policy` with
  `train.reference_logps: online`, a second, frozen ZeRO-3 copy of pi_t whose log-probs are
  recomputed at every step (`sppo.training_recipe`).
- TRL: `trl.DPOTrainer(loss_type="sppo_hard")` with its defaults otherwise (a reference model
  prepared under the same ZeRO-3 config, log-probs recomputed every step), timed from
  on_train_begin to on_train_end.

Model loading, Ray worker start and the final checkpoint are left out of the throughput (the
checkpoint save is reported for ours and the online baseline). At full size a discarded run of
ours goes first, so that no measured side is the first run after Ray starts. Peak memory is the
largest resident set of any training worker process, sampled by the driver every 50 ms. Last,
the response log-probs alone, from bf16 logits the size of a batch at a large vocabulary, the
plain way (a float32 copy and log_softmax, as TRL and the reference do) and ours: time and peak
memory, each in a process of its own. How close each comes to what the hardware allows: the
FLOPs training needs (one reference forward and, each epoch, the policy's forward and backward
over every trained sequence, counted by FlopCounterMode, the same for all three) per second, as
a fraction of square fp32 matmuls measured in the same run on each worker's thread count, times
the workers.

    python -m bench.train [--size full|smoke]
"""

from __future__ import annotations

import importlib.util
import tempfile
import os
import time
from pathlib import Path

import numpy as np

from bench.common import (ProcessPeaks, Timer, check_size, cli, counted_flops, dense_matmul_flops, envelope,
                          meta_model, print_table)

SETTINGS = {
    # A ~4M-parameter Llama on the tiny tokenizer: big enough that compute, not per-call
    # overhead, dominates a step on CPU, small enough for a few minutes on 2 cores.
    # more_epochs: ours and the online reference again at that many epochs, where the online way
    # recomputes the reference in every epoch and ours still computes it once.
    # max_prompt_length fits every prompt (up to ~120 tokens), as in the pipeline, whose sampling
    # stage skips longer prompts: the sampler's log-probs are conditioned on the whole prompt.
    # warm_up: one discarded run of ours before the measured ones. Ours runs first, and the first
    # run after Ray starts was at times the slowest (14.3 s against 11.3-12.0 s for the same steps).
    "full": {"hidden": 256, "layers": 4, "pairs": 64, "prompt_words": 40, "response_words": 60,
             "per_device_batch_size": 4, "num_workers": 2, "max_length": 256, "max_prompt_length": 128,
             "more_epochs": 2, "logits": (16, 512, 32768), "warm_up": True},
    "smoke": {"hidden": 64, "layers": 2, "pairs": 4, "prompt_words": 8, "response_words": 8,
              "per_device_batch_size": 1, "num_workers": 2, "max_length": 64, "max_prompt_length": 32,
              "more_epochs": 2, "logits": (2, 16, 4096), "warm_up": False},
}
LOSS = "sppo_hard"
# logits: (sequences, tokens, vocabulary) of the bf16 logits whose response log-probs are taken
# both ways below; the full size is a batch of 8 pairs at half the shipped max_length, with an
# eighth of Gemma-2's vocabulary, to stay well inside this machine's memory.


def plain_sequence_logps(logits, labels, mask):
    """The textbook computation the reference's trainers use: log_softmax over a float32 copy of
    the logits, then gather. `sppo.losses.sequence_logps` must equal it."""
    token = logits[:, :-1].float().log_softmax(-1).gather(-1, labels[:, 1:, None].clamp(min=0)).squeeze(-1)
    return (token * mask[:, 1:]).sum(-1)


def _logps_pass(way: str, shape: tuple[int, int, int]) -> dict:
    """In a fresh process: forward and backward of the response log-probs from random bf16
    logits, the plain way or ours, twice; the second pass's seconds (the first also pays for
    fresh pages) and the peak resident memory above the logits."""
    import resource

    import torch

    from sppo.losses import sequence_logps

    torch.set_num_threads(1)
    torch.manual_seed(0)
    sequences, tokens, vocab = shape
    logits = torch.randn(shape, dtype=torch.bfloat16).requires_grad_()
    labels, mask = torch.randint(0, vocab, (sequences, tokens)), torch.ones(sequences, tokens, dtype=torch.bool)
    compute = sequence_logps if way == "ours" else plain_sequence_logps
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(2):
        logits.grad = None
        with Timer() as timer:
            compute(logits, labels, mask).sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": timer.seconds, "peak_above_logits_mib": (peak - before) / 1024,
            "logits_mib": logits.numel() * logits.element_size() / 2**20}


def logits_memory(shape: tuple[int, int, int]) -> dict:
    """`_logps_pass` both ways, each in a spawned process of its own (peak RSS only grows)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    out = {}
    for way in ("plain", "ours"):
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            out[way] = pool.submit(_logps_pass, way, shape).result()
    return out


def build_policy(out_dir: Path, hidden: int, layers: int) -> tuple[str, int]:
    """A randomly initialised Llama with the tiny policy's tokenizer and chat template; its
    directory and parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sppo.tiny import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("tiny:policy"))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 16 * 16,
        num_hidden_layers=layers, num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32,
        head_dim=32, max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir), sum(p.numel() for p in model.parameters())


def synthetic_pairs(count: int, prompt_words: int, response_words: int, seed: int) -> list[dict]:
    """SPPO training rows of English words from the bundled prompts, lengths +- 25%."""
    from sppo.tiny.policy import bundled_prompts

    rng = np.random.default_rng(seed)
    words = " ".join(bundled_prompts()).split()

    def text(mean: int) -> str:
        return " ".join(rng.choice(words, size=int(rng.integers(int(mean * 0.75), int(mean * 1.25) + 1))))

    rows = []
    for _ in range(count):
        win, lose = sorted(rng.uniform(size=2), reverse=True)
        rows.append({"prompt": text(prompt_words), "chosen": text(response_words), "rejected": text(response_words),
                     "chosen_probs": float(rng.uniform(0.5, 1.0)), "chosen_probs_win": float(win),
                     "chosen_probs_lose": float(lose)})
    return rows


def with_sampler_logps(policy_dir: str, rows: list[dict]) -> list[dict]:
    """The rows as reference_logps 'sampler' reads them: each response's token ids as
    encode_pairs tokenizes it (EOS ended) and log pi_t of each token, from a float32 forward pass."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sppo.chat import render_prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    out = []
    for row, prompt in zip(rows, render_prompt_ids(tokenizer, [r["prompt"] for r in rows])):
        row = dict(row)
        for side in ("chosen", "rejected"):
            ids = tokenizer(row[side], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            with torch.no_grad():
                logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1]
            row[f"{side}_token_ids"] = ids
            token_logps = logits.log_softmax(-1).gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
            row[f"{side}_token_logps"] = token_logps.tolist()
        out.append(row)
    return out


def trained_sequences(policy_dir: str, rows: list[dict], cfg) -> list:
    """The chosen and rejected sequences one epoch trains on, as ours encodes them."""
    from transformers import AutoTokenizer

    from sppo.training_data import encode_pairs, steps_per_epoch

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    pairs = encode_pairs(tokenizer, rows, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    trained = steps_per_epoch(len(rows), cfg) * cfg.global_batch_size
    return [s for p in pairs[:trained] for s in (p.chosen, p.rejected)]


def training_flops(policy_dir: str, sequences: list, epochs: int, reference_pass: bool = True) -> int:
    """The FLOPs SPPO training needs, whichever trainer runs it: one reference forward over
    every trained sequence, unpadded (none when the sampler supplied the reference), and the
    policy's forward and backward over it each epoch. Counted by FlopCounterMode (matmuls and
    attention) on the model built on the meta device."""
    from collections import Counter

    import torch

    model = meta_model(policy_dir)

    def pass_flops(length: int, backward: bool) -> int:
        ids = torch.zeros(1, length, dtype=torch.long, device="meta")
        if backward:
            return counted_flops(lambda: model(input_ids=ids).logits.sum().backward())
        with torch.no_grad():
            return counted_flops(lambda: model(input_ids=ids))

    return sum(count * (reference_pass * pass_flops(length, False) + epochs * pass_flops(length, True))
               for length, count in Counter(len(s.input_ids) for s in sequences).items())


def _trainer(loop, config: dict, cfg, storage: str, name: str):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        loop, train_loop_config=config, torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(storage_path=storage, name=name),
    )


def _trl_loop(config: dict) -> dict:
    """TRL's DPOTrainer with loss_type="sppo_hard" on the same rows, ZeRO-3 config and batch."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from sppo.config import TrainConfig
    from sppo.training_recipe import deepspeed_config, init_deepspeed

    cfg = TrainConfig.model_validate(config["cfg"])
    policy_dir = config["policy_dir"]
    # Before anything reads the ZeRO config: DeepSpeed takes the world size from its own comm layer.
    init_deepspeed("gloo")

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.seconds = time.perf_counter() - self.started

    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in config["rows"]]
    args = DPOConfig(
        output_dir=config["output_dir"], per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        lr_scheduler_type="linear", warmup_steps=cfg.warmup_ratio, optim="rmsprop", max_grad_norm=cfg.max_grad_norm,
        num_train_epochs=cfg.epochs, beta=cfg.beta, loss_type=["sppo_hard"], max_length=cfg.max_length,
        deepspeed=deepspeed_config(cfg), use_cpu=True, bf16=cfg.bf16, report_to=[], save_strategy="no", logging_steps=1,
        seed=cfg.seed, dataloader_drop_last=True, disable_tqdm=True,
    )
    clock = StepClock()
    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(policy_dir), callbacks=[clock])
    trainer.train()
    return {"train_steps": clock.seconds, "steps": trainer.state.global_step}


def run(size: str = "full", seed: int = 0) -> dict:
    import pandas as pd
    import ray
    import torch

    from sppo.config import TrainConfig
    from sppo.policy import Policy
    from sppo.roles import training_role
    from sppo.training import train_policy

    setting = SETTINGS[check_size(size)]
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", num_cpus=setting["num_workers"], include_dashboard=False, log_to_driver=False)
    cfg = TrainConfig(loss=LOSS, eta=20, learning_rate=1e-4, per_device_batch_size=setting["per_device_batch_size"],
                      num_workers=setting["num_workers"], max_length=setting["max_length"],
                      max_prompt_length=setting["max_prompt_length"], seed=seed)
    rows = synthetic_pairs(setting["pairs"], setting["prompt_words"], setting["response_words"], seed)
    # What the hardware allows: each worker's dense matmul FLOP/s on its own threads, times the workers.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    peak = dense_matmul_flops() * cfg.num_workers
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="sppo-bench-train-") as tmp:
            work = Path(tmp)
            policy_dir, parameters = build_policy(work / "policy", setting["hidden"], setting["layers"])
            sequences = trained_sequences(policy_dir, rows, cfg)
            tokens = sum(len(s.input_ids) - s.prompt_length for s in sequences)  # EOS included, one epoch
            pairs_path, sampled_pairs_path = work / "pairs.parquet", work / "sampled-pairs.parquet"
            pd.DataFrame(rows).to_parquet(pairs_path)
            pd.DataFrame(with_sampler_logps(policy_dir, rows)).to_parquet(sampled_pairs_path)
            base = {"rows": rows, "policy_dir": policy_dir}

            def ours(run_cfg: TrainConfig, name: str) -> dict:
                path = sampled_pairs_path if run_cfg.reference_logps == "sampler" else pairs_path
                with ProcessPeaks(os.getpid(), [os.getpid()], interval_s=0.05) as memory, Timer() as wall:
                    result = train_policy(str(path), Policy(policy_dir), str(work / f"{name}-ckpt"), run_cfg,
                                          storage_dir=str(work / "ray"), role=training_role(run_cfg, timeout_s=1800))
                timings = result.timings
                return {"seconds": timings["reference_logps"] + timings["train_steps"], **timings,
                        "epochs": run_cfg.epochs, "steps": result.num_steps,
                        "peak_worker_rss_mib": memory.peak("RayTrainWorker"), "wall_s": wall.seconds}

            def baseline(loop, run_cfg: TrainConfig, name: str, **extra) -> dict:
                with ProcessPeaks(os.getpid(), [os.getpid()], interval_s=0.05) as memory, Timer() as wall:
                    out = _trainer(loop, {**base, "cfg": run_cfg.model_dump(), **extra}, run_cfg, str(work / "ray"),
                                   name).fit().return_value
                return {"seconds": out["train_steps"], **out, "epochs": run_cfg.epochs,
                        "peak_worker_rss_mib": memory.peak("RayTrainWorker"), "wall_s": wall.seconds}

            warm_up = ours(cfg, "warm-up") if setting["warm_up"] else None
            runs = {"ours": ours(cfg, "ours"),
                    "ours_sampler_reference": ours(cfg.model_copy(update={"reference_logps": "sampler"}),
                                                   "ours-sampler-reference"),
                    "online_reference": ours(cfg.model_copy(update={"reference_logps": "online"}),
                                             "online-reference")}
            try:  # a TRL release that breaks must not cost the other measurements
                if importlib.util.find_spec("trl") is None:
                    raise ModuleNotFoundError("trl is not installed (`make bench` installs it)")
                runs["trl"] = baseline(_trl_loop, cfg, "trl-dpo", output_dir=str(work / "trl"))
            except Exception as err:
                trl_error = f"{type(err).__name__}: {err}"
            if epochs := setting["more_epochs"]:
                more = cfg.model_copy(update={"epochs": epochs})
                runs[f"ours_{epochs}_epochs"] = ours(more, f"ours-{epochs}-epochs")
                runs[f"online_reference_{epochs}_epochs"] = ours(more.model_copy(update={"reference_logps": "online"}),
                                                                 f"online-reference-{epochs}-epochs")
            for name, r in runs.items():
                r["flops"] = training_flops(policy_dir, sequences, r["epochs"], name != "ours_sampler_reference")
    finally:
        if started_ray:
            ray.shutdown()
    for r in runs.values():
        r["response_tokens_per_s"] = tokens * r["epochs"] / r["seconds"]
        r["flops_per_s"] = r["flops"] / r["seconds"]
        r["fraction_of_matmul_peak"] = r["flops_per_s"] / peak
    def ratio(ours: str, theirs: str) -> float:
        return runs[ours]["response_tokens_per_s"] / runs[theirs]["response_tokens_per_s"]

    results = {
        "runs": runs,
        "warm_up": warm_up,  # discarded; kept to show what the first run costs
        "response_tokens": tokens,
        "matmul_flops_per_s": peak,
        "ratio_vs_online_ref": ratio("ours", "online_reference"),
        "peak_memory_ratio_vs_online_ref": runs["ours"]["peak_worker_rss_mib"]
        / runs["online_reference"]["peak_worker_rss_mib"],
        "ratio_vs_online_ref_sampler_reference": ratio("ours_sampler_reference", "online_reference"),
    }
    if "trl" in runs:
        results["ratio_vs_trl"] = ratio("ours", "trl")
        results["ratio_vs_trl_sampler_reference"] = ratio("ours_sampler_reference", "trl")
    else:
        results["trl_error"] = trl_error
    if epochs := setting["more_epochs"]:
        results[f"ratio_vs_online_ref_{epochs}_epochs"] = ratio(f"ours_{epochs}_epochs",
                                                                f"online_reference_{epochs}_epochs")
    results["logits_memory"] = logits_memory(setting["logits"])
    inputs = {
        **setting, "loss": LOSS, "pairs_trained": len(rows) // cfg.global_batch_size * cfg.global_batch_size,
        "global_batch_size": cfg.global_batch_size, "steps": runs["ours"]["steps"], "seed": seed,
        "precision": "fp32 (CPU)", "zero_stage": 3, "backend": "gloo",
        "parameters": parameters, "trl_reference": "online (DPOTrainer default)",
    }
    return envelope("train", size, inputs, results)


def report(record: dict) -> None:
    r, inputs = record["results"], record["inputs"]
    names = {"ours": "ours (precomputed reference)",
             "ours_sampler_reference": "ours (reference log-probs from the sampler)",
             "online_reference": "online reference model (reference's way)",
             "trl": "TRL DPOTrainer sppo_hard"}
    rows = []
    for key, v in r["runs"].items():
        epochs = v["epochs"]
        # More-epoch runs ("ours_2_epochs") are named and compared within their own epoch count.
        label, ours = (names[key], "ours") if epochs == 1 else (f"{names[key.rsplit('_', 2)[0]]}, {epochs} epochs",
                                                                 f"ours_{epochs}_epochs")
        rows.append([label, v["seconds"], v["response_tokens_per_s"], v["fraction_of_matmul_peak"],
                     v["peak_worker_rss_mib"], v.get("checkpoint_save", "-"),
                     r["runs"][ours]["response_tokens_per_s"] / v["response_tokens_per_s"]])
    print_table(
        f"training: {inputs['parameters'] / 1e6:.1f}M-parameter Llama, {inputs['pairs_trained']} pairs, "
        f"{inputs['steps']} steps of {inputs['global_batch_size']} an epoch on {inputs['num_workers']} ZeRO-3 workers, "
        f"{r['response_tokens']} response tokens and {r['runs']['ours']['flops'] / 1e9:.3g} GFLOP an epoch; "
        f"dense matmul {r['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s over the workers",
        ["trainer", "seconds", "tokens/s", "of matmul FLOP/s", "peak worker RSS MiB", "checkpoint s", "ours x"], rows,
    )
    sequences, tokens, vocab = inputs["logits"]
    memory = r["logits_memory"]
    print_table(
        f"response log-probs from {sequences} x {tokens} x {vocab} bf16 logits "
        f"({memory['ours']['logits_mib']:.3g} MiB), forward and backward, one thread",
        ["way", "seconds", "peak MiB above the logits"],
        [["plain: log_softmax of a float32 copy", memory["plain"]["seconds"], memory["plain"]["peak_above_logits_mib"]],
         ["ours: sppo.losses.sequence_logps", memory["ours"]["seconds"], memory["ours"]["peak_above_logits_mib"]]],
    )
    for key in sorted(k for k in r if k.startswith(("ratio_vs_online_ref_", "ratio_vs_trl_"))):
        print(f"{key}={r[key]:.3f}")
    print(f"ratio_vs_trl={r['ratio_vs_trl']:.3f}" if "ratio_vs_trl" in r else f"TRL baseline failed: {r['trl_error']}")
    print(f"ratio={r['ratio_vs_online_ref']:.3f}")


if __name__ == "__main__":
    cli(__doc__, run, report)
