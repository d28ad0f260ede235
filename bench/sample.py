"""Sampling benchmark: our sampler vs K sequential n=1 passes and vs the bare vLLM engine.

- ours: `sppo.sampling.VLLMEngine` as a Ray actor, with the options `sample_candidates` gives
  it, called as `sample_candidates` calls it: one n=K request per prompt, prompts rendered
  through the chat template, texts and token counts sent back through Ray.
- sequential: the reference pipeline's way, on the same actor and engine: K passes over the
  prompts, each an n=1 request per prompt.
- bare: a vLLM `LLM` in this process, same model, engine arguments, torch thread count, KV
  cache and CPU priority (this process takes the actor's niceness and thread count), given
  the already-rendered token ids and the n=K sampling parameters: no Ray, no wrapper.
- ours at vLLM's default max_num_seqs: a second actor, as ours but with `sampling.max_num_seqs`
  null, so vLLM picks (256 on a CPU): what our default of 1024 gains, in the same run.
- ours with token log-probs: ours on the same actor, asking vLLM for each sampled token's
  log-prob and sending the token ids and log-probs back, as `train.reference_logps: sampler`
  does: what taking the reference from the sampler costs sampling.

Each engine starts once (its start-up time is reported, not counted); the five are then
called in turn, `rounds` times, after one warm-up call each, and each side's median is kept.
Throughput is generated tokens per second. How close it comes to what the hardware allows:
those tokens' FLOPs per second (2 per weight per generated token, a lower bound that leaves out
attention and prefill) as a fraction of square fp32 matmuls measured in the same run on the
engine's thread count.

    python -m bench.sample [--size full|smoke]
"""

from __future__ import annotations

import os
import statistics

from bench.common import Timer, check_size, cli, counted_flops, dense_matmul_flops, envelope, meta_model, print_table

SETTINGS = {
    "full": {"prompts": 64, "k": 5, "max_tokens": 64, "rounds": 5},
    "smoke": {"prompts": 4, "k": 2, "max_tokens": 8, "rounds": 1},
}
SEED = 0


def with_sequential_passes(base):
    """Our engine actor class, plus the reference's K sequential n=1 passes on the same engine."""

    class Engine(base):
        def generate_sequential(self, prompts: list[str], params_kwargs: dict, k: int) -> int:
            """K passes of one n=1 request per prompt; generated tokens."""
            from vllm import SamplingParams, TokensPrompt

            from sppo.chat import render_prompt_ids

            params = SamplingParams(**{**params_kwargs, "n": 1})
            requests = [TokensPrompt(prompt_token_ids=ids) for ids in render_prompt_ids(self.tokenizer, prompts)]
            tokens = 0
            for _ in range(k):
                outputs = self.llm.generate(requests, params, use_tqdm=False)
                tokens += sum(len(c.token_ids) for out in outputs for c in out.outputs)
            return tokens

        def threads(self) -> dict:
            import torch

            return {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads(),
                    "niceness": os.nice(0)}

        def max_num_seqs(self) -> int:
            return engine_max_num_seqs(self.llm)

    return Engine


def engine_max_num_seqs(llm) -> int:
    """Sequences a vLLM `LLM` decodes at once, as vLLM took it from our options."""
    return llm.llm_engine.vllm_config.scheduler_config.max_num_seqs


def flops_per_generated_token(model_dir: str) -> int:
    """A one-token forward pass with no context, counted on the model built on the meta
    device: 2 FLOPs per weight in a matmul, the LM head included."""
    import torch

    model = meta_model(model_dir)
    with torch.no_grad():
        return counted_flops(lambda: model(input_ids=torch.zeros(1, 1, dtype=torch.long, device="meta")))


def run(size: str = "full") -> dict:
    import ray
    from transformers import AutoTokenizer

    from sppo.chat import render_prompt_ids
    from sppo.config import SamplingConfig
    from sppo.policy import Policy
    from sppo.sampling import VLLMEngine, engine_env, engine_kwargs, sampling_params_kwargs
    from sppo.tiny import resolve_model
    from sppo.tiny.policy import bundled_prompts

    setting = SETTINGS[check_size(size)]
    k = setting["k"]
    cfg = SamplingConfig(k=k, temperature=0.7, top_p=0.9, max_tokens=setting["max_tokens"], num_engines=1,
                         cpus_per_engine=1, max_model_len=512, cpu_kvcache_gib=1)
    model_dir = resolve_model("tiny:policy")
    policy = Policy(model_dir)
    prompts = bundled_prompts()[: setting["prompts"]]
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    engine, default_engine, bare = None, None, None
    try:
        # The options sample_candidates gives its engine actors.
        actor_cls = ray.remote(num_cpus=cfg.cpus_per_engine, num_gpus=cfg.gpus_per_engine,
                               runtime_env={"env_vars": engine_env(cfg)})(with_sequential_passes(VLLMEngine))
        with Timer() as actor_start:
            engine = actor_cls.remote(policy, cfg)
            threads = ray.get(engine.threads.remote())
        # Started and waited for here, so that nothing else runs while the matmul peak is measured.
        default_engine = actor_cls.remote(policy, cfg.model_copy(update={"max_num_seqs": None}))
        vllm_default_seqs = ray.get(default_engine.max_num_seqs.remote())
        # The bare engine gets the actor's environment: thread count, KV cache size, and CPU
        # priority: Ray starts its workers at niceness 15, which on a shared machine alone makes
        # them several times slower than a process at the default 0.
        for name, value in {**engine_env(cfg), "OMP_NUM_THREADS": threads["OMP_NUM_THREADS"]}.items():
            if value is not None:
                os.environ[name] = value
        os.nice(max(0, threads["niceness"] - os.nice(0)))
        # torch is imported by now, so OMP_NUM_THREADS no longer sizes its pool: without this
        # the bare engine used every core when run alone, and one thread after the judge
        # benchmark (which sets one), and its throughput moved 1.5x between runs.
        import torch

        torch.set_num_threads(threads["torch_threads"])
        peak = dense_matmul_flops()  # on the engine's threads, at its niceness
        from vllm import LLM, SamplingParams, TokensPrompt

        with Timer() as bare_start:
            bare = LLM(**engine_kwargs(model_dir, cfg, SEED))
        bare_threads = {"torch_threads": torch.get_num_threads(), "niceness": os.nice(0)}
        max_num_seqs = {"actor": ray.get(engine.max_num_seqs.remote()),
                        "bare": engine_max_num_seqs(bare),
                        "vllm_default": vllm_default_seqs}
        if bare_threads != {key: threads[key] for key in bare_threads}:
            raise RuntimeError(f"bare engine runs with {bare_threads}, the actor with {threads}: not comparable")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        requests = [TokensPrompt(prompt_token_ids=ids) for ids in render_prompt_ids(tokenizer, prompts)]
        params = SamplingParams(**sampling_params_kwargs(cfg))

        def ours() -> int:
            return ray.get(engine.generate.remote(policy, prompts, SEED)).num_generated_tokens

        def sequential() -> int:
            return ray.get(engine.generate_sequential.remote(prompts, sampling_params_kwargs(cfg), k))

        def bare_engine() -> int:
            outputs = bare.generate(requests, params, use_tqdm=False)
            return sum(len(c.token_ids) for out in outputs for c in out.outputs)

        def ours_vllm_default() -> int:
            return ray.get(default_engine.generate.remote(policy, prompts, SEED)).num_generated_tokens

        def ours_token_logps() -> int:  # as train.reference_logps 'sampler' asks
            samples = ray.get(engine.generate.remote(policy, prompts, SEED, token_logps=True))
            assert sum(len(lp) for c in samples.token_logps for lp in c) == samples.num_generated_tokens
            return samples.num_generated_tokens

        sides = {"ours": ours, "sequential": sequential, "bare": bare_engine, "ours_vllm_default": ours_vllm_default,
                 "ours_token_logps": ours_token_logps}
        for call in sides.values():  # warm-up
            call()
        measured = {name: [] for name in sides}
        for _ in range(setting["rounds"]):
            for name, call in sides.items():
                with Timer() as timer:
                    tokens = call()
                measured[name].append({"seconds": timer.seconds, "tokens": tokens})
    finally:
        if bare is not None:
            bare.llm_engine.engine_core.shutdown()
        for actor in (engine, default_engine):
            if actor is not None:
                ray.get(actor.close.remote())
                ray.kill(actor)
        if started_ray:
            ray.shutdown()
    token_flops = flops_per_generated_token(model_dir)
    runs = {}
    for name, samples in measured.items():
        per_s = statistics.median(s["tokens"] / s["seconds"] for s in samples)
        runs[name] = {"tokens_per_s": per_s, "fraction_of_matmul_peak": per_s * token_flops / peak, "rounds": samples}
    results = {
        "runs": runs,
        "flops_per_generated_token": token_flops,
        "matmul_flops_per_s": peak,
        "engine_start_s": {"ray_actor": actor_start.seconds, "bare": bare_start.seconds},
        "ratio_vs_sequential": runs["ours"]["tokens_per_s"] / runs["sequential"]["tokens_per_s"],
        # Fraction of throughput lost to Ray and our wrapper, next to the bare engine.
        "overhead_vs_bare": 1.0 - runs["ours"]["tokens_per_s"] / runs["bare"]["tokens_per_s"],
        "ratio_vs_vllm_default_max_num_seqs": runs["ours"]["tokens_per_s"] / runs["ours_vllm_default"]["tokens_per_s"],
        # Fraction of throughput lost to asking for the sampled tokens' log-probs.
        "logprobs_overhead": 1.0 - runs["ours_token_logps"]["tokens_per_s"] / runs["ours"]["tokens_per_s"],
        "engine_threads": threads,
        "bare_threads": bare_threads,
    }
    inputs = {**setting, "model": "tiny:policy", "model_dir": model_dir, "temperature": cfg.temperature,
              "top_p": cfg.top_p, "cpus_per_engine": cfg.cpus_per_engine, "cpu_kvcache_gib": cfg.cpu_kvcache_gib,
              "max_num_seqs": max_num_seqs, "seed": SEED}
    return envelope("sample", size, inputs, results)


def report(record: dict) -> None:
    r, inputs = record["results"], record["inputs"]
    seqs = inputs["max_num_seqs"]
    names = {"ours": f"ours: Ray actor, one n=K request per prompt, max_num_seqs {seqs['actor']}",
             "sequential": "K sequential n=1 passes (reference)", "bare": "bare vLLM engine, n=K, no Ray",
             "ours_vllm_default": f"ours at vLLM's default max_num_seqs ({seqs['vllm_default']})",
             "ours_token_logps": "ours, with each sampled token's log-prob (reference_logps: sampler)"}
    rows = [[names[name], statistics.median(s["seconds"] for s in run["rounds"]), run["tokens_per_s"],
             run["fraction_of_matmul_peak"], r["runs"]["ours"]["tokens_per_s"] / run["tokens_per_s"]]
            for name, run in r["runs"].items()]
    print_table(
        f"sampling: {inputs['prompts']} prompts x K={inputs['k']} x up to {inputs['max_tokens']} tokens, "
        f"tiny Llama; engine start {r['engine_start_s']['ray_actor']:.1f} s (actor), "
        f"{r['engine_start_s']['bare']:.1f} s (bare), not counted; dense matmul "
        f"{r['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s on the engine's threads",
        ["sampler", "median seconds", "tokens/s", "of matmul FLOP/s", "ours x"], rows,
    )
    print(f"overhead_vs_bare={r['overhead_vs_bare']:.3f}")
    print(f"logprobs_overhead={r['logprobs_overhead']:.3f}")
    print(f"ratio={r['ratio_vs_sequential']:.3f}")


if __name__ == "__main__":
    cli(__doc__, run, report)
