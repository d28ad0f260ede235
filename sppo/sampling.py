"""Sampling stage: K candidate responses per prompt from the current policy pi_t.

Pure core (`shard`, `sampling_params_kwargs`, `engine_kwargs`, `engine_env`, `engine_mode`,
`Samples`): no Ray, no vLLM. `VLLMEngine` wraps one vLLM `LLM`; `EnginePool`, the Ray shell,
holds the sampling role's engines (`sppo.roles`) as Ray actors and shards each call's prompts over them.

How long engines live is `sampling.engine_mode` (see `engine_mode`):
- resident: started once per job; a new policy is loaded into them in place (vLLM's
  `reload_weights`), so sampling and evaluation of every iteration share one start;
- sleep: as resident, but asleep during training (vLLM sleep mode, level 2: weights and KV
  cache leave the GPU) and woken with the next policy's weights; CUDA only;
- restart: started for each sampling call and killed after it (their CPUs/GPUs go back to Ray).

Every call names the policy it samples from and its seed: an engine loads that policy if it
holds another, and re-seeds before generating, so a call draws the same candidates on a fresh
engine, a reused one, or one Ray restarted after a crash (which starts on the pool's first
policy and then loads the call's).

Prompts reach vLLM as token ids rendered by `sppo.chat.render_prompt_ids` (the template
carries the single BOS), so sampling and training see the same prompt tokens.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from sppo.chat import render_prompt_ids
from sppo.config import SamplingConfig
from sppo.models import local_model
from sppo.policy import Policy
from sppo.progress import LoggedProgress
from sppo.roles import Role, sampling_role

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
    # Seconds the slowest engine took to start, and how many started, for this call (0 when
    # every engine was already running); seconds the slowest took to load the call's policy.
    engine_start_s: float = 0.0
    engine_starts: int = 0
    weights_load_s: float = 0.0
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
            engine_starts=sum(part.engine_starts for part in parts),
            weights_load_s=max((part.weights_load_s for part in parts), default=0.0),
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


def engine_kwargs(model_dir: str, cfg: SamplingConfig, seed: int, trust_remote_code: bool = False,
                  sleep_mode: bool = False, max_lora_rank: int | None = None) -> dict:
    """Arguments of vLLM's `LLM` for a policy checkpoint (tokenizer from the same directory).
    max_lora_rank: serve LoRA adapters up to that rank on these weights, one adapter at a time
    (a call samples one policy)."""
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
    if cfg.enforce_eager:
        kwargs["enforce_eager"] = True
    if sleep_mode:
        kwargs["enable_sleep_mode"] = True
    if max_lora_rank is not None:
        kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1)
    return kwargs


def engine_mode(cfg: SamplingConfig) -> str:
    """The engine lifetime a config runs with. `auto` is resident on CPUs, where an idle engine
    costs memory only, and restart on GPUs, where a kept engine's GPUs are not the trainer's
    (sleep mode frees their memory, but Ray still counts them as the engine's: it needs the
    engines and the trainer to fit the GPUs together, see docs/configs.md). Sleep mode is CUDA
    only: CPU engines asked to sleep restart per call instead."""
    if cfg.engine_mode == "auto":
        return "restart" if cfg.gpus_per_engine > 0 else "resident"
    if cfg.engine_mode == "sleep" and cfg.gpus_per_engine == 0:
        return "restart"
    return cfg.engine_mode


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


def import_model_classes_in_process(model_dir: str) -> None:
    """Register the vLLM classes of model_dir's architectures as imported (vLLM's public
    `ModelRegistry.register_model`), for an engine on CPUs. vLLM otherwise inspects a lazily
    registered class in a subprocess that imports torch and vLLM again, to keep CUDA uninitialized
    in the engine's process, and caches what it found under ~/.cache/vllm: on an empty home, most
    of a tiny engine's start (docs/performance.md). On CPUs there is no CUDA to keep. Architectures
    vLLM does not know (remote code) are left to vLLM."""
    from vllm import ModelRegistry

    config = Path(model_dir, "config.json")
    if not config.is_file():  # not a local directory: vLLM resolves it
        return
    for arch in json.loads(config.read_text()).get("architectures") or []:
        if arch in ModelRegistry.models:
            ModelRegistry.register_model(arch, ModelRegistry.models[arch].load_model_cls())


def _seed_worker(worker, seed: int) -> None:
    """Runs on every vLLM worker (`collective_rpc`): the sampler draws from the global RNGs."""
    from vllm.utils.torch_utils import set_random_seed

    set_random_seed(seed)


class VLLMEngine:
    """One vLLM engine; a Ray actor when wrapped with `ray.remote`. Starts on `policy`'s weights
    and samples whichever policy a `generate` call names: other weights are loaded in place, an
    adapter is named in the call's `LoRARequest` (the engine must have max_lora_rank)."""

    def __init__(self, policy: Policy, cfg: SamplingConfig, trust_remote_code: bool = False, sleep_mode: bool = False,
                 max_lora_rank: int | None = None):
        from transformers import AutoTokenizer
        from vllm import LLM

        model_dir = local_model(policy.weights)  # a storage URI is fetched to this node first
        self._cfg = cfg
        # The same tokenizer class the trainer loads, so prompt ids match token for token. Every
        # checkpoint of a run keeps the base model's tokenizer.
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        started = time.monotonic()
        if cfg.gpus_per_engine == 0:
            import_model_classes_in_process(model_dir)
        self.llm = LLM(**engine_kwargs(model_dir, cfg, cfg.seed, trust_remote_code, sleep_mode, max_lora_rank))
        self._start_s = time.monotonic() - started
        self._unreported_start = True  # the next Samples report this start
        self._weights: str | None = policy.weights  # None: asleep, no weights held

    def load(self, policy: Policy) -> float:
        """Hold `policy`'s weights (woken first if asleep); seconds spent, 0 if already held.
        An adapter is not loaded here: vLLM loads it with the first request that names it."""
        if policy.weights == self._weights:
            return 0.0
        started = time.monotonic()
        if self._weights is None:
            self.llm.wake_up()
            # Level 2 dropped the adapters' weights with the model's, but vLLM still lists them as
            # loaded: removed, the next request that names one loads it again from its directory.
            for adapter_id in self.llm.llm_engine.list_loras():
                self.llm.llm_engine.remove_lora(adapter_id)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": local_model(policy.weights)})
        self._weights = policy.weights
        return time.monotonic() - started

    def sleep(self) -> None:
        """Level 2: weights and KV cache are dropped (the next policy is loaded on wake-up)."""
        if self._weights is not None:
            self.llm.sleep(level=2)
            self._weights = None

    def generate(self, policy: Policy, prompts: list[str], seed: int, token_logps: bool = False) -> Samples:
        """K completions per prompt from `policy`, in input order, from one n=K request per prompt."""
        from vllm import SamplingParams, TokensPrompt
        from vllm.lora.request import LoRARequest

        load_s = self.load(policy)
        adapter = None if policy.adapter is None else LoRARequest(
            lora_name=policy.adapter, lora_int_id=policy.adapter_id, lora_path=local_model(policy.adapter))
        self.llm.collective_rpc(_seed_worker, args=(seed,))
        # Cached prefixes may come from earlier weights, and a warm cache changes what is
        # recomputed: every call starts from an empty cache, as a fresh engine does.
        self.llm.reset_prefix_cache()
        params = SamplingParams(**sampling_params_kwargs(self._cfg, token_logps))
        prompt_ids = render_prompt_ids(self.tokenizer, prompts)
        requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
        # vLLM's progress (done/total prompts, rate, ETA) as our log lines, every 30 s.
        outputs = self.llm.generate(requests, params, use_tqdm=LoggedProgress, lora_request=adapter)  # in request order
        completions = [sorted(out.outputs, key=lambda c: c.index) for out in outputs]
        if params.detokenize:
            texts = [[c.text for c in cands] for cands in completions]
        else:
            flat = self.tokenizer.batch_decode([c.token_ids for cands in completions for c in cands],
                                                skip_special_tokens=True)
            texts = [flat[i * params.n : (i + 1) * params.n] for i in range(len(completions))]
        started_here, self._unreported_start = self._unreported_start, False
        return Samples(
            candidates=texts,
            prompt_token_ids=[list(out.prompt_token_ids) for out in outputs],
            num_generated_tokens=sum(len(c.token_ids) for cands in completions for c in cands),
            engine_start_s=self._start_s if started_here else 0.0,
            engine_starts=int(started_here),
            weights_load_s=load_s,
            token_ids=[[list(c.token_ids) for c in cands] for cands in completions] if token_logps else [],
            # logprobs=0: each position's dict holds the sampled token alone.
            token_logps=[[[step[t].logprob for t, step in zip(c.token_ids, c.logprobs)] for c in cands]
                         for cands in completions] if token_logps else [],
        )

    def node_id(self) -> str:
        """The Ray node this engine runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def close(self) -> None:
        """Stop the vLLM engine core. Killed without this, its processes leave their
        shared-memory queues (RAM-backed files of up to ~250 MB each) in /dev/shm."""
        self.llm.llm_engine.engine_core.shutdown(timeout=_ENGINE_SHUTDOWN_S)


class EnginePool:
    """The sampling role's vLLM engine actors (`role.count` of them, with its resources, restarts
    and deadlines: `sppo.roles.sampling_role`), started on first use and kept as `engine_mode`
    says; `close` (or leaving a `with` block) stops them."""

    def __init__(self, cfg: SamplingConfig, role: Role | None = None, trust_remote_code: bool = False,
                 max_lora_rank: int | None = None):
        """role: default `sampling_role(cfg)`, which never times out. max_lora_rank: the engines
        serve policies with LoRA adapters up to that rank (`engine_kwargs`)."""
        self.cfg, self.mode, self._trust_remote_code = cfg, engine_mode(cfg), trust_remote_code
        self._max_lora_rank = max_lora_rank
        self.role = role if role is not None else sampling_role(cfg)
        self._engines: list = []
        self._placement = None  # the engines' placement, watched while a call waits on them
        self._nodes: list[str] = []  # the node each kept engine runs on, once they answered
        self.starts = 0  # engine starts (Ray's restarts after a crash included) since the pool was made

    def __enter__(self) -> EnginePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def sample(self, policy: Policy, prompts: list[str], seed: int, token_logps: bool = False) -> Samples:
        """cfg.k candidates per prompt from `policy`: engine i samples the i-th contiguous shard
        with seed + i. With token_logps the samples also carry each candidate's token ids and
        their log-probs. The role's timeout_s bounds the whole call, engine start included. On
        error the engines are stopped (the next call starts new ones); in restart mode, always."""
        if not prompts:
            return Samples(candidates=[], prompt_token_ids=[], num_generated_tokens=0)
        sampling_params_kwargs(self.cfg)  # fail on the driver, before any engine starts
        if policy.adapter is not None and self._max_lora_rank is None:
            raise ValueError(f"policy {policy} has a LoRA adapter, but the engines serve none (max_lora_rank unset)")
        shards = [part for part in shard(prompts, self.role.count) if part]
        started = time.monotonic()
        self._replace_engines_on_lost_nodes()
        idle = set(range(len(self._engines)))  # engines not busy with a request, safe to close
        try:
            if not self._engines:
                self._start(policy, len(shards))
                idle = set(range(len(self._engines)))
            logger.info("sampling: %d prompts x k=%d from %s on %d vLLM engine(s) (seeds %d..%d)",
                        len(prompts), self.cfg.k, policy, len(shards), seed, seed + len(shards) - 1)
            pending = {engine.generate.remote(policy, part, seed + i, token_logps): i
                       for i, (engine, part) in enumerate(zip(self._engines, shards))}
            idle -= set(pending.values())

            def shard_done(i: int, result: Samples) -> None:
                idle.add(i)
                logger.info("sampling: shard %d/%d done: %d prompts, %d candidates, %d tokens, %.1fs",
                            i + 1, len(shards), len(shards[i]), sum(map(len, result.candidates)),
                            result.num_generated_tokens, time.monotonic() - started)

            results = self.role.wait(
                pending, started=started, on_done=shard_done, placement=self._placement,
                describe=lambda i: f"vLLM engine {i} (seed {seed + i}, {len(shards[i])} prompts, model {policy})")
        except BaseException:
            self._stop(idle)
            raise
        if self.mode == "restart":
            self.close()
        elif not self._nodes:
            import ray

            self._nodes = ray.get([engine.node_id.remote() for engine in self._engines])
        samples = Samples.concat([results[i] for i in range(len(shards))])
        self.starts += samples.engine_starts
        if samples.weights_load_s > 0:
            logger.info("sampling: vLLM engine(s) loaded %s in %.1f s", policy, samples.weights_load_s)
        return samples

    def release(self) -> None:
        """Before training: free what the engines hold on the accelerators (sleep mode)."""
        if self.mode == "sleep" and self._engines:
            import ray

            ray.get([engine.sleep.remote() for engine in self._engines])
            logger.info("sampling: %d vLLM engine(s) asleep during training", len(self._engines))

    def close(self) -> None:
        self._stop(set(range(len(self._engines))))

    def _replace_engines_on_lost_nodes(self) -> None:
        """Kept engines on a node that left the cluster since the last call are stopped, so that
        this call starts new ones on the nodes left instead of waiting on Ray's restart of them."""
        import ray

        if not self._nodes:
            return
        lost = set(self._nodes) - {node["NodeID"] for node in ray.nodes() if node["Alive"]}
        if lost:
            logger.warning("sampling: Ray node(s) %s left the cluster since the last call; starting new vLLM "
                           "engine(s) on the nodes left", ", ".join(sorted(lost)))
            self._stop({i for i, node in enumerate(self._nodes) if node not in lost})

    def _start(self, policy: Policy, count: int) -> None:
        import ray

        # A crashed engine is restarted and its in-flight call retried on it: the call names its
        # policy and seed, so the restarted engine loads that policy and draws the same.
        engine_cls = ray.remote(runtime_env={"env_vars": engine_env(self.cfg)},
                                **self.role.actor_options())(VLLMEngine)
        # Restart mode starts only the engines this call's shards need.
        count = count if self.mode == "restart" else self.role.count
        self._engines = [engine_cls.remote(policy, self.cfg, self._trust_remote_code, self.mode == "sleep",
                                           self._max_lora_rank) for _ in range(count)]
        self._placement = self.role.actors_placement(self._engines)
        logger.info("sampling: starting %d vLLM engine(s) on %s (engine_mode %s, dtype %s)", count, policy,
                    self.mode, self.cfg.dtype)

    def _stop(self, idle: set[int]) -> None:
        """Close idle engines' vLLM cores cleanly, then kill every engine actor. A busy engine
        (timeout, driver interrupted) would only answer after its request, so it is killed as is."""
        import ray

        engines, self._engines, self._nodes, self._placement = self._engines, [], [], None
        if not engines:
            return
        closing = [engines[i].close.remote() for i in sorted(idle)]
        if closing:
            ray.wait(closing, num_returns=len(closing), timeout=_CLOSE_GRACE_S)
        for engine in engines:
            ray.kill(engine)
        logger.info("sampling: stopped %d vLLM engine(s)", len(engines))


def sample_candidates(policy: Policy, prompts: list[str], cfg: SamplingConfig, seed: int, role: Role | None = None,
                      trust_remote_code: bool = False, token_logps: bool = False,
                      max_lora_rank: int | None = None) -> Samples:
    """One sampling call on engines started for it and stopped after it (`EnginePool.sample`)."""
    with EnginePool(cfg.model_copy(update={"engine_mode": "restart"}), role, trust_remote_code, max_lora_rank) as pool:
        return pool.sample(policy, prompts, seed, token_logps)
