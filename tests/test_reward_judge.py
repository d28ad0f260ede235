"""Reward-model judging: the Bradley-Terry matrix, the tiny reward model scored batched vs one
conversation at a time, bad models named, the judge-kind dispatch, and the Ray actor shell."""

from __future__ import annotations

import json
import math
import shutil
import typing

import numpy as np
import pytest

from sppo.config import JudgeConfig
from sppo.judging import JUDGES
from sppo.judging.reward_model import RewardModelJudge, bradley_terry_matrix, judge_candidates
from sppo.pairs import select_pair
from sppo.roles import judging_role
from sppo.tiny.policy import bundled_prompts
from tests.test_judging import _wait_for_free_cpus

PROMPTS = bundled_prompts()[:3]
# Different lengths, so batches need padding; one long enough to be cut at the token limit.
CANDIDATES = [
    ["Because of Rayleigh scattering.", "Blue.", "The sky " * 80, "Short light scatters more than long light."],
    ["It pumps heat out.", "A compressor moves heat from inside to outside the box.", "Magic!", "Cold air."],
    ["Onions release a gas that irritates the eyes.", "Sulfur.", "They are sad.", "Chemistry " * 5],
]
CFG = JudgeConfig(kind="reward_model", path="tiny:reward", batch_size=5, source_max_length=64,
                  candidate_max_length=32)


@pytest.fixture(scope="module")
def tiny_reward_dir() -> str:
    from sppo.tiny import resolve_model

    return resolve_model("tiny:reward")


@pytest.fixture(scope="module")
def judge(tiny_reward_dir) -> RewardModelJudge:
    return RewardModelJudge(tiny_reward_dir, CFG)


def test_bradley_terry_by_hand():
    # r = (0, ln 3, 0): P_01 = sigmoid(-ln 3) = 1 / (1 + 3) = 1/4, P_10 = 3/4, P_02 = 1/2.
    p = bradley_terry_matrix(np.array([0.0, math.log(3.0), 0.0]))
    np.testing.assert_allclose(p, [[0.5, 0.25, 0.5], [0.75, 0.5, 0.75], [0.5, 0.25, 0.5]], rtol=0, atol=1e-12)


def test_bradley_terry_pairs_are_max_and_min_reward():
    # Row means of sigmoid(r_i - r_j) rise with r_i, so the SPPO pair rule (highest / lowest mean
    # win probability) picks exactly the max- and min-reward candidates.
    rng = np.random.default_rng(0)
    for _ in range(200):
        rewards = rng.normal(size=int(rng.integers(2, 9))) * rng.choice([0.1, 1.0, 10.0])
        pair = select_pair(bradley_terry_matrix(rewards))
        assert (pair.chosen, pair.rejected) == (int(np.argmax(rewards)), int(np.argmin(rewards)))
        assert pair.chosen_probs == pytest.approx(1 / (1 + math.exp(rewards.min() - rewards.max())))


def test_every_judge_kind_has_a_judge():
    kinds = typing.get_args(JudgeConfig.model_fields["kind"].annotation)
    assert "reward_model" in kinds and set(kinds) == set(JUDGES)
    assert JUDGES["reward_model"] is judge_candidates


def test_rewards_batched_equal_one_at_a_time(judge, tiny_reward_dir):
    """Batched, length-sorted, right-padded scoring equals the model run on each conversation alone."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_dir).eval()
    limit = CFG.source_max_length + CFG.candidate_max_length
    got = judge.rewards(PROMPTS, CANDIDATES)
    cut = 0
    for prompt, cands, rewards in zip(PROMPTS, CANDIDATES, got, strict=True):
        assert rewards.shape == (len(cands),)
        for cand, reward in zip(cands, rewards, strict=True):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": cand}], tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            cut += len(ids) > limit
            with torch.no_grad():
                alone = model(input_ids=torch.tensor([ids[:limit]])).logits[0, 0].item()
            assert reward == pytest.approx(alone, abs=1e-5)
    assert cut == 1  # the long candidate was judged on its first `limit` tokens only
    # The tiny model's rewards are spread, not all equal: the pair rule has something to choose.
    assert np.ptp(np.concatenate(got)) > 0.1


def test_win_matrices_are_bradley_terry_of_the_rewards(judge):
    rewards = judge.rewards(PROMPTS, CANDIDATES)
    for matrix, r in zip(judge.win_matrices(PROMPTS, CANDIDATES), rewards, strict=True):
        np.testing.assert_allclose(matrix, bradley_terry_matrix(r), rtol=0, atol=1e-12)
        np.testing.assert_allclose(matrix + matrix.T, 1.0, atol=1e-12)


def test_judge_rejects_malformed_inputs(judge):
    with pytest.raises(ValueError, match="2 prompts but 1 candidate lists"):
        judge.rewards(PROMPTS[:2], CANDIDATES[:1])
    with pytest.raises(ValueError, match="prompt 0 has 1 candidates"):
        judge.rewards(PROMPTS[:1], [["only one"]])


def test_judge_names_a_model_that_is_not_a_scalar_reward_model(tmp_path, tiny_reward_dir):
    from transformers import AutoModelForSequenceClassification

    two_labels = tmp_path / "two-labels"
    shutil.copytree(tiny_reward_dir, two_labels)  # tokenizer and chat template; model replaced below
    AutoModelForSequenceClassification.from_pretrained(
        tiny_reward_dir, num_labels=2, ignore_mismatched_sizes=True).save_pretrained(two_labels)
    with pytest.raises(ValueError, match=r"outputs 2 logits per sequence and no `score`"):
        RewardModelJudge(str(two_labels), CFG).rewards(PROMPTS[:1], CANDIDATES[:1])

    no_template = tmp_path / "no-template"
    shutil.copytree(tiny_reward_dir, no_template)
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="has no chat template"):
        RewardModelJudge(str(no_template), CFG)


@pytest.mark.slow
def test_judge_candidates_in_a_ray_actor(ray_cluster, tiny_reward_dir, judge):
    free = ray_cluster.available_resources().get("CPU", 0.0)
    matrices = JUDGES["reward_model"](tiny_reward_dir, PROMPTS, CANDIDATES, CFG, judging_role(CFG, timeout_s=300))
    for got, expected in zip(matrices, judge.win_matrices(PROMPTS, CANDIDATES), strict=True):
        assert got.shape == (4, 4) and got.flags.writeable
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    _wait_for_free_cpus(ray_cluster, free)


@pytest.mark.slow
def test_judge_candidates_reports_a_failed_judge(ray_cluster, tmp_path):
    free = ray_cluster.available_resources().get("CPU", 0.0)
    cfg = CFG.model_copy(update={"max_restarts": 0})
    with pytest.raises(RuntimeError, match=r"stage 'judging': the reward-model judge \(num_cpus=.*\) failed") as failure:
        judge_candidates(str(tmp_path), PROMPTS, CANDIDATES, cfg, judging_role(cfg, timeout_s=300))
    assert f"reward model directory {tmp_path}: no config.json" in str(failure.value)
    _wait_for_free_cpus(ray_cluster, free)
