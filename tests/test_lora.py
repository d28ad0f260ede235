"""train.lora: a peft LoRA adapter trained on the frozen policy under ZeRO-3 and published alone,
in the checkpoint's adapter/ (no full weights). Config and adapter checks without
DeepSpeed, then the recipe in this process (a group of one) and under torchrun (two)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from sppo.checkpoint import ADAPTER_WEIGHTS, check_adapter
from sppo.export import write_merged
from sppo.policy import ADAPTER_CONFIG, ADAPTER_DIR, Policy
from sppo.config import LORA_TARGET_MODULES, ConfigError, LoraConfig, RunConfig, TrainConfig, load_config
from sppo.losses import LOSSES
from sppo.training_recipe import add_adapter, train
from tests.test_training import ONE_RANK_CFG, make_rows

# The tiny policy: 2 layers, hidden 64, MLP 128; every target is a Linear of (in, out) features.
TINY_SHAPES = {"q_proj": (64, 64), "k_proj": (64, 64), "v_proj": (64, 64), "o_proj": (64, 64),
               "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}


def adapter_numel(rank: int) -> int:
    """A (rank x in) and B (out x rank) for every target module of each of the 2 layers."""
    return 2 * sum(rank * (fan_in + fan_out) for fan_in, fan_out in TINY_SHAPES.values())


def base_model(tiny_policy_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_policy_dir, dtype=torch.float32).eval()


# ---------------------------------------------------------------- config


def test_lora_is_off_by_default_and_left_out_of_the_config_record():
    cfg = RunConfig()
    assert cfg.train.lora is None
    # Unset, the training stage's digest of earlier output directories is unchanged.
    assert not any(key.startswith("train.lora") for key in cfg.flat()) and "lora" not in cfg.to_yaml()
    on = load_config(None, {"train.lora": {}})  # what `--set train.lora={}` gives
    assert on.train.lora == LoraConfig()
    assert (on.train.lora.rank, on.train.lora.alpha, on.train.lora.dropout) == (16, 32, 0.0)
    assert on.train.lora.target_modules == list(LORA_TARGET_MODULES)
    assert on.flat()["train.lora.rank"] == 16 and on.digest("train") != cfg.digest("train")


def test_a_set_inside_a_section_the_yaml_turned_off_turns_it_on(tmp_path):
    """`lora: null` in a config, then `--set train.lora.rank=8`: the adapter with rank 8 and the
    other defaults (it was refused: "'lora' is not a section"). A scalar is still no section."""
    path = tmp_path / "off.yaml"
    path.write_text("train:\n  lora: null\n  epochs: 2\n")
    assert load_config(str(path), {"train.lora.rank": 8}).train.lora == LoraConfig(rank=8)
    with pytest.raises(ConfigError, match=r"--set train\.epochs\.x: 'epochs' is not a section"):
        load_config(str(path), {"train.epochs.x": 1})


@pytest.mark.parametrize("rank", [1, 8, 16, 32, 64, 128, 256, 320, 512])
def test_every_rank_vllm_serves_is_taken(rank):
    assert load_config(None, {"train.lora.rank": rank}).train.lora.rank == rank


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.lora.rank": 4}, r"train\.lora\.rank: .*4 is not a rank vLLM serves; one of 1, 8, 16, 32, 64"),
        ({"train.lora.rank": 0}, r"train\.lora\.rank"),
        ({"train.lora.alpha": 0}, r"train\.lora\.alpha"),
        ({"train.lora.dropout": 1.0}, r"train\.lora\.dropout"),
        ({"train.lora.dropout": -0.1}, r"train\.lora\.dropout"),
        ({"train.lora.target_modules": ["q_proj", "lm_head"]}, r"train\.lora\.target_modules: .*lm_head"),
        ({"train.lora.target_modules": ["model.embed_tokens"]}, r"train\.lora\.target_modules: .*embed_tokens"),
        ({"train.lora.target_modules": ["wte"]}, r"train\.lora\.target_modules"),
        ({"train.lora.target_modules": []}, r"train\.lora\.target_modules"),
        ({"train.lora.target_modules": ["q_proj", "q_proj"]}, r"train\.lora\.target_modules: .*once"),
        ({"train.lora.use_dora": True}, r"train\.lora\.use_dora"),
    ],
)
def test_bad_lora_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


# ---------------------------------------------------------------- the adapter, without DeepSpeed


def test_a_fresh_adapter_is_the_only_trainable_state_and_changes_nothing(tiny_policy_dir):
    base = base_model(tiny_policy_dir)
    ids = torch.randint(3, 1024, (2, 12))
    before = base(input_ids=ids).logits
    model = add_adapter(base, LoraConfig())
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert sum(trainable.values()) == adapter_numel(16)
    assert {name.split(".")[-4] for name in trainable} == set(TINY_SHAPES)  # ...the module each wraps
    # B = 0: the model is still exactly pi_t.
    assert torch.equal(model(input_ids=ids).logits, before)
    assert model.peft_config["default"].base_model_name_or_path == tiny_policy_dir


def test_an_adapter_on_the_head_or_embeddings_is_refused_whatever_its_name(tiny_policy_dir):
    # Past the config's check of names (model_construct skips validation): the model's own modules are checked.
    with pytest.raises(ValueError, match=r"train\.lora\.target_modules .*lm_head.*vLLM's log-probs ignore"):
        add_adapter(base_model(tiny_policy_dir), LoraConfig.model_construct(
            rank=8, alpha=16, dropout=0.0, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match=r"train\.lora\.target_modules: .*qkv_proj"):
        add_adapter(base_model(tiny_policy_dir), LoraConfig(target_modules=["qkv_proj"]))


def test_an_empty_adapter_is_refused(tiny_policy_dir, tmp_path):
    """What a save of ZeRO-3 partitions without gathering gives (peft #2892): 0-sized tensors."""
    model = add_adapter(base_model(tiny_policy_dir), LoraConfig(rank=8, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "whole")
    check_adapter(tmp_path / "whole")
    partitions = {name: torch.empty(0) for name, p in model.named_parameters() if p.requires_grad}
    model.save_pretrained(tmp_path / "partitions", state_dict=partitions)  # peft saves it as it is
    with pytest.raises(ValueError, match="empty or partial"):
        check_adapter(tmp_path / "partitions")


# ---------------------------------------------------------------- the recipe in this process

LORA_CFG = {**ONE_RANK_CFG, "lora": {}}  # gradient checkpointing on, as ONE_RANK_CFG has it


@pytest.fixture(scope="module")
def runs(one_process_group, tiny_policy_dir, tmp_path_factory):
    """The recipe on the same 8 pairs (4 steps) in several ways, each published under root/<name>."""
    root = tmp_path_factory.mktemp("lora")
    ways = {
        "full_untrained": {**ONE_RANK_CFG, "max_steps": 0},
        "lora_untrained": {**LORA_CFG, "max_steps": 0},
        "lora": LORA_CFG,
        "lora_online": {**LORA_CFG, "reference_logps": "online"},
        "lora_no_checkpointing": {**LORA_CFG, "gradient_checkpointing": False},
        "full": ONE_RANK_CFG,
    }
    results = {name: train(TrainConfig(**cfg), make_rows(8), tiny_policy_dir, str(root / name),
                           device=one_process_group) for name, cfg in ways.items()}
    # The next iteration: pi_1 = the base + the "lora" run's adapter, continued (policy and online
    # references); and pi_1's reference log-probs from pi_1 merged (as sppo.export merges it) and
    # trained in full, for comparison.
    pi_1 = str(root / "lora" / ADAPTER_DIR)
    for name, cfg in (("continued", LORA_CFG), ("continued_online", {**LORA_CFG, "reference_logps": "online"})):
        results[name] = train(TrainConfig(**cfg), make_rows(8), tiny_policy_dir, str(root / name),
                              device=one_process_group, adapter_dir=pi_1)
    write_merged(Policy(tiny_policy_dir, pi_1), root / "pi_1_merged")
    results["merged_pi_1"] = train(TrainConfig(**{**ONE_RANK_CFG, "max_steps": 0}), make_rows(8),
                                   str(root / "pi_1_merged"), str(root / "merged_pi_1"), device=one_process_group)
    return {"root": root, "results": results}


def history(result, key: str) -> list[float]:
    return [m[key] for m in result.history]


@pytest.mark.slow
def test_a_fresh_adapter_gives_the_full_models_reference_and_publishes_pi_t(runs, tiny_policy_dir):
    results, root = runs["results"], runs["root"]
    lora, full = results["lora_untrained"], results["full_untrained"]
    assert len(lora.reference_logps) == 8
    torch.testing.assert_close(torch.tensor(lora.reference_logps), torch.tensor(full.reference_logps),
                               atol=1e-6, rtol=0)
    # No step: the published adapter's B matrices are 0, so base + adapter is pi_t exactly.
    assert [p.name for p in (root / "lora_untrained").iterdir()] == [ADAPTER_DIR]
    adapter = load_file(root / "lora_untrained" / ADAPTER_DIR / ADAPTER_WEIGHTS)
    assert len(adapter) == 2 * 2 * len(TINY_SHAPES)
    assert all(not t.any() for name, t in adapter.items() if ".lora_B." in name)
    assert all(t.abs().sum() > 0 for name, t in adapter.items() if ".lora_A." in name)


@pytest.mark.slow
def test_the_adapter_alone_is_trained_and_partitioned(runs):
    partition, full = (runs["results"][name].zero3_partition for name in ("lora", "full"))
    assert partition["trainable_numel"] == partition["trainable_local_numel"] == adapter_numel(16)
    assert partition["numel"] == full["numel"] + adapter_numel(16)
    assert full["trainable_numel"] == full["numel"]


@pytest.mark.slow
def test_an_online_reference_with_an_adapter_trains_as_the_precomputed_one(runs):
    """'online' with LoRA runs the same model with its adapter off (pi_t), no second copy."""
    results = runs["results"]
    assert results["lora_online"].reference_logps == []
    for key in ("train/loss", "train/chosen_logratio", "train/rejected_logratio"):
        assert history(results["lora_online"], key) == pytest.approx(history(results["lora"], key),
                                                                     rel=1e-4, abs=1e-5), key
    assert results["lora_online"].history[0]["train/chosen_logratio"] == pytest.approx(0.0, abs=1e-4)
    assert results["lora"].history[-1]["train/chosen_logratio"] != pytest.approx(0.0, abs=1e-2)


@pytest.mark.slow
def test_gradient_checkpointing_trains_the_adapter_as_without_it(runs):
    """Checkpointed layers recompute their forward in backward: the adapter inside them must still
    get its gradients (peft makes the inputs require grad), so the training is the same."""
    results = runs["results"]
    for key in ("train/loss", "train/chosen_logratio", "train/grad_norm"):
        assert history(results["lora"], key) == pytest.approx(history(results["lora_no_checkpointing"], key),
                                                              rel=1e-4, abs=1e-5), key
    assert history(results["lora"], "train/loss") != pytest.approx(history(results["full"], "train/loss"), rel=1e-3)


@pytest.mark.slow
def test_a_trained_adapter_is_published_alone(runs, tiny_policy_dir, tmp_path):
    checkpoint = runs["root"] / "lora"
    assert [p.name for p in checkpoint.iterdir()] == [ADAPTER_DIR]  # no full weights
    adapter = load_file(checkpoint / ADAPTER_DIR / ADAPTER_WEIGHTS)
    assert sum(t.numel() for t in adapter.values()) == adapter_numel(16)
    assert all(t.dim() == 2 and t.abs().sum() > 0 for t in adapter.values())
    config = json.loads((checkpoint / ADAPTER_DIR / ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (16, 32, "LORA")
    assert config["base_model_name_or_path"] == tiny_policy_dir
    assert sorted(config["target_modules"]) == sorted(TINY_SHAPES)
    # Merged into the base, it moves exactly the target modules' weights.
    write_merged(Policy(tiny_policy_dir, str(checkpoint / ADAPTER_DIR)), tmp_path / "merged")
    policy, merged = load_file(Path(tiny_policy_dir) / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    assert merged.keys() == policy.keys()
    changed = {name for name in policy if not torch.equal(policy[name], merged[name])}
    assert changed == {name for name in policy if name.split(".")[-2] in TINY_SHAPES}


@pytest.mark.slow
def test_an_adapter_that_does_not_fit_publishes_nothing(one_process_group, tiny_policy_dir, small_disk):  # noqa: F811
    """Room for less than the adapter (139 KiB at rank 16): the disk error names the checkpoint
    and the adapter's file, and what was published there stays whole."""
    disk = small_disk("64k")
    published = disk / "iter1"
    published.mkdir()
    (published / "config.json").write_text('{"published": true}')
    with pytest.raises(OSError, match=r"No space left on device|StorageFull") as failure:
        train(TrainConfig(**{**LORA_CFG, "max_steps": 1}), make_rows(8), tiny_policy_dir, str(published),
              device=one_process_group)
    assert str(published) in str(failure.value) and f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}" in str(failure.value)
    assert [p.name for p in disk.iterdir()] == ["iter1"], "a staging directory was left behind"
    assert [p.name for p in published.iterdir()] == ["config.json"]


@pytest.mark.slow
@pytest.mark.parametrize("loss", sorted(set(LOSSES) - {"sppo"}))
def test_every_loss_trains_an_adapter(loss, one_process_group, tiny_policy_dir, tmp_path):  # noqa: F811
    result = train(TrainConfig(**{**LORA_CFG, "loss": loss, "max_steps": 2, "eta": 10.0}), make_rows(8),
                   tiny_policy_dir, str(tmp_path / loss), device=one_process_group)
    assert [m["step"] for m in result.history] == [1, 2]
    assert all(math.isfinite(m["train/loss"]) and m["train/grad_norm"] > 0 for m in result.history)
    adapter = load_file(tmp_path / loss / ADAPTER_DIR / ADAPTER_WEIGHTS)
    assert all(t.any() for name, t in adapter.items() if ".lora_B." in name), "the adapter did not move"


# ---------------------------------------------------------------- two processes


@pytest.mark.slow
def test_two_zero3_processes_publish_what_one_does(one_process_group, tiny_policy_dir, tmp_path):  # noqa: F811
    """torchrun, 2 ranks x 2 pairs against 1 rank x 2 pairs x 2 accumulation steps: the same pairs
    in each step, so the same adapter, to float tolerance; each rank held half of it."""
    import subprocess
    import sys

    rows = make_rows(16)  # 4 steps of 4 pairs
    common = {**LORA_CFG, "per_device_batch_size": 2}
    one = train(TrainConfig(**{**common, "num_workers": 1, "gradient_accumulation_steps": 2}), rows,
                tiny_policy_dir, str(tmp_path / "one"), device=one_process_group)
    pairs_path = tmp_path / "pairs.parquet"
    pd.DataFrame(rows).to_parquet(pairs_path)
    script = tmp_path / "two.py"
    script.write_text(
        "import json, os, sys, torch\n"
        "from sppo.config import TrainConfig\nfrom sppo.training_data import read_pairs\n"
        "from sppo.training_recipe import train\n"
        "cfg = TrainConfig.model_validate_json(sys.argv[1])\n"
        "result = train(cfg, read_pairs(sys.argv[2]), sys.argv[3], sys.argv[4], device=torch.device('cpu'))\n"
        "with open(f\"{sys.argv[4]}-rank{os.environ['RANK']}.json\", 'w') as out:\n"
        "    json.dump({'history': result.history, 'partition': result.zero3_partition}, out)\n")
    cfg = TrainConfig(**{**common, "num_workers": 2, "gradient_accumulation_steps": 1})
    done = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2", str(script),
         cfg.model_dump_json(), str(pairs_path), tiny_policy_dir, str(tmp_path / "two")],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    ranks = [json.loads((tmp_path / f"two-rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["partition"]["world_size"] == 2
        partition = rank["partition"]
        assert partition["trainable_numel"] == adapter_numel(16) == 2 * partition["trainable_local_numel"]
    assert history(one, "train/loss") == pytest.approx([m["train/loss"] for m in ranks[0]["history"]], rel=1e-4)
    two_ranks, one_rank = (load_file(tmp_path / run / ADAPTER_DIR / ADAPTER_WEIGHTS) for run in ("two", "one"))
    assert two_ranks.keys() == one_rank.keys() and len(one_rank) == 2 * 2 * len(TINY_SHAPES)
    for key in one_rank:
        torch.testing.assert_close(two_ranks[key], one_rank[key], atol=1e-5, rtol=1e-4)
    moved = max(t.abs().max() for name, t in two_ranks.items() if ".lora_B." in name)  # B starts at 0
    assert moved > 1e-3, "the two ranks' tolerance is far below what training moved"


@pytest.mark.slow
def test_a_continued_adapter_starts_at_pi_t_and_publishes_the_base_plus_one_adapter(runs, tiny_policy_dir):
    """pi_1 = the base + adapter_1; the next iteration continues adapter_1: its reference is
    log pi_1 (what the merged pi_1 gives), its first step's log-ratios 0, and what it publishes
    is the same base plus one adapter, adapter_2."""
    results, root = runs["results"], runs["root"]
    torch.testing.assert_close(torch.tensor(results["continued"].reference_logps),
                               torch.tensor(results["merged_pi_1"].reference_logps), atol=1e-5, rtol=1e-6)
    assert not torch.allclose(torch.tensor(results["continued"].reference_logps),  # pi_1 is not pi_0
                              torch.tensor(results["lora"].reference_logps), atol=1e-3)
    assert results["continued"].history[0]["train/chosen_logratio"] == pytest.approx(0.0, abs=1e-5)
    config = json.loads((root / "continued" / ADAPTER_DIR / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_policy_dir and config["r"] == 16
    adapter_1 = load_file(root / "lora" / ADAPTER_DIR / ADAPTER_WEIGHTS)
    adapter_2 = load_file(root / "continued" / ADAPTER_DIR / ADAPTER_WEIGHTS)
    assert adapter_1.keys() == adapter_2.keys() and any(not torch.equal(adapter_1[k], adapter_2[k]) for k in adapter_1)


@pytest.mark.slow
def test_an_online_reference_continuing_an_adapter_is_pi_ts_frozen_adapter(runs):
    """'online' with a continued adapter: pi_t's adapter frozen beside the trained one (no second
    model), giving the precomputed reference's training step for step."""
    results = runs["results"]
    assert results["continued_online"].reference_logps == []
    for key in ("train/loss", "train/chosen_logratio", "train/rejected_logratio"):
        assert history(results["continued_online"], key) == pytest.approx(history(results["continued"], key),
                                                                          rel=1e-4, abs=1e-5), key


def test_an_adapter_is_continued_only_as_it_was_trained(tiny_policy_dir, tmp_path):
    saved = add_adapter(base_model(tiny_policy_dir), LoraConfig(rank=16, target_modules=["q_proj", "v_proj"]))
    saved.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"cannot be continued: train\.lora\.rank is 8, the adapter's 16; "
                                         r"train\.lora\.target_modules"):
        add_adapter(base_model(tiny_policy_dir), LoraConfig(rank=8), str(tmp_path / "adapter"))
    continued = add_adapter(base_model(tiny_policy_dir), LoraConfig(rank=16, target_modules=["v_proj", "q_proj"]),
                            str(tmp_path / "adapter"))
    assert sorted(n for n, p in continued.named_parameters() if p.requires_grad) == sorted(
        n for n, p in saved.named_parameters() if p.requires_grad)


def test_preflight_names_a_target_module_the_policy_does_not_have(tiny_policy_dir):
    from sppo.preflight import PreflightError, check_lora_targets

    check_lora_targets(list(LORA_TARGET_MODULES), tiny_policy_dir)
    with pytest.raises(PreflightError, match=r"train\.lora\.target_modules: qkv_proj name no layer of policy\.path "
                                             r".*\(its matrices: .*down_proj.*q_proj"):
        check_lora_targets(["q_proj", "qkv_proj"], tiny_policy_dir)
    check_lora_targets(["qkv_proj"], "someone/not-on-this-machine")  # checked when training starts
