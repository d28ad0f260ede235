"""Sampling stage: pure sharding / argument mapping, and real vLLM engines in Ray actors.

The engine-based checks share ONE `sample_candidates` call (engine start dominates the cost).
It samples near-greedily (top_p tiny keeps only the most likely token, so all K candidates of a
prompt equal its greedy continuation) in float32, which lets transformers' own greedy decoding
of the same prompt ids check, independently of vLLM, that every prompt got its own candidates.
It also asks for each sampled token's log-prob (train.reference_logps "sampler"), which the same
float32 forward pass checks: they must be log pi_t itself, not the truncated top-p distribution.
"""

from __future__ import annotations

import glob
import os
import time
from dataclasses import dataclass

import pytest

from sppo.chat import render_prompt_ids
from sppo.config import SamplingConfig
from sppo.policy import Policy
from sppo.roles import sampling_role
from sppo.sampling import (
    EnginePool,
    Samples,
    engine_env,
    engine_kwargs,
    engine_mode,
    sample_candidates,
    sampling_params_kwargs,
    shard,
)

NUM_PROMPTS = 12
SHM = "/dev/shm"


@pytest.mark.parametrize(
    "length,n", [(0, 1), (0, 3), (1, 1), (5, 1), (5, 2), (12, 4), (13, 4), (3, 5), (7, 3)]
)
def test_shard_covers_every_item_once_in_order(length, n):
    items = [f"p{i}" for i in range(length)]
    parts = shard(items, n)
    assert len(parts) == n
    assert [x for part in parts for x in part] == items
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the larger parts come first


def test_shard_rejects_fewer_than_one_part():
    with pytest.raises(ValueError, match="shards must be >= 1"):
        shard([1, 2], 0)


def test_sampling_params_carry_k_temperature_top_p_max_tokens():
    from vllm import SamplingParams

    cfg = SamplingConfig(k=3, temperature=0.7, top_p=0.9, max_tokens=17)
    params = SamplingParams(**sampling_params_kwargs(cfg))
    assert (params.n, params.temperature, params.top_p, params.max_tokens) == (3, 0.7, 0.9, 17)
    assert params.seed is None  # per-request seeds fail on vLLM's CPU backend
    assert params.logprobs is None  # asked for only when training takes its reference from them
    with_logps = SamplingParams(**sampling_params_kwargs(cfg, token_logps=True))
    assert (with_logps.logprobs, with_logps.detokenize) == (0, False)  # the sampled token's; texts decoded by us


def test_greedy_temperature_is_rejected_naming_the_field():
    with pytest.raises(ValueError, match=r"sampling\.temperature"):
        sampling_params_kwargs(SamplingConfig(k=4, temperature=0.0))


def test_engine_kwargs_map_the_config_and_seed():
    cfg = SamplingConfig(
        tensor_parallel_size=2, dtype="bfloat16", max_model_len=512, gpu_memory_utilization=0.5, max_num_seqs=64
    )
    kwargs = engine_kwargs("/models/pi_1", cfg, seed=7)
    assert kwargs == {
        "model": "/models/pi_1",
        "tokenizer": "/models/pi_1",
        "trust_remote_code": False,  # off unless policy.trust_remote_code turns it on
        "tensor_parallel_size": 2,
        "dtype": "bfloat16",
        "max_model_len": 512,
        "gpu_memory_utilization": 0.5,
        "max_num_seqs": 64,
        "seed": 7,
    }
    # By default all of a shard's candidates fit in one wave, whatever vLLM picks on this hardware.
    assert engine_kwargs("/models/pi_1", SamplingConfig(), seed=0)["max_num_seqs"] == 1024
    assert "max_num_seqs" not in engine_kwargs("/models/pi_1", SamplingConfig(max_num_seqs=None), seed=0)
    assert "max_model_len" not in engine_kwargs("/models/pi_1", SamplingConfig(), seed=0)
    assert engine_kwargs("/models/pi_1", cfg, seed=7, trust_remote_code=True)["trust_remote_code"] is True


@pytest.mark.parametrize("asked,gpus,runs", [
    ("auto", 0.0, "resident"), ("auto", 1.0, "restart"), ("resident", 1.0, "resident"),
    ("sleep", 1.0, "sleep"), ("sleep", 0.0, "restart"),  # vLLM's sleep mode is CUDA only
    ("restart", 0.0, "restart"), ("restart", 1.0, "restart"),
])
def test_engine_mode_keeps_engines_on_cpus_and_restarts_them_on_gpus_unless_asked(asked, gpus, runs):
    assert engine_mode(SamplingConfig(engine_mode=asked, gpus_per_engine=gpus)) == runs


def test_only_sleep_mode_asks_vllm_for_it():
    assert engine_kwargs("/m", SamplingConfig(), seed=0, sleep_mode=True)["enable_sleep_mode"] is True
    assert "enable_sleep_mode" not in engine_kwargs("/m", SamplingConfig(), seed=0)


def test_engine_env_bounds_the_cpu_kv_cache_and_keeps_the_engine_core_in_process():
    env = engine_env(SamplingConfig(cpu_kvcache_gib=3))
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # deterministic re-sampling


def test_samples_concat_keeps_shard_order_and_sums_tokens():
    a = Samples(candidates=[["a1", "a2"]], prompt_token_ids=[[1, 5]], num_generated_tokens=4)
    b = Samples(
        candidates=[["b1", "b2"], ["c1", "c2"]], prompt_token_ids=[[1, 6], [1, 7]], num_generated_tokens=9
    )
    joined = Samples.concat([a, b])
    assert joined.candidates == [["a1", "a2"], ["b1", "b2"], ["c1", "c2"]]
    assert joined.token_ids == joined.token_logps == []  # not asked for
    with_logps = Samples.concat([
        Samples([["a"]], [[1]], 1, token_ids=[[[9]]], token_logps=[[[-0.5]]]),
        Samples([["b"]], [[1]], 2, token_ids=[[[8, 2]]], token_logps=[[[-1.0, -0.1]]]),
    ])
    assert with_logps.token_ids == [[[9]], [[8, 2]]] and with_logps.token_logps == [[[-0.5]], [[-1.0, -0.1]]]
    assert joined.prompt_token_ids == [[1, 5], [1, 6], [1, 7]]
    assert joined.num_generated_tokens == 13


# --- real vLLM engines in Ray actors ---------------------------------------------------------

NEAR_GREEDY = SamplingConfig(
    k=4,
    temperature=1.0,
    top_p=1e-6,
    max_tokens=16,
    max_model_len=512,
    dtype="float32",  # what transformers computes in, for the greedy cross-check
    num_engines=2,  # exercises sharding and re-assembly across engines
    cpus_per_engine=1.0,
    cpu_kvcache_gib=1,
)


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    from sppo.tiny.policy import bundled_prompts

    return bundled_prompts()[:NUM_PROMPTS]


@pytest.fixture(scope="module")
def tokenizer(tiny_policy_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_policy_dir)


def _wait_for_cpus(ray, total: float, within_s: float = 30.0) -> float:
    """Available CPUs once they are back to `total`, or what is available after `within_s`."""
    deadline = time.monotonic() + within_s
    while (available := ray.available_resources().get("CPU", 0.0)) < total:
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return available


def _shm_entries() -> set[str]:
    return set(os.listdir(SHM)) if os.path.isdir(SHM) else set()


def _mapped_by_a_live_process(name: str) -> bool:
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                if name in f.read():
                    return True
        except OSError:  # the process ended meanwhile
            continue
    return False


def _leaked_shm(before: set[str], settle_s: float = 15.0) -> set[str]:
    """New /dev/shm entries that no live process maps: left behind by ended processes.

    Entries still mapped get `settle_s` for their (killed) processes to go; after that they
    count as another live process's own (other tests may run engines meanwhile)."""
    deadline = time.monotonic() + settle_s
    while True:
        new = _shm_entries() - before
        mapped = {name for name in new if _mapped_by_a_live_process(name)}
        if not mapped or time.monotonic() > deadline:
            return new - mapped
        time.sleep(1.0)


@dataclass
class SamplingRun:
    samples: Samples
    total_cpus: float
    leaked_shm: set[str]


@pytest.fixture(scope="module")
def sampled(ray_cluster, tiny_policy_dir, prompts) -> SamplingRun:
    total_cpus = ray_cluster.cluster_resources()["CPU"]
    shm_before = _shm_entries()
    started = time.monotonic()
    samples = sample_candidates(Policy(tiny_policy_dir), prompts, NEAR_GREEDY, seed=0, role=sampling_role(NEAR_GREEDY, timeout_s=900),
                                token_logps=True)
    print(f"sample_candidates: {time.monotonic() - started:.1f}s for {len(prompts)} prompts")
    return SamplingRun(samples, total_cpus, _leaked_shm(shm_before))


@pytest.mark.slow
def test_k_candidates_per_prompt_aligned_with_the_input(sampled, prompts, tokenizer):
    samples = sampled.samples
    assert len(samples.candidates) == len(prompts)
    assert all(len(c) == NEAR_GREEDY.k for c in samples.candidates)
    # Each RequestOutput carries its own prompt ids: slot i was sampled from prompt i.
    expected_ids = render_prompt_ids(tokenizer, prompts)
    assert len({tuple(ids) for ids in expected_ids}) == len(prompts)
    assert samples.prompt_token_ids == expected_ids
    nonempty = sum(bool(text) for c in samples.candidates for text in c)
    assert nonempty >= 0.75 * len(prompts) * NEAR_GREEDY.k


@pytest.mark.slow
def test_candidates_are_the_greedy_continuations_of_their_own_prompts(
    sampled, prompts, tokenizer, tiny_policy_dir
):
    import torch
    from transformers import AutoModelForCausalLM

    samples = sampled.samples
    model = AutoModelForCausalLM.from_pretrained(tiny_policy_dir, dtype=torch.float32).eval()
    greedy = []
    with torch.no_grad():
        for ids in render_prompt_ids(tokenizer, prompts):
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=NEAR_GREEDY.max_tokens, do_sample=False
            )
            greedy.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))
    # Distinct continuations make a swapped or shifted assignment detectable.
    assert len(set(greedy)) >= len(prompts) - 1
    for cands in samples.candidates:
        assert len(set(cands)) == 1, "near-greedy sampling must give K equal candidates"
    matches = [c[0] == g for c, g in zip(samples.candidates, greedy)]
    # One late near-tie flip between two float32 implementations is tolerated, not more.
    assert sum(matches) >= len(prompts) - 1, list(zip([c[0] for c in samples.candidates], greedy))


@pytest.mark.slow
def test_sampled_token_log_probs_are_the_policys_and_serve_as_the_reference(
    sampled, prompts, tokenizer, tiny_policy_dir
):
    """Each candidate's token ids decode to its text, and its per-token log-probs equal
    log_softmax of transformers' float32 logits at those tokens (top_p 1e-6 would make the
    processed ones 0). Through encode_pairs(sampled_tokens=True), responses cut to fit,
    sampler_reference_logps equals the trainer's own reference pass over the same pairs."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from sppo.pairs import training_rows
    from sppo.training_data import encode_pairs
    from sppo.training_recipe import reference_logps, sampler_reference_logps

    samples = sampled.samples
    model = AutoModelForCausalLM.from_pretrained(tiny_policy_dir, dtype=torch.float32).eval()
    assert len(samples.token_ids) == len(samples.token_logps) == len(prompts)
    for prompt_ids, texts, ids_k, logps_k in zip(samples.prompt_token_ids, samples.candidates,
                                                  samples.token_ids, samples.token_logps, strict=True):
        for text, ids, logps in zip(texts, ids_k, logps_k, strict=True):
            assert 1 <= len(ids) == len(logps) <= NEAR_GREEDY.max_tokens
            assert tokenizer.decode(ids, skip_special_tokens=True) == text
            with torch.no_grad():
                logits = model(torch.tensor([prompt_ids + ids])).logits[0, len(prompt_ids) - 1 : -1]
            expected = logits.log_softmax(-1).gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
            assert (expected < -1e-3).any()  # not all ~0: the check below can tell raw from top-p
            torch.testing.assert_close(torch.tensor(logps), expected, atol=1e-5, rtol=1e-5)

    first_best = np.full((NEAR_GREEDY.k, NEAR_GREEDY.k), 0.5)
    first_best[0, 1:], first_best[1:, 0] = 0.9, 0.1
    rows = training_rows(prompts, samples.candidates, [first_best] * len(prompts), None,
                         samples.token_ids, samples.token_logps)
    max_length = max(map(len, samples.prompt_token_ids)) + NEAR_GREEDY.max_tokens // 2  # cuts some responses
    pairs = encode_pairs(tokenizer, rows, max_length=max_length, max_prompt_length=max_length - 1, sampled_tokens=True)
    assert any(len(p.chosen.input_ids) - p.chosen.prompt_length < len(r["chosen_token_ids"])
               for p, r in zip(pairs, rows))
    trainer = reference_logps(model, pairs, batch_size=4, pad_token_id=tokenizer.pad_token_id)
    torch.testing.assert_close(sampler_reference_logps(pairs, rows), trainer, atol=1e-4, rtol=1e-6)


@pytest.mark.slow
def test_vllm_saw_exactly_one_bos(sampled, tokenizer):
    samples = sampled.samples
    bos = tokenizer.bos_token_id
    for ids in samples.prompt_token_ids:
        assert ids[0] == bos and ids.count(bos) == 1, ids[:4]


@pytest.mark.slow
def test_generated_token_count_is_bounded(sampled, prompts):
    samples = sampled.samples
    assert 0 < samples.num_generated_tokens <= len(prompts) * NEAR_GREEDY.k * NEAR_GREEDY.max_tokens


@pytest.mark.slow
def test_engines_are_released_after_sampling(sampled, ray_cluster):
    assert _wait_for_cpus(ray_cluster, sampled.total_cpus) == sampled.total_cpus
    # vLLM cores were shut down, not only killed: their shared memory is gone.
    assert not sampled.leaked_shm, f"left in {SHM}: {sorted(sampled.leaked_shm)}"


@pytest.mark.slow
def test_timeout_names_role_and_stage_and_releases_engines(ray_cluster, tiny_policy_dir, prompts):
    total_cpus = ray_cluster.cluster_resources()["CPU"]
    cfg = NEAR_GREEDY.model_copy(update={"num_engines": 1})
    # Far shorter than an engine start: the engine is killed while it is still loading.
    with pytest.raises(TimeoutError, match=r"stage 'sampling': vLLM engine 0 \(seed 0, 2 prompts, model .*\): not done within timeout_s=1 s"):
        sample_candidates(Policy(tiny_policy_dir), prompts[:2], cfg, seed=0, role=sampling_role(cfg, timeout_s=1.0))
    assert _wait_for_cpus(ray_cluster, total_cpus) == total_cpus


@pytest.mark.slow
def test_engine_failure_names_the_engine_and_model(ray_cluster, tmp_path, prompts):
    total_cpus = ray_cluster.cluster_resources()["CPU"]
    missing = str(tmp_path / "no-such-policy")
    cfg = NEAR_GREEDY.model_copy(update={"num_engines": 1})
    with pytest.raises(RuntimeError, match=r"stage 'sampling': vLLM engine 0 .*no-such-policy.* failed"):
        sample_candidates(Policy(missing), prompts[:2], cfg, seed=0, role=sampling_role(cfg, timeout_s=600))
    assert _wait_for_cpus(ray_cluster, total_cpus) == total_cpus


@pytest.mark.slow
def test_a_killed_engine_is_restarted_and_its_shard_retried(ray_cluster, tiny_policy_dir, tokenizer):
    """SIGKILL an engine actor while it generates: Ray restarts it (sampling.max_restarts, same
    seed) and retries its shard, so every prompt gets exactly its own K candidates."""
    from concurrent.futures import ThreadPoolExecutor

    from sppo.tiny.policy import bundled_prompts
    from tests.processes import wait_for_titled, wait_gone

    total_cpus = ray_cluster.cluster_resources()["CPU"]
    prompts = bundled_prompts()[:64]  # a few seconds of generation to land the kill in
    cfg = NEAR_GREEDY.model_copy(update={"num_engines": 1, "max_tokens": 32})
    with ThreadPoolExecutor(1) as pool:
        sampling = pool.submit(sample_candidates, Policy(tiny_policy_dir), prompts, cfg, seed=0,
                               role=sampling_role(cfg, timeout_s=900))
        victim = wait_for_titled([os.getpid()], "ray::VLLMEngine.generate",
                                 still_running=lambda: not sampling.done())
        victim.kill()
        assert not wait_gone([victim], timeout_s=30)
        samples = sampling.result(timeout=900)
    assert len(samples.candidates) == len(prompts)
    assert all(len(c) == cfg.k for c in samples.candidates)
    assert samples.prompt_token_ids == render_prompt_ids(tokenizer, prompts)  # none missing, none twice
    assert _wait_for_cpus(ray_cluster, total_cpus) == total_cpus


@pytest.fixture(scope="module")
def other_policy_dir(tiny_policy_dir, tmp_path_factory) -> str:
    """The tiny policy with every weight re-drawn: same shapes and tokenizer, other samples."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("other-policy")
    model = AutoModelForCausalLM.from_pretrained(tiny_policy_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_policy_dir).save_pretrained(out)
    return str(out)


@pytest.mark.slow
def test_kept_engines_load_each_policy_in_place_and_a_restarted_one_loads_the_current(
        ray_cluster, tiny_policy_dir, other_policy_dir):
    """One resident engine samples pi_a, then pi_b (loaded in place), then pi_a again; then it is
    SIGKILLed while sampling pi_b. Every call must equal what a fresh engine started on that
    policy draws with the same seed: the reload takes the new weights (not cached ones), reuse
    changes nothing, and the engine Ray restarts (on the pool's first policy, pi_a) loads pi_b
    before it retries the call. At temperature 1 and top_p 1, equal draws need equal seeds."""
    from concurrent.futures import ThreadPoolExecutor

    from sppo.tiny.policy import bundled_prompts
    from tests.processes import wait_for_titled, wait_gone

    prompts = bundled_prompts()[:64]  # a few seconds of generation to land the kill in
    cfg = NEAR_GREEDY.model_copy(update={"num_engines": 1, "max_tokens": 32, "top_p": 1.0,
                                         "engine_mode": "resident"})
    pi_a, pi_b = Policy(tiny_policy_dir), Policy(other_policy_dir)
    fresh_b = sample_candidates(pi_b, prompts, cfg, seed=5)
    with EnginePool(cfg) as pool, ThreadPoolExecutor(1) as thread:
        first_a = pool.sample(pi_a, prompts, seed=5)
        b = pool.sample(pi_b, prompts, seed=5)
        again_a = pool.sample(pi_a, prompts, seed=5)
        assert (first_a.engine_starts, b.engine_starts, again_a.engine_starts) == (1, 0, 0)
        assert first_a.weights_load_s == 0.0 and b.weights_load_s > 0.0
        sampling = thread.submit(pool.sample, pi_b, prompts, 5)
        victim = wait_for_titled([os.getpid()], "ray::VLLMEngine.generate", still_running=lambda: not sampling.done())
        victim.kill()
        assert not wait_gone([victim], timeout_s=30)
        after_kill = sampling.result(timeout=900)
        assert pool.starts == 2  # the first start and Ray's restart
    assert b.candidates != first_a.candidates  # the two policies differ
    assert b.candidates == fresh_b.candidates
    assert again_a.candidates == first_a.candidates
    assert after_kill.candidates == fresh_b.candidates and after_kill.engine_starts == 1


def test_engine_kwargs_enable_lora_only_for_a_pool_that_serves_adapters():
    kwargs = engine_kwargs("/m", SamplingConfig(), seed=0, max_lora_rank=16)
    assert (kwargs["enable_lora"], kwargs["max_lora_rank"], kwargs["max_loras"]) == (True, 16, 1)
    assert "enable_lora" not in engine_kwargs("/m", SamplingConfig(), seed=0)


def test_each_adapter_has_its_own_positive_id_and_the_same_one_everywhere():
    ids = {Policy("/base", f"/run/iter-{t}/checkpoint/adapter").adapter_id for t in range(1, 200)}
    assert len(ids) == 199 and min(ids) >= 1  # vLLM keys its prefix cache by this id
    assert Policy("/base", "/a").adapter_id == Policy("/other-base", "/a").adapter_id
    with pytest.raises(ValueError, match="has no adapter"):
        Policy("/base").adapter_id
    assert Policy("b", "a").mapped(str.upper) == Policy("B", "A") and Policy("b").mapped(str.upper) == Policy("B")


def test_a_pool_without_lora_refuses_an_adapter_before_starting_an_engine():
    pool = EnginePool(NEAR_GREEDY)
    with pytest.raises(ValueError, match=r"has a LoRA adapter, but the engines serve none"):
        pool.sample(Policy("/base", "/adapter"), ["hi"], seed=0)
    assert pool.starts == 0


@pytest.fixture(scope="module")
def adapters(tiny_policy_dir, tmp_path_factory) -> dict[str, str]:
    """Two peft LoRA adapters (rank 8, every projection) on the tiny policy, their B matrices
    drawn at random so that each moves the policy: as an iteration's training publishes them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_policy_dir, dtype=torch.float32),
                               LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                              "gate_proj", "up_proj", "down_proj"]))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        out[name] = str(tmp_path_factory.mktemp(f"adapter-{name}"))
        model.save_pretrained(out[name])
    return out


@pytest.mark.slow
def test_a_kept_engine_serves_each_adapter_on_the_base_it_keeps(ray_cluster, tiny_policy_dir, adapters, prompts):
    """One resident engine with LoRA samples base + adapter a, base + b, a again and the base
    alone, then is SIGKILLed while sampling b. No base weights move; each adapter's draws are
    its own (the same seed gives a's again after b, and b's again from the engine Ray restarts);
    K candidates per prompt; the sampled tokens' log-probs are base + adapter's, as peft's
    float32 forward pass computes them."""
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sppo.tiny.policy import bundled_prompts
    from tests.processes import wait_for_titled, wait_gone

    pi_a, pi_b, base = Policy(tiny_policy_dir, adapters["a"]), Policy(tiny_policy_dir, adapters["b"]), Policy(tiny_policy_dir)
    cfg = NEAR_GREEDY.model_copy(update={"num_engines": 1, "top_p": 1.0, "engine_mode": "resident"})
    with EnginePool(cfg, max_lora_rank=8) as pool, ThreadPoolExecutor(1) as thread:
        first_a = pool.sample(pi_a, prompts, seed=5, token_logps=True)
        b = pool.sample(pi_b, prompts, seed=5, token_logps=True)
        again_a = pool.sample(pi_a, prompts, seed=5, token_logps=True)
        plain = pool.sample(base, prompts, seed=5, token_logps=True)
        assert [s.engine_starts for s in (first_a, b, again_a, plain)] == [1, 0, 0, 0]
        assert all(s.weights_load_s == 0.0 for s in (first_a, b, again_a, plain))  # the base stays
        many = bundled_prompts()[:64]  # a few seconds of generation to land the kill in
        b_many = pool.sample(pi_b, many, seed=6)
        sampling = thread.submit(pool.sample, pi_b, many, 6)
        victim = wait_for_titled([os.getpid()], "ray::VLLMEngine.generate", still_running=lambda: not sampling.done())
        victim.kill()
        assert not wait_gone([victim], timeout_s=30)
        after_kill = sampling.result(timeout=900)
        assert pool.starts == 2 and after_kill.engine_starts == 1  # the first start and Ray's restart
    assert all(len(c) == cfg.k for s in (first_a, b, plain) for c in s.candidates)
    assert again_a.candidates == first_a.candidates and after_kill.candidates == b_many.candidates
    assert len({str(s.candidates) for s in (first_a, b, plain)}) == 3  # each adapter moves the policy its way

    model = AutoModelForCausalLM.from_pretrained(tiny_policy_dir, dtype=torch.float32).eval()
    for samples, policy in ((first_a, pi_a), (b, pi_b)):
        served = PeftModel.from_pretrained(model, policy.adapter).eval()
        _assert_token_logps_are_the_models(samples, served)
        model = served.unload()


def _assert_token_logps_are_the_models(samples: Samples, model, prompts: int = 4) -> None:
    """The sampled tokens' log-probs of the first `prompts` prompts equal log_softmax of `model`'s
    float32 logits at those tokens."""
    import torch

    for prompt_ids, ids_k, logps_k in list(zip(samples.prompt_token_ids, samples.token_ids, samples.token_logps,
                                               strict=True))[:prompts]:
        for ids, logps in zip(ids_k, logps_k, strict=True):
            with torch.no_grad():
                logits = model(torch.tensor([prompt_ids + ids])).logits[0, len(prompt_ids) - 1 : -1]
            expected = logits.log_softmax(-1).gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
            torch.testing.assert_close(torch.tensor(logps), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_vllm_serves_the_merged_export_of_an_adapter_as_base_plus_adapter(ray_cluster, tiny_policy_dir, adapters, prompts,
                                                                          tmp_path):
    """What `python -m sppo.export` writes for a LoRA iteration without --adapter (the base and
    its adapter merged into one model directory) loads in a vLLM engine as a full policy, and
    the log-probs of what it samples are base + adapter's, as peft's float32 forward pass
    computes them."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sppo.export import write_merged

    merged = tmp_path / "merged"
    write_merged(Policy(tiny_policy_dir, adapters["a"]), merged)
    cfg = NEAR_GREEDY.model_copy(update={"num_engines": 1, "top_p": 1.0})
    with EnginePool(cfg) as pool:
        samples = pool.sample(Policy(str(merged)), prompts, seed=5, token_logps=True)
    assert all(len(c) == cfg.k for c in samples.candidates)
    served = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_policy_dir, dtype=torch.float32),
                                       adapters["a"]).eval()
    _assert_token_logps_are_the_models(samples, served)


@pytest.mark.slow
def test_a_cpu_engine_on_an_empty_vllm_cache_starts_without_vllms_inspection_subprocess(tmp_path, tiny_policy_dir):
    """vLLM inspects a model class in a subprocess (to keep CUDA out of the engine's process) and
    caches what it found under its cache root; an engine on CPUs registers the policy's classes as
    imported instead, so on a fresh home nothing is inspected or cached, and it samples as usual."""
    import subprocess
    import sys

    cache = tmp_path / "vllm-cache"
    cfg = NEAR_GREEDY.model_copy(update={"num_engines": 1})
    script = (
        "import os, sys; from sppo.policy import Policy; from sppo.sampling import VLLMEngine; "
        "from sppo.config import SamplingConfig; "
        f"engine = VLLMEngine(Policy({tiny_policy_dir!r}), SamplingConfig.model_validate_json({cfg.model_dump_json()!r})); "
        f"out = engine.generate(Policy({tiny_policy_dir!r}), ['Say hi.'], seed=3); "
        "print('candidates', len(out.candidates[0])); sys.stdout.flush(); os._exit(0)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **engine_env(cfg), "VLLM_CACHE_ROOT": str(cache)})
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"candidates {cfg.k}" in done.stdout
    assert not list(cache.glob("modelinfos/*.json")), "vLLM inspected the model class in a subprocess"
