from pathlib import Path

import pytest

from sppo.config import ConfigError, RunConfig, load_config, parse_override

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_tiny_config_loads_and_overrides_apply():
    cfg = load_config(CONFIGS / "tiny.yaml", {"train.learning_rate": 1e-6, "sampling.k": 3})
    assert cfg.train.learning_rate == 1e-6
    assert cfg.sampling.k == 3
    assert cfg.train.beta == pytest.approx(1 / cfg.train.eta)
    assert cfg.train.global_batch_size == cfg.train.per_device_batch_size * cfg.train.num_workers


def test_defaults_follow_the_reference():
    cfg = RunConfig()
    assert (cfg.sampling.k, cfg.sampling.temperature, cfg.sampling.top_p, cfg.sampling.max_tokens) == (5, 0.7, 0.9, 2048)
    assert (cfg.train.eta, cfg.train.learning_rate, cfg.train.warmup_ratio) == (1000.0, 5e-7, 0.1)
    assert (cfg.judge.source_max_length, cfg.judge.candidate_max_length) == (1224, 412)
    assert cfg.policy.trust_remote_code is False
    assert cfg.train.reference_logps == "policy"  # a reference pass in training, as the reference does


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"sampling.k": 1}, "sampling.k"),
        ({"iterations": 0}, "iterations"),
        ({"train.learning_rate": "fast"}, "train.learning_rate"),
        ({"sampling.kk": 4}, "sampling.kk"),
        ({"train.max_prompt_length": 2048}, "max_prompt_length"),
        ({"iterations": 5}, "prompts.num_splits"),
        ({"train.reference_logps": "vllm"}, "train.reference_logps"),
        # The dataset's own responses were never sampled: no sampler log-probs for them.
        ({"train.reference_logps": "sampler", "prompts.response_column": "responses"}, "prompts.response_column"),
        # Rank 0 may wait out an MLflow outage in a step's metrics call while the others wait in a collective.
        ({"tracking.outage_limit_s": 300}, "timeouts.collective_s"),
    ],
)
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(CONFIGS / "tiny.yaml", overrides)


def test_malformed_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml.*malformed YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="missing.yaml.*cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_a_key_given_twice_is_refused_at_any_depth(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("iterations: 3\njudge:\n  rule:\n    weights: {letters: 1.0}\n    keywords: [a]\n"
                    "    weights: {letters: 2.0}\n")
    with pytest.raises(ConfigError, match="twice.yaml: key 'weights' is given twice in the same mapping, "
                                          "at line 4 and again at line 6"):
        load_config(path)
    path.write_text("iterations: 3\njudge:\n  rule:\n    weights: {letters: 1.0, letters: 2.0}\n")
    with pytest.raises(ConfigError, match="key 'letters' is given twice .* line 4 and again at line 4"):
        load_config(path)
    with pytest.raises(ConfigError, match="--set .*'keywords' appears twice"):
        parse_override("judge.rule={keywords: [a], keywords: [b]}")
    # Overriding what a merge key (`<<`) brings in is what it is for, not a repeated key.
    path.write_text("sampling:\n  <<: {k: 3, top_p: 0.5}\n  k: 4\n")
    assert (load_config(path).sampling.k, load_config(path).sampling.top_p) == (4, 0.5)


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("iterations: 3\ntracking:\n  experiment: café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text \(byte 0xe9 at line 3, column 18\)"):
        load_config(path)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_every_float_field_refuses_non_finite_values(value):
    floats = [key for key, default in RunConfig().flat().items() if isinstance(default, float)]
    assert "train.eta" in floats and "judge.rule.weights.letters" in floats and len(floats) > 15
    for key in floats:
        with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')}: Input should be a finite number"):
            load_config(None, {key: value})


def test_parse_override_parses_yaml_scalars():
    # YAML reads "1e-6" as a string; the typed config still gets a float.
    cfg = load_config(CONFIGS / "tiny.yaml", dict([parse_override("train.learning_rate=1e-6")]))
    assert cfg.train.learning_rate == 1e-6
    assert parse_override("train.bf16=true") == ("train.bf16", True)
    assert parse_override("tracking.run_name=my run") == ("tracking.run_name", "my run")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("train.learning_rate")


def test_digest_tracks_only_named_sections():
    base = RunConfig()
    changed_lr = base.model_copy(update={"train": base.train.model_copy(update={"learning_rate": 1e-6})})
    assert base.digest("sampling", "judge") == changed_lr.digest("sampling", "judge")
    assert base.digest("train") != changed_lr.digest("train")


PRODUCTION = ["gemma-2-9b-it-sppo.yaml", "llama-3-8b-instruct-sppo.yaml", "mistral-7b-instruct-sppo.yaml"]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_validates_and_its_resources_add_up(path):
    cfg = load_config(path)
    s, t = cfg.sampling, cfg.train
    if s.gpus_per_engine and s.gpus_per_engine < 1:
        # One GPU shared: a kept engine (asleep while training) beside the judge, and the trainer.
        assert s.tensor_parallel_size == 1 and s.num_engines == t.num_workers == 1 and s.engine_mode == "sleep"
        assert s.gpus_per_engine + cfg.judge.num_gpus <= 1 and s.gpus_per_engine + t.worker_gpus <= 1
    elif t.use_gpu or s.gpus_per_engine:
        # Each engine's GPUs hold its tensor-parallel shards; sampling and training use the same GPUs in turn.
        assert s.gpus_per_engine == s.tensor_parallel_size
        assert s.num_engines * s.gpus_per_engine == t.num_workers
        assert cfg.judge.num_gpus <= t.num_workers
    assert t.max_prompt_length < t.max_length
    # Every run a user starts from a shipped config is evaluated on held-out prompts (docs/configs.md).
    assert cfg.prompts.eval_size or cfg.prompts.eval_split


@pytest.mark.parametrize("name", PRODUCTION)
def test_production_configs_carry_the_reference_values(name):
    cfg = load_config(CONFIGS / name)
    assert (cfg.sampling.k, cfg.sampling.temperature, cfg.sampling.top_p, cfg.sampling.max_tokens) == (5, 0.7, 0.9, 2048)
    assert (cfg.train.eta, cfg.train.learning_rate, cfg.train.warmup_ratio, cfg.train.epochs) == (1000, 5e-7, 0.1, 1)
    assert cfg.train.global_batch_size == 64 and cfg.train.num_workers == 8
    assert (cfg.train.max_length, cfg.train.max_prompt_length) == (1024, 512)
    assert cfg.train.bf16 and cfg.train.use_gpu and cfg.train.gradient_checkpointing
    assert cfg.judge.path == "llm-blender/PairRM"
    assert (cfg.prompts.source, cfg.prompts.split, cfg.prompts.eval_split) == (
        "hf:snorkelai/Snorkel-Mistral-PairRM-DPO-Dataset", "train_iteration_{t}", "test_iteration_1")


# The published Gemma-2-9B-It recipes of the preference-optimisation family (docs/objectives.md):
# (loss, beta, gamma, learning rate, epochs, global batch, hybrid candidates).
RECIPES = {
    "gemma-2-9b-it-dpo.yaml": ("dpo", 0.01, None, 5e-7, 1, 128, False),
    "gemma-2-9b-it-simpo.yaml": ("simpo", 10.0, 5.0, 8e-7, 1, 128, False),
    "gemma-2-9b-it-wpo-hb.yaml": ("wpo", 0.01, None, 1e-6, 2, 128, True),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_gemma_recipes_carry_the_published_values(name):
    loss, beta, gamma, lr, epochs, batch, hybrid = RECIPES[name]
    cfg = load_config(CONFIGS / name)
    t = cfg.train
    assert (t.loss, t.learning_rate, t.epochs, t.global_batch_size) == (loss, lr, epochs, batch)
    assert t.beta == pytest.approx(beta)
    if gamma is not None:
        assert t.simpo_gamma == gamma
    assert (cfg.judge.kind, cfg.judge.path) == ("reward_model", "RLHFlow/ArmoRM-Llama3-8B-v0.1")
    assert (cfg.prompts.response_column is not None) == hybrid
    assert cfg.policy.path == "google/gemma-2-9b-it"


def test_tiny_configs_cover_every_new_objective():
    for loss in ("dpo", "ipo", "simpo", "wpo"):
        cfg = load_config(CONFIGS / f"tiny-{loss}.yaml")
        assert cfg.train.loss == loss and cfg.iterations == 1 and not cfg.train.use_gpu
    assert load_config(CONFIGS / "tiny-wpo.yaml").prompts.response_column == "response"


def test_a_shared_gpu_for_the_trainer_is_one_worker_and_left_out_of_the_record_when_unset():
    assert "gpus_per_worker" not in RunConfig().to_yaml() and "train.gpus_per_worker" not in RunConfig().flat()
    assert RunConfig().train.worker_gpus == 0.0
    assert load_config(None, {"train.use_gpu": True}).train.worker_gpus == 1.0
    shared = load_config(None, {"train.use_gpu": True, "train.gpus_per_worker": 0.5, "train.num_workers": 1})
    assert shared.train.worker_gpus == 0.5 and shared.flat()["train.gpus_per_worker"] == 0.5
    with pytest.raises(ConfigError, match=r"train.*gpus_per_worker \(0.5\) below 1 shares a GPU: only with num_workers 1"):
        load_config(None, {"train.use_gpu": True, "train.gpus_per_worker": 0.5, "train.num_workers": 2})
    for bad in (0, 1.5):
        with pytest.raises(ConfigError, match=r"train\.gpus_per_worker"):
            load_config(None, {"train.gpus_per_worker": bad})
