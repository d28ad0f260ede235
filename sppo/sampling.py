"""Sampling stage: K candidate responses per prompt from the current policy pi_t.

Pure core (`shard`, `sampling_params_kwargs`, `engine_kwargs`, `engine_env`, `Samples`):
no Ray, no vLLM. `VLLMEngine` wraps one vLLM `LLM` and is made a Ray actor by
`sample_candidates`, the Ray shell, which shards the prompts over `cfg.num_engines` engines
and always kills them afterwards so their CPUs/GPUs are free for the judge and trainer.

Prompts reach vLLM as token ids rendered by `sppo.chat.render_prompt_ids` (the template
carries the single BOS), so sampling and training see the same prompt tokens.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from sppo.chat import render_prompt_ids
from sppo.config import SamplingConfig
from sppo.storage import local_model

logger = logging.getLogger("sppo.sampling")

T = TypeVar("T")

# vLLM treats temperature below this as greedy decoding, which allows only n=1.
_GREEDY_BELOW = 1e-5
# vLLM's own default (5 s) kills the engine core before the core's workers have exited
# (they get 5 s to exit, then SIGTERM), and killed workers leave their shared memory behind.
_ENGINE_SHUTDOWN_S = 30.0
# How long idle engines get to close before their actors are killed anyway.
_CLOSE_GRACE_S = 2 * _ENGINE_SHUTDOWN_S
# Set on the driver, these must reach the engines too: a Ray Job's actors inherit the
# cluster's environment, not the driver's.
_FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME")


@dataclass(frozen=True)
class Samples:
    """K candidates per prompt, aligned with the input prompts.

    candidates[i][j]: completion j of prompt i, decoded without special tokens.
    prompt_token_ids[i]: the token ids the engine sampled prompt i from, as vLLM reports them.
    num_generated_tokens: completion tokens summed over all prompts and candidates.
    token_ids[i][j], token_logps[i][j]: with `token_logps` asked for, candidate j's sampled token
    ids (its EOS included when it stopped on one) and log pi_t of each, from the raw logits
    (before temperature and top-p); else both are empty.
    """

    candidates: list[list[str]]
    prompt_token_ids: list[list[int]]
    num_generated_tokens: int
    # Seconds the slowest engine took to load its model and start (they start in parallel).
    engine_start_s: float = 0.0
    token_ids: list[list[list[int]]] = field(default_factory=list)
    token_logps: list[list[list[float]]] = field(default_factory=list)

    @classmethod
    def concat(cls, parts: Sequence[Samples]) -> Samples:
        """Join per-shard results in shard order."""
        return cls(
            candidates=[c for part in parts for c in part.candidates],
            prompt_token_ids=[ids for part in parts for ids in part.prompt_token_ids],
            num_generated_tokens=sum(part.num_generated_tokens for part in parts),
            engine_start_s=max((part.engine_start_s for part in parts), default=0.0),
            token_ids=[ids for part in parts for ids in part.token_ids],
            token_logps=[logps for part in parts for logps in part.token_logps],
        )


def shard(items: Sequence[T], n: int) -> list[list[T]]:
    """Cut `items` into `n` contiguous parts, in order, sizes differing by at most one.

    The first `len(items) % n` parts get the extra item; parts are empty when n > len(items).
    """
    if n < 1:
        raise ValueError(f"number of shards must be >= 1, got {n}")
    size, extra = divmod(len(items), n)
    parts, start = [], 0
    for i in range(n):
        stop = start + size + (1 if i < extra else 0)
        parts.append(list(items[start:stop]))
        start = stop
    return parts


def sampling_params_kwargs(cfg: SamplingConfig, token_logps: bool = False) -> dict:
    """Arguments of vLLM's `SamplingParams`: one request per prompt draws all K candidates.

    No per-request seed: vLLM's CPU backend rejects it; the engine is seeded instead. With
    token_logps, logprobs=0: each sampled token's log-prob alone (vLLM's default logprobs_mode,
    raw_logprobs, takes them from the model's logits before temperature and top-p); and
    detokenize=False, since vLLM would also decode the token of every log-prob (the texts are
    decoded from the token ids once instead: 23% of sampling throughput lost, not 12%, measured
    on the tiny policy on CPU).
    """
    if cfg.temperature < _GREEDY_BELOW:
        raise ValueError(
            f"sampling.temperature must be >= {_GREEDY_BELOW} to draw k={cfg.k} distinct "
            f"candidates, got {cfg.temperature} (vLLM decodes greedily below it, n=1 only)"
        )
    kwargs = {"n": cfg.k, "temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens}
    return {**kwargs, "logprobs": 0, "detokenize": False} if token_logps else kwargs


def engine_kwargs(model_dir: str, cfg: SamplingConfig, seed: int, trust_remote_code: bool = False) -> dict:
    """Arguments of vLLM's `LLM` for a policy checkpoint (tokenizer from the same directory)."""
    kwargs = {
        "model": model_dir,
        "tokenizer": model_dir,
        "trust_remote_code": trust_remote_code,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "dtype": cfg.dtype,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "seed": seed,
    }
    if cfg.max_model_len is not None:  # else vLLM takes the model's own limit
        kwargs["max_model_len"] = cfg.max_model_len
    if cfg.max_num_seqs is not None:  # else vLLM's default for the hardware
        kwargs["max_num_seqs"] = cfg.max_num_seqs
    return kwargs


def engine_env(cfg: SamplingConfig) -> dict[str, str]:
    """Environment of an engine actor. VLLM_CPU_KVCACHE_SPACE (GiB) bounds the KV cache on
    CPU and is ignored on GPUs.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 runs the engine core in the actor's own process. It then
    takes every request of a `generate` call before its first step, so a seeded engine draws
    the same candidates every time: a re-sampled stage (after a crash) equals the first
    attempt. A core in its own process starts on whichever requests have arrived, and the
    same seed gave different candidates (measured on vllm-cpu 0.32.0)."""
    env = {"VLLM_CPU_KVCACHE_SPACE": str(cfg.cpu_kvcache_gib), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env.update({name: os.environ[name] for name in _FORWARDED_ENV if name in os.environ})
    return env


class VLLMEngine:
    """One vLLM engine over a policy checkpoint; a Ray actor when wrapped with `ray.remote`."""

    def __init__(self, model_dir: str, cfg: SamplingConfig, seed: int, trust_remote_code: bool = False,
                 token_logps: bool = False):
        from transformers import AutoTokenizer
        from vllm import LLM, SamplingParams

        model_dir = local_model(model_dir)  # a storage URI is fetched to this node first
        self._params = SamplingParams(**sampling_params_kwargs(cfg, token_logps))
        # The same tokenizer class the trainer loads, so prompt ids match token for token.
        self._tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        started = time.monotonic()
        self._llm = LLM(**engine_kwargs(model_dir, cfg, seed, trust_remote_code))
        self._start_s = time.monotonic() - started

    def generate(self, prompts: list[str]) -> Samples:
        """K completions per prompt, in input order, from one n=K request per prompt."""
        from vllm import TokensPrompt

        prompt_ids = render_prompt_ids(self._tokenizer, prompts)
        requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
        # vLLM's own progress line (done/total prompts, rate, ETA) goes to the job log.
        outputs = self._llm.generate(requests, self._params, use_tqdm=True)  # in request order
        completions = [sorted(out.outputs, key=lambda c: c.index) for out in outputs]
        with_logps = self._params.logprobs is not None
        if self._params.detokenize:
            texts = [[c.text for c in cands] for cands in completions]
        else:
            flat = self._tokenizer.batch_decode([c.token_ids for cands in completions for c in cands],
                                                skip_special_tokens=True)
            texts = [flat[i * self._params.n : (i + 1) * self._params.n] for i in range(len(completions))]
        return Samples(
            candidates=texts,
            prompt_token_ids=[list(out.prompt_token_ids) for out in outputs],
            num_generated_tokens=sum(len(c.token_ids) for cands in completions for c in cands),
            engine_start_s=self._start_s,
            token_ids=[[list(c.token_ids) for c in cands] for cands in completions] if with_logps else [],
            # logprobs=0: each position's dict holds the sampled token alone.
            token_logps=[[[step[t].logprob for t, step in zip(c.token_ids, c.logprobs)] for c in cands]
                         for cands in completions] if with_logps else [],
        )

    def close(self) -> None:
        """Stop the vLLM engine core. Killed without this, its processes leave their
        shared-memory queues (RAM-backed files of up to ~250 MB each) in /dev/shm."""
        self._llm.llm_engine.engine_core.shutdown(timeout=_ENGINE_SHUTDOWN_S)


def sample_candidates(
    model_dir: str,
    prompts: list[str],
    cfg: SamplingConfig,
    seed: int,
    timeout_s: float | None = None,
    trust_remote_code: bool = False,
    token_logps: bool = False,
) -> Samples:
    """Sample cfg.k candidates per prompt with cfg.num_engines vLLM engine actors.

    Engine i is seeded with seed + i and gets the i-th contiguous shard of the prompts. With
    token_logps the samples also carry each candidate's token ids and their log-probs.
    `timeout_s` bounds the whole stage, engine start included. On return and on error the
    engines are shut down and their actors killed, releasing their CPUs/GPUs.
    """
    import ray

    if not prompts:
        return Samples(candidates=[], prompt_token_ids=[], num_generated_tokens=0)
    sampling_params_kwargs(cfg)  # fail on the driver, before any engine starts
    shards = [part for part in shard(prompts, cfg.num_engines) if part]
    engine_cls = ray.remote(
        num_cpus=cfg.cpus_per_engine,
        num_gpus=cfg.gpus_per_engine,
        runtime_env={"env_vars": engine_env(cfg)},
        # A crashed engine is restarted (same seed) and its in-flight shard retried on it.
        max_restarts=cfg.max_restarts,
        max_task_retries=cfg.max_restarts,
    )(VLLMEngine)

    started = time.monotonic()
    engines = []
    idle: set[int] = set()  # engines not busy with a request, safe to close
    try:
        engines = [engine_cls.remote(model_dir, cfg, seed + i, trust_remote_code, token_logps)
                   for i in range(len(shards))]
        logger.info(
            "sampling: started %d vLLM engine(s) on %s (seeds %d..%d) for %d prompts x k=%d",
            len(engines), model_dir, seed, seed + len(engines) - 1, len(prompts), cfg.k,
        )
        pending = {engine.generate.remote(part): i for i, (engine, part) in enumerate(zip(engines, shards))}
        results: list[Samples | None] = [None] * len(shards)
        while pending:
            left = None if timeout_s is None else max(0.0, timeout_s - (time.monotonic() - started))
            done, _ = ray.wait(list(pending), num_returns=1, timeout=left)
            if not done:
                raise TimeoutError(
                    f"sampling: {len(pending)} of {len(shards)} vLLM engine(s) did not finish "
                    f"within timeout_s={timeout_s} (engines {sorted(pending.values())}, "
                    f"model {model_dir})"
                )
            i = pending.pop(done[0])
            idle.add(i)
            try:
                results[i] = ray.get(done[0])
            except ray.exceptions.RayError as err:
                raise RuntimeError(
                    f"sampling: vLLM engine {i} (seed {seed + i}, {len(shards[i])} prompts, "
                    f"model {model_dir}) failed: {err}"
                ) from err
            logger.info(
                "sampling: shard %d/%d done: %d prompts, %d candidates, %d tokens, %.1fs",
                i + 1, len(shards), len(shards[i]), sum(map(len, results[i].candidates)),
                results[i].num_generated_tokens, time.monotonic() - started,
            )
        return Samples.concat(results)
    finally:
        _stop_engines(engines, [engines[i] for i in idle])


def _stop_engines(engines: list, idle: list) -> None:
    """Close idle engines' vLLM cores cleanly, then kill every engine actor. A busy engine
    (timeout, driver interrupted) would only answer after its request, so it is killed as is."""
    import ray

    if idle:
        closing = [engine.close.remote() for engine in idle]
        ray.wait(closing, num_returns=len(closing), timeout=_CLOSE_GRACE_S)
    for engine in engines:
        ray.kill(engine)
    logger.info("sampling: stopped %d vLLM engine(s)", len(engines))
