"""Judging stage: the score/probability math, parity with llm-blender's own `Blender.rank` on
the tiny PairRM, batching, truncation, the tiny PairRM's determinism, and the Ray actor shell."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest

from sppo.config import JudgeConfig
from sppo.roles import judging_role
from sppo.judging.pairrm import (
    PairRMJudge,
    estimate_win_matrix,
    judge_candidates,
    ordered_pairs,
    pair_scores,
    pairwise_win_matrix,
    win_matrix,
)
from sppo.tiny.policy import bundled_prompts


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + np.exp(-x))


# ---------------------------------------------------------------- pure core


def test_ordered_pairs_are_row_major_and_complete():
    assert ordered_pairs(2) == [(0, 1), (1, 0)]
    assert ordered_pairs(3) == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    assert len(ordered_pairs(5)) == 20


def test_pair_scores_k2_by_hand():
    # c01 = 1.0, c10 = -0.5; the diagonal (9.0) must be ignored.
    # s0 = ((c01 - c10) + 0) / K = 1.5 / 2 = 0.75;  s1 = ((c10 - c01) + 0) / 2 = -0.75
    c = np.array([[9.0, 1.0], [-0.5, 9.0]])
    np.testing.assert_allclose(pair_scores(c), [0.75, -0.75], rtol=0, atol=1e-12)


def test_pair_scores_k3_by_hand():
    # Divided by K = 3 (llm-blender's mean includes the zero diagonal), not K - 1:
    # s0 = ((c01 - c10) + (c02 - c20)) / 3 = ((2 - 0) + (1 - 3)) / 3 = 0
    # s1 = ((c10 - c01) + (c12 - c21)) / 3 = ((0 - 2) + (-1 - 1)) / 3 = -4/3
    # s2 = ((c20 - c02) + (c21 - c12)) / 3 = ((3 - 1) + (1 + 1)) / 3 = 4/3
    c = np.array([[0.0, 2.0, 1.0], [0.0, 0.0, -1.0], [3.0, 1.0, 0.0]])
    np.testing.assert_allclose(pair_scores(c), [0.0, -4 / 3, 4 / 3], rtol=0, atol=1e-12)


def test_win_matrix_by_hand():
    # K = 2, s = (0.75, -0.75): P01 = sigmoid(1.5) = 0.8175744761936437
    np.testing.assert_allclose(
        win_matrix(np.array([0.75, -0.75])),
        [[0.5, 0.8175744761936437], [0.18242552380635635, 0.5]],
        rtol=0, atol=1e-12,
    )
    # K = 3, s = (0, -4/3, 4/3): P01 = sigmoid(4/3) = 0.791391472673955,
    # P02 = sigmoid(-4/3) = 0.20860852732604496, P12 = sigmoid(-8/3) = 0.06496916912866407
    expected = [
        [0.5, 0.791391472673955, 0.20860852732604496],
        [0.208608527326045, 0.5, 0.06496916912866407],
        [0.79139147267396, 0.935030830871336, 0.5],
    ]
    np.testing.assert_allclose(win_matrix(np.array([0.0, -4 / 3, 4 / 3])), expected, rtol=0, atol=1e-12)


def test_win_matrix_properties():
    rng = np.random.default_rng(0)
    for scores in (rng.normal(size=5), rng.normal(scale=30, size=7), np.array([800.0, -800.0, 0.0])):
        p = win_matrix(scores)
        assert np.isfinite(p).all()
        np.testing.assert_allclose(p + p.T, 1.0, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(np.diag(p), 0.5)
        assert ((p >= 0) & (p <= 1)).all()
        # a higher score wins more often against the field
        assert np.array_equal(np.argsort(p.mean(axis=1)), np.argsort(scores))


def test_pure_core_rejects_bad_shapes():
    with pytest.raises(ValueError, match="K x K"):
        pair_scores(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="vector"):
        win_matrix(np.zeros((2, 2)))


# ---------------------------------------------------------------- tiny PairRM


def _digest(model_dir: Path) -> str:
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for name, tensor in sorted(load_file(model_dir / "model.safetensors").items()):
        h.update(name.encode())
        h.update(tensor.numpy().tobytes())
    h.update((model_dir / "tokenizer.json").read_bytes())
    return h.hexdigest()


def test_tiny_pairrm_build_is_deterministic(tmp_path, tiny_pairrm_dir):
    from sppo.tiny import pairrm

    pairrm.build(tmp_path / "a")
    pairrm.build(tmp_path / "b")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    # The cached copy was usually built by another process: token ids and weights must not
    # depend on the process (and a cache from an older builder would show up here).
    assert _digest(tmp_path / "a") == _digest(Path(tiny_pairrm_dir))


# ---------------------------------------------------------------- parity with llm-blender

# Small limits so that truncation is exercised: LONG_SOURCE exceeds SOURCE_MAX tokens and
# LONG_ANSWER exceeds what any candidate may keep (CANDIDATE_MAX plus half the source's slack).
SOURCE_MAX, CANDIDATE_MAX = 40, 16
SMALL = JudgeConfig(batch_size=1, source_max_length=SOURCE_MAX, candidate_max_length=CANDIDATE_MAX)
LONG_SOURCE = " ".join(bundled_prompts()[10:20])
LONG_ANSWER = "The answer involves physics, chemistry and a little luck. " * 12
PROMPTS = bundled_prompts()[:5] + [LONG_SOURCE]
CANDIDATES = [
    [
        prompt[::-1][:60],
        "Sure! " + prompt,
        "I do not know.",
        LONG_ANSWER if n in (1, 5) else "Water is wet; ice floats because it is less dense.",
        str(42 + n),
    ]
    for n, prompt in enumerate(PROMPTS)
]


@pytest.fixture(scope="module")
def blender(tiny_pairrm_dir):
    from sppo.judging.llm_blender_compat import import_llm_blender

    llm_blender = import_llm_blender()
    ranker = llm_blender.Blender(llm_blender.BlenderConfig(device="cpu", use_tqdm=False))
    ranker.loadranker(tiny_pairrm_dir)
    return ranker


@pytest.fixture(scope="module")
def judge(tiny_pairrm_dir):
    return PairRMJudge(tiny_pairrm_dir, SMALL)


def test_compat_shims_are_idempotent(blender):
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    from sppo.judging.llm_blender_compat import import_llm_blender

    shim = PreTrainedTokenizerBase.batch_encode_plus
    assert import_llm_blender() is import_llm_blender()
    assert PreTrainedTokenizerBase.batch_encode_plus is shim
    # transformers 4's contract, as llm-blender's collator uses it
    encoded = blender.ranker_tokenizer.batch_encode_plus(
        ["Explain why the sky", "Explain"], max_length=5, padding="max_length", truncation=True, return_tensors="pt"
    )
    assert encoded["input_ids"].shape == (2, 5)
    assert encoded["attention_mask"].sum(dim=1).tolist() == [5, 3]  # [CLS] ... [SEP], truncated / padded


def test_test_texts_exceed_the_limits(blender):
    tokenizer = blender.ranker_tokenizer
    assert len(tokenizer(LONG_SOURCE).input_ids) > 2 * SOURCE_MAX
    assert len(tokenizer(LONG_ANSWER).input_ids) > SOURCE_MAX + CANDIDATE_MAX


def test_scores_match_blender_rank(judge, blender):
    ours = np.stack([pair_scores(c) for c in judge.pair_logits(PROMPTS, CANDIDATES)])
    theirs = blender.rank(
        PROMPTS, CANDIDATES, return_scores=True, batch_size=1,
        source_max_length=SOURCE_MAX, candidate_max_length=CANDIDATE_MAX,
    )
    assert theirs.shape == (len(PROMPTS), 5)
    # The tiny judge tells candidates apart, so agreeing to 1e-4 is not trivial.
    assert theirs.std() > 0.1
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


def test_the_judge_runs_the_fused_attention_unless_told_not_to(judge, tiny_pairrm_dir):
    """The parity above is then a parity of the fused path; fused_attention=false keeps transformers'."""
    from sppo.judging.deberta_attention import FusedDisentangledSelfAttention

    def fused_layers(j):
        return sum(type(m) is FusedDisentangledSelfAttention for m in j.ranker.pretrained_model.modules())

    assert fused_layers(judge) == judge.ranker.pretrained_model.config.num_hidden_layers
    assert fused_layers(PairRMJudge(tiny_pairrm_dir, SMALL.model_copy(update={"fused_attention": False}))) == 0


def test_pair_scores_match_llm_blender_formula():
    from sppo.judging.llm_blender_compat import import_llm_blender

    import_llm_blender()
    from llm_blender.gpt_eval.utils import get_scores_from_cmps

    c = np.random.default_rng(1).normal(size=(5, 5))
    np.fill_diagonal(c, 0.0)  # llm-blender never fills the diagonal
    np.testing.assert_allclose(pair_scores(c), get_scores_from_cmps(c[None])[0], rtol=0, atol=1e-6)


def test_batching_does_not_change_logits(judge, tiny_pairrm_dir):
    one_by_one = judge.pair_logits(PROMPTS, CANDIDATES)
    # 7 does not divide the 120 pairs, and length-sorted batches mix prompts.
    batched = PairRMJudge(tiny_pairrm_dir, SMALL.model_copy(update={"batch_size": 7}))
    for a, b in zip(one_by_one, batched.pair_logits(PROMPTS, CANDIDATES), strict=True):
        assert np.abs(a).max() > 0.1
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)


def test_text_past_the_limits_is_not_judged(judge):
    prompts = [LONG_SOURCE + " Tail A.", LONG_SOURCE + " A different tail, much longer."]
    cands = [["Short.", LONG_ANSWER + "Ending one."], ["Short.", LONG_ANSWER + "Ending two, quite different."]]
    a, b = judge.pair_logits(prompts, cands)
    np.testing.assert_array_equal(a, b)
    # ...while text inside the limits is: the same pair with another short answer differs.
    (c,) = judge.pair_logits(prompts[:1], [["Long ago.", cands[0][1]]])
    assert not np.allclose(a, c)


def test_judge_rejects_malformed_inputs(judge):
    with pytest.raises(ValueError, match="2 prompts but 1 candidate lists"):
        judge.pair_logits(["a", "b"], [["x", "y"]])
    with pytest.raises(ValueError, match="prompt 1 has 1 candidates"):
        judge.pair_logits(["a", "b"], [["x", "y"], ["z"]])


def test_judge_names_the_model_it_cannot_load(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no config.json"):
        PairRMJudge(str(tmp_path), SMALL)
    # Neither a directory nor reachable on the hub (HF_HUB_OFFLINE=1).
    with pytest.raises(ValueError, match="PairRM judge: cannot load 'no-such-org/no-such-pairrm'"):
        PairRMJudge("no-such-org/no-such-pairrm", SMALL)


# ---------------------------------------------------------------- Ray shell


def _wait_for_free_cpus(ray, expected: float, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while ray.available_resources().get("CPU", 0.0) < expected:
        assert time.monotonic() < deadline, f"CPUs not released: {ray.available_resources()}"
        time.sleep(0.2)


@pytest.mark.slow
def test_judge_candidates_in_a_ray_actor(ray_cluster, tiny_pairrm_dir, judge):
    free = ray_cluster.available_resources().get("CPU", 0.0)
    cfg = SMALL.model_copy(update={"batch_size": 8})
    matrices = judge_candidates(tiny_pairrm_dir, PROMPTS, CANDIDATES, cfg, judging_role(cfg, timeout_s=300))
    assert len(matrices) == len(PROMPTS)
    for got, expected in zip(matrices, judge.win_matrices(PROMPTS, CANDIDATES), strict=True):
        assert got.shape == (5, 5)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    _wait_for_free_cpus(ray_cluster, free)


@pytest.mark.slow
def test_judge_candidates_timeout_names_role_and_stage(ray_cluster, tiny_pairrm_dir):
    free = ray_cluster.available_resources().get("CPU", 0.0)
    # The actor cannot even import llm-blender in half a second.
    with pytest.raises(TimeoutError, match="stage 'judging': the PairRM judge"):
        judge_candidates(tiny_pairrm_dir, PROMPTS, CANDIDATES, SMALL, judging_role(SMALL, timeout_s=0.5))
    _wait_for_free_cpus(ray_cluster, free)


@pytest.mark.slow
def test_judge_candidates_reports_a_failed_judge(ray_cluster, tmp_path):
    free = ray_cluster.available_resources().get("CPU", 0.0)
    with pytest.raises(RuntimeError, match=r"stage 'judging': the PairRM judge \(num_cpus=.*\) failed") as failure:
        judge_candidates(str(tmp_path), PROMPTS, CANDIDATES, SMALL, judging_role(SMALL, timeout_s=300))
    assert f"PairRM directory {tmp_path}: no config.json" in str(failure.value)
    _wait_for_free_cpus(ray_cluster, free)


def test_pairwise_estimator_by_hand():
    # c_01 = 2 (0 beats 1 when shown first), c_10 = 0 (no preference when 1 is shown first):
    # P_01 = 1/2 [sigmoid(2) + 1 - sigmoid(0)] = 1/2 [0.880797 + 0.5] = 0.690399; P_10 = 1 - P_01.
    p = pairwise_win_matrix(np.array([[0.0, 2.0], [0.0, 0.0]]))
    np.testing.assert_allclose(p, [[0.5, 0.690399], [0.309601, 0.5]], atol=1e-6)
    rng = np.random.default_rng(3)
    q = pairwise_win_matrix(rng.normal(scale=5, size=(5, 5)))
    np.testing.assert_allclose(q + q.T, np.ones((5, 5)), atol=1e-12)
    assert np.all(np.diag(q) == 0.5)
    with pytest.raises(ValueError, match="judge.estimator"):
        estimate_win_matrix(np.zeros((2, 2)), "bogus")


def test_pairwise_estimate_ignores_the_other_candidates(judge):
    # Same prompt and first two candidates; a different third candidate.
    prompt = PROMPTS[0]
    a = judge.pair_logits([prompt], [["Paris is the capital.", "I do not know.", "Blue."]])[0]
    b = judge.pair_logits([prompt], [["Paris is the capital.", "I do not know.", "A long, unrelated answer about cats."]])[0]
    pairwise = [pairwise_win_matrix(m)[0, 1] for m in (a, b)]
    reference = [estimate_win_matrix(m, "reference")[0, 1] for m in (a, b)]
    assert pairwise[0] == pytest.approx(pairwise[1], abs=1e-6)
    # The reference estimator's P_01 moves with candidate 2, the open issue the pairwise one avoids.
    assert abs(reference[0] - reference[1]) > 1e-4


@pytest.mark.slow
def test_a_killed_judge_is_restarted_and_the_call_retried(ray_cluster, tiny_pairrm_dir, judge):
    """SIGKILL the judge actor mid-judging: Ray restarts it (judge.max_restarts) and retries the
    call, so every prompt still gets exactly its own matrix."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from tests.processes import wait_for_titled, wait_gone

    free = ray_cluster.available_resources().get("CPU", 0.0)
    repeats = 60  # ~7,000 ordered pairs at batch size 1: seconds of judging to land the kill in
    prompts, candidates = PROMPTS * repeats, CANDIDATES * repeats
    with ThreadPoolExecutor(1) as pool:
        judging = pool.submit(judge_candidates, tiny_pairrm_dir, prompts, candidates, SMALL,
                              judging_role(SMALL, timeout_s=600))
        try:
            victim = wait_for_titled([os.getpid()], "ray::PairRMJudgeActor.win_matrices",
                                     still_running=lambda: not judging.done())
        except AssertionError as err:
            raise AssertionError(f"{err}; judging ended with {judging.exception()!r}") from err
        victim.kill()
        assert not wait_gone([victim], timeout_s=30)
        matrices = judging.result(timeout=600)
    assert len(matrices) == len(prompts)
    for got, expected in zip(matrices, judge.win_matrices(PROMPTS, CANDIDATES) * repeats, strict=True):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    _wait_for_free_cpus(ray_cluster, free)
