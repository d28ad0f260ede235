"""Model cards (sppo.model_card) and `python -m sppo.export`, on a run directory laid out by the
package's own writers around the real tiny policy checkpoint."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, ModelCardData

from sppo.config import RunConfig, load_config
from sppo.manifest import RunManifest
from sppo.policy import ADAPTER_DIR
from sppo.model_card import (CARD_FILE, IterationResult, build_card, card_summary, hyperparameters, registry_tags,
                             software_versions, write_card)
from sppo.run_directory import RunDirectory
from sppo.storage import atomic_write_text

REPO = Path(__file__).resolve().parents[1]


def metrics_of(t: int, evaluated: bool = True, length_controlled: bool = True) -> dict[str, float]:
    """Iteration t's metrics. length_controlled False: as the evaluation logged them before it fitted LC."""
    found = {"train/final_loss": 10.0 / t, "pairs/rows": 48.0}
    if evaluated:
        base, prev = 0.5 + 0.1 * t, 0.55 + 0.01 * t
        found.update({"eval/win_rate_vs_base": base, "eval/win_rate_vs_base_ci_low": base - 0.05,
                      "eval/win_rate_vs_base_ci_high": base + 0.05, "eval/win_rate_vs_prev": prev,
                      "eval/win_rate_vs_prev_ci_low": prev - 0.06, "eval/win_rate_vs_prev_ci_high": prev + 0.06,
                      "eval/prompts": 32.0, "eval/mean_response_chars": 40.0 + t})
    if evaluated and length_controlled:
        lc = 0.45 + 0.05 * t  # iteration 1's interval reaches below 0.5
        found.update({"eval/lc_win_rate_vs_base": lc, "eval/lc_win_rate_vs_base_ci_low": lc - 0.04,
                      "eval/lc_win_rate_vs_base_ci_high": lc + 0.04, "eval/mean_response_tokens": 20.0 + t,
                      "eval/base_mean_response_chars": 40.0, "eval/base_mean_response_tokens": 20.0})
    return found


def test_card_front_matter_round_trips_and_holds_the_runs_values(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny-pairrm.yaml", {"tracking.license": "apache-2.0"})
    results = [IterationResult(t, metrics_of(t)) for t in (1, 2, 3)]
    card = build_card(cfg, 3, results, {"torch": "2.13.0"})
    path = tmp_path / CARD_FILE
    card.save(path)

    loaded = ModelCard.load(path)
    assert loaded.data.to_dict() == card.data.to_dict()
    assert ModelCardData(**loaded.data.to_dict()).to_dict() == loaded.data.to_dict()
    data = loaded.data
    assert (data.base_model, data.datasets, data.license) == (cfg.policy.path, [cfg.prompts.source], "apache-2.0")
    assert data.pipeline_tag == "text-generation" and {"sppo", "alignment"} <= set(data.tags)
    found = {r.metric_type: (r.metric_value, r.metric_config) for r in data.eval_results}
    expected = metrics_of(3)
    for key in ("lc_win_rate_vs_base", "lc_win_rate_vs_base_ci_low", "lc_win_rate_vs_base_ci_high",
                "win_rate_vs_base", "win_rate_vs_base_ci_low", "win_rate_vs_base_ci_high", "win_rate_vs_prev",
                "win_rate_vs_prev_ci_low", "win_rate_vs_prev_ci_high", "mean_response_chars"):
        value, judge = found[key]
        assert value == pytest.approx(expected[f"eval/{key}"], abs=1e-4)
        assert judge == "judge: PairRM (llm-blender) `tiny:pairrm`"

    text = loaded.text
    # Every iteration so far as the published cards give them (LC, raw, mean length), the base's
    # length, the champion marked and said why, links to the other iterations' cards, and the hyperparameters.
    assert "| base | - | - | 40 (20) | - | - | |" in text
    assert "| 1 | 0.500 [0.46, 0.54] | 0.600 [0.55, 0.65] | 41 (21) | 0.560 [0.50, 0.62] | 10 |" in text
    assert "| 2 | 0.550 [0.51, 0.59] | 0.700 [0.65, 0.75] | 42 (22) |" in text
    assert "| 3 (champion) | 0.600 [0.56, 0.64] | 0.800 [0.75, 0.85] | 43 (23) |" in text
    assert ("Champion: iteration 3 has the highest length-controlled win rate vs the base, 0.600 [0.56, 0.64], of "
            "the iterations whose interval lies above 0.5.") in text
    # Iteration 3's gain over the base, 0.3, is 0.1 at equal length: mostly length.
    assert ("Iteration 3: the gain over the base is mostly length: by the evaluation judge, win rate 0.800 [0.75, "
            "0.85] but 0.600 [0.56, 0.64] at equal length, with answers of 43 characters against the base's "
            "40.") in text
    assert "Iteration 1: the gain" in text and "training judge" not in text
    assert "[iter-1](../../iter-1/checkpoint/README.md)" in text and "| 3 (champion) |" in text
    for name, value in hyperparameters(cfg):
        assert f"- {name}: {value}\n" in text
    assert f"- num_devices: {cfg.train.num_workers}\n" in text and f"- eta: {cfg.train.eta}\n" in text
    assert f"- learning_rate: {cfg.train.learning_rate}\n" in text
    assert "- torch 2.13.0" in text and "arXiv:2405.00675" in text
    assert f"K = {cfg.sampling.k}" in text and "Iteration 3 of 3" in card_summary(loaded)


def test_a_run_without_held_out_evaluation_says_so_and_reports_no_results():
    cfg = load_config(REPO / "configs" / "tiny-dpo.yaml")
    card = build_card(cfg, 1, [IterationResult(1, metrics_of(1, evaluated=False))], software_versions())
    section = card.text.split("## Iterations of this run")[1].split("## Training")[0]
    assert "no held-out evaluation" in section and "win rate vs" not in section
    assert card.data.eval_results is None and card.data.license is None
    assert "- beta: 0.1\n" in card.text and "arXiv:2305.18290" in card.text and "dpo" in card.data.tags


def test_a_card_shows_both_judges_and_the_registered_champion():
    cfg = load_config(REPO / "configs" / "tiny.yaml", {"eval.judge.kind": "pairrm",
                                                       "judge.rule.weights": {"letters": 1.0, "length": 5.0}})
    results = []
    for t in (1, 2):
        m = metrics_of(t)
        m.update({f"eval/training_judge/{k[5:]}": v + 0.1 for k, v in m.items() if "win_rate_vs_base" in k})
        results.append(IterationResult(t, m))
    text = build_card(cfg, 2, results, {}).text
    assert "judged by PairRM (llm-blender) `tiny:pairrm`" in text
    assert "- Judge: a rule judge (letters 1, length 5);" in text
    assert "By the training judge, a rule judge (letters 1, length 5), which trained the policy:" in text
    assert "| 2 | 0.650 [0.61, 0.69] | 0.800 [0.75, 0.85] |" in text
    assert "Champion (`sppo-tiny@champion`): iteration 2 has" in text and "| 2 (champion) |" in text


def test_a_card_of_iterations_evaluated_before_length_control_names_no_champion():
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    results = [IterationResult(1, metrics_of(1, length_controlled=False)), IterationResult(2, metrics_of(2))]
    text = build_card(cfg, 2, results, {}).text
    assert "| 1 | - | 0.600 [0.55, 0.65] | 41 |" in text and "| base | - | - | 40 (20) |" in text
    assert ("Champion (`sppo-tiny@champion`): iteration 2 has the highest length-controlled win rate vs the base, "
            "0.550 [0.51, 0.59], of the iterations whose interval lies above 0.5; iteration(s) 1 have no "
            "length-controlled win rate (no held-out evaluation, or one from before sppo computed it) and are not "
            "candidates.") in text
    only_old = build_card(cfg, 1, [IterationResult(1, metrics_of(1, length_controlled=False))], {}).text
    assert "Champion: no iteration has a length-controlled win rate vs the base; iteration(s) 1 have" in only_old
    assert "(champion)" not in only_old


def test_a_card_needs_every_iteration_up_to_its_own():
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    with pytest.raises(ValueError, match=r"iterations 1..2, got \[2\]"):
        build_card(cfg, 2, [IterationResult(2, metrics_of(2))], {})


def test_registry_tags_are_the_win_rates():
    assert registry_tags(RunConfig(), {**metrics_of(1), "train/final_loss": 1.0, "eval/training_judge/win_rate_vs_base": 0.9}) == {
        "lc_win_rate_vs_base": "0.5000", "lc_win_rate_vs_base_ci_high": "0.5400",
        "lc_win_rate_vs_base_ci_low": "0.4600",
        "win_rate_vs_base": "0.6000", "win_rate_vs_base_ci_high": "0.6500", "win_rate_vs_base_ci_low": "0.5500",
        "win_rate_vs_prev": "0.5600", "win_rate_vs_prev_ci_high": "0.6200", "win_rate_vs_prev_ci_low": "0.5000"}


# ---------------------------------------------------------------- python -m sppo.export


@pytest.fixture
def run_dir(tmp_path, tiny_policy_dir):
    """An output directory with iteration 1 finished (checkpoint = the tiny policy, card written)
    and iteration 2 trained but not tracked, as the controller's own writers leave them."""
    out = tmp_path / "run"
    cfg = load_config(REPO / "configs" / "tiny.yaml", {"output_dir": str(out), "iterations": 2})
    manifest = RunManifest(RunDirectory(out))
    atomic_write_text(out / "config.yaml", cfg.to_yaml())
    for t in (1, 2):
        it = RunDirectory(out).iteration(t)
        shutil.copytree(tiny_policy_dir, it.checkpoint)
        atomic_write_text(it.train_history, "[]")
        it.add_metrics(metrics_of(t))
        manifest.record_stage(t, "training", cfg, {"checkpoint": it.checkpoint}, "run-id")
    write_card(cfg, RunDirectory(out).iteration(1))
    manifest.record_stage(1, "tracking", cfg, {}, "run-id")
    return out


def export(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sppo.export", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_export_copies_the_checkpoint_and_its_card_for_from_pretrained(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = tmp_path / "export"
    done = export("--output-dir", str(run_dir), "--iteration", "1", "--to", str(target))
    assert done.returncode == 0, done.stderr
    assert f"exported iteration 1 to {target}" in done.stdout
    source = RunDirectory(run_dir).iteration(1).checkpoint
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in source.iterdir())
    assert (target / CARD_FILE).read_text() == (source / CARD_FILE).read_text()
    assert ModelCard.load(target / CARD_FILE).data.base_model == "tiny:policy"
    assert AutoModelForCausalLM.from_pretrained(target).num_parameters() > 0
    assert AutoTokenizer.from_pretrained(target).chat_template
    assert [p.name for p in tmp_path.iterdir() if ".export-" in p.name] == []


def test_the_card_and_the_export_follow_the_umask(umask, run_dir, tmp_path):
    from sppo.export import export_iteration

    checkpoint = RunDirectory(run_dir).iteration(1).checkpoint
    assert (checkpoint / CARD_FILE).stat().st_mode & 0o777 == 0o666 & ~umask  # written by write_card
    for path in checkpoint.iterdir():
        path.chmod(0o600)  # a checkpoint from a private job: its modes are not the export's
    target = export_iteration(run_dir, 1, tmp_path / "export")
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in target.iterdir()} == {
        p.name: oct(0o666 & ~umask) for p in checkpoint.iterdir()}


@pytest.mark.parametrize("case", ["unfinished", "missing checkpoint", "not a run", "target not empty",
                                  "offline hub", "no hub token"])
def test_export_refuses_in_one_line_and_overwrites_nothing(run_dir, tmp_path, case):
    target = tmp_path / "export"
    args = ["--output-dir", str(run_dir), "--iteration", "1", "--to", str(target)]
    env = {}
    if case == "unfinished":
        args[3], expected = "2", "--iteration 2: iteration 2 of"
    elif case == "missing checkpoint":
        (RunDirectory(run_dir).iteration(1).checkpoint / "config.json").unlink()
        expected = "--iteration 1: the checkpoint"
    elif case == "not a run":
        args[1], expected = str(tmp_path), f"--output-dir: {tmp_path} holds no run"
    elif case == "target not empty":
        target.mkdir()
        (target / "keep.txt").write_text("mine")
        expected = f"--to: {target} exists and is not an empty directory"
    elif case == "offline hub":
        args += ["--push-to-hub", "someone/model"]
        env, expected = {"HF_HUB_OFFLINE": "1"}, "--push-to-hub: the Hugging Face hub is switched off here"
    else:
        args += ["--push-to-hub", "someone/model"]
        env = {"HF_HUB_OFFLINE": "0", "HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf")}
        expected = "--push-to-hub: no Hugging Face token"
    done = export(*args, **env)
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: {expected}") and done.stderr.count("\n") == 1, done.stderr
    if case == "target not empty":
        assert [p.name for p in target.iterdir()] == ["keep.txt"] and (target / "keep.txt").read_text() == "mine"
    else:
        assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if ".export-" in p.name] == []


@pytest.fixture
def lora_run_dir(tmp_path, tiny_policy_dir):
    """An output directory with iteration 1 finished as configs/tiny-lora.yaml publishes one: its
    checkpoint the adapter alone (rank 8 on q_proj and v_proj, B moved off 0) and the card."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora-run"
    cfg = load_config(REPO / "configs" / "tiny-lora.yaml", {"output_dir": str(out), "iterations": 1})
    atomic_write_text(out / "config.yaml", cfg.to_yaml())
    it = RunDirectory(out).iteration(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_policy_dir, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5, generator=torch.Generator().manual_seed(len(name)))
    model.save_pretrained(it.checkpoint / ADAPTER_DIR)
    atomic_write_text(it.train_history, "[]")
    it.add_metrics(metrics_of(1))
    manifest = RunManifest(RunDirectory(out))
    manifest.record_stage(1, "training", cfg, {"checkpoint": it.checkpoint}, "run-id")
    write_card(cfg, it)
    manifest.record_stage(1, "tracking", cfg, {}, "run-id")
    return out


def test_a_lora_iteration_publishes_an_adapter_card_that_names_the_base(lora_run_dir):
    checkpoint = RunDirectory(lora_run_dir).iteration(1).checkpoint
    assert sorted(p.name for p in checkpoint.iterdir()) == [CARD_FILE, ADAPTER_DIR]  # no full weights
    card = ModelCard.load(checkpoint / CARD_FILE)
    assert (card.data.library_name, card.data.base_model) == ("peft", "tiny:policy") and "lora" in card.data.tags
    assert "A LoRA adapter on `tiny:policy`" in card.text and "- lora_rank: 16" in card.text


def test_registry_tags_of_an_adapter_name_its_base():
    cfg = load_config(REPO / "configs" / "tiny-lora.yaml")
    tags = registry_tags(cfg, metrics_of(1))
    assert (tags["base_model"], tags["library_name"], tags["adapter"]) == ("tiny:policy", "peft", "lora rank 16")
    assert tags["win_rate_vs_base"] == "0.6000"


def test_export_of_an_adapter_is_peft_shaped_and_names_the_base(lora_run_dir, run_dir, tmp_path, tiny_policy_dir):
    """--adapter: the iteration's adapter/ alone, its config and card naming the base as the run's
    config does, loadable by peft on the base; a full-weights iteration is refused."""
    import json

    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    refused = export("--output-dir", str(run_dir), "--iteration", "1", "--to", str(tmp_path / "none"), "--adapter")
    assert refused.returncode == 2 and refused.stderr.startswith("error: --adapter: iteration 1 was not trained "
                                                                 "with train.lora"), refused.stderr
    adapter_dir = RunDirectory(lora_run_dir).iteration(1).checkpoint / ADAPTER_DIR
    target = tmp_path / "adapter"
    done = export("--output-dir", str(lora_run_dir), "--iteration", "1", "--to", str(target), "--adapter")
    assert done.returncode == 0, done.stderr
    assert f"PeftModel.from_pretrained(base, '{target}')" in done.stdout
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "adapter_config.json",
                                                        "adapter_model.safetensors"]
    config = json.loads((target / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny:policy" and config["r"] == 8
    saved, exported = load_file(adapter_dir / "adapter_model.safetensors"), load_file(target / "adapter_model.safetensors")
    assert saved.keys() == exported.keys() and all(torch.equal(saved[k], exported[k]) for k in saved)
    card = ModelCard.load(target / CARD_FILE)
    assert (card.data.library_name, card.data.base_model) == ("peft", "tiny:policy") and "lora" in card.data.tags
    base = AutoModelForCausalLM.from_pretrained(tiny_policy_dir, dtype=torch.float32)
    assert PeftModel.from_pretrained(base, target).peft_config["default"].r == 8


def test_export_of_a_lora_iteration_merges_its_adapter_into_the_base(lora_run_dir, tmp_path, tiny_policy_dir):
    """Without --adapter: one full model, the base's names, dtype, tokenizer and chat template,
    whose weights are peft's merge of base + adapter and whose outputs are base + adapter's."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = tmp_path / "merged"
    done = export("--output-dir", str(lora_run_dir), "--iteration", "1", "--to", str(target))
    assert done.returncode == 0, done.stderr
    assert f"from_pretrained('{target}')" in done.stdout
    assert not (target / ADAPTER_DIR).exists() and not (target / "adapter_config.json").exists()
    base_weights = load_file(Path(tiny_policy_dir) / "model.safetensors")
    merged_weights = load_file(target / "model.safetensors")
    assert merged_weights.keys() == base_weights.keys()
    assert {merged_weights[k].dtype for k in merged_weights} == {base_weights[k].dtype for k in base_weights}
    changed = {k for k in base_weights if not torch.equal(base_weights[k], merged_weights[k])}
    assert changed and all(k.split(".")[-2] in ("q_proj", "v_proj") for k in changed)
    adapter = RunDirectory(lora_run_dir).iteration(1).checkpoint / ADAPTER_DIR
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_policy_dir, dtype=torch.float32), adapter).eval()
    merged = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(target)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_policy_dir).chat_template
    ids = tokenizer("the merged model is the base plus its adapter", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, atol=1e-4, rtol=1e-4)
    card = ModelCard.load(target / CARD_FILE)
    assert (card.data.library_name, card.data.base_model) == ("transformers", "tiny:policy")
    assert "lora" not in card.data.tags
