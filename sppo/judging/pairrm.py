"""PairRM judging: a K x K win-probability matrix per prompt, as the reference SPPO computes it.

c_ij is PairRM's logit for "candidate i beats candidate j" with i shown first. llm-blender's
`Blender.rank(..., return_scores=True)` turns the K(K-1) ordered-pair logits into scores
s_i = (1/K) sum_{j != i} (c_ij - c_ji), and the reference sets P_ij = sigmoid(s_i - s_j).

Two estimators (judge.estimator): `reference`, the above; `pairwise`, P_ij from c_ij and c_ji
alone (`pairwise_win_matrix`), which does not depend on the other candidates.

- Pure core (numpy): `ordered_pairs`, `pair_scores`, `win_matrix`, `pairwise_win_matrix`.
- `PairRMJudge`: llm-blender's own ranker and encoder, with every ordered pair of every prompt
  flattened into length-sorted batches (the reference runs one prompt at a time), and DeBERTa's
  attention fused into one SDPA call per layer (`deberta_attention`).
- `judge_candidates`: the Ray shell, one judge actor (`PairRMJudgeActor`) per call.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from pathlib import Path

import numpy as np

from sppo.config import JudgeConfig
from sppo.judging.actor import actor_judge, check_inputs
from sppo.judging.llm_blender_compat import import_llm_blender
from sppo.progress import PROGRESS_EVERY_S, progress
from sppo.models import local_model

log = logging.getLogger("sppo.judging")


def ordered_pairs(k: int) -> list[tuple[int, int]]:
    """Every (i, j) with i != j, row-major: the order in which llm-blender compares them."""
    return [(i, j) for i in range(k) for j in range(k) if i != j]


def pair_scores(logits: np.ndarray) -> np.ndarray:
    """llm-blender's candidate scores from a K x K matrix of ordered-pair logits.

    s_i = mean over all K columns j of (c_ij - c_ji), the diagonal counting as 0, i.e. the
    sum over j != i divided by K (not K - 1). Diagonal entries of `logits` are ignored.
    """
    c = np.array(logits, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"pair logits must be a K x K matrix, got shape {c.shape}")
    np.fill_diagonal(c, 0.0)
    return (c - c.T).mean(axis=1)


def win_matrix(scores: np.ndarray) -> np.ndarray:
    """P_ij = sigmoid(s_i - s_j); 0.5 on the diagonal and P_ij + P_ji = 1."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be a vector of K scores, got shape {s.shape}")
    # sigmoid(x) = (1 + tanh(x/2)) / 2: no overflow for large |x|, exactly 0.5 at 0.
    return 0.5 * (1.0 + np.tanh((s[:, None] - s[None, :]) / 2.0))


def pairwise_win_matrix(logits: np.ndarray) -> np.ndarray:
    """P_ij from the two orderings of (i, j) alone: 1/2 [sigmoid(c_ij) + 1 - sigmoid(c_ji)].

    Each ordering gives PairRM's probability that i wins (shown first, then second); averaging
    them cancels its position bias. Unlike the reference estimator, P_ij does not move when
    another candidate is added or changed. P_ij + P_ji = 1 and the diagonal is 0.5.
    """
    c = np.array(logits, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"pair logits must be a K x K matrix, got shape {c.shape}")
    first = 0.5 * (1.0 + np.tanh(c / 2.0))  # sigmoid(c_ij), overflow-free
    p = 0.5 * (first + 1.0 - first.T)
    np.fill_diagonal(p, 0.5)
    return p


def estimate_win_matrix(logits: np.ndarray, estimator: str) -> np.ndarray:
    """The K x K win-probability matrix by the configured estimator (judge.estimator)."""
    if estimator == "reference":
        return win_matrix(pair_scores(logits))
    if estimator == "pairwise":
        return pairwise_win_matrix(logits)
    raise ValueError(f"judge.estimator: unknown estimator {estimator!r} (reference, pairwise)")


class PairRMJudge:
    """llm-blender's PairRM ranker, scoring every ordered candidate pair of every prompt.

    Loads through `Blender.loadranker` (local directory or hub id; fp16 on CUDA as the
    checkpoint's config asks, fp32 on CPU) and encodes each prompt with llm-blender's own
    collator, so logits equal `Blender.rank(..., batch_size=1)`'s. Made a Ray actor by
    `judge_candidates`.
    """

    def __init__(self, model_dir: str, cfg: JudgeConfig):
        import torch

        model_dir = local_model(model_dir)  # a storage URI or tiny: spec, fetched or built on this node
        if Path(model_dir).is_dir() and not (Path(model_dir) / "config.json").is_file():
            raise FileNotFoundError(f"PairRM directory {model_dir}: no config.json")
        llm_blender = import_llm_blender()
        self.cfg = cfg
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        blender = llm_blender.Blender(llm_blender.BlenderConfig(device=self.device, use_tqdm=False))
        try:
            with warnings.catch_warnings():
                # dataclasses_json, once per RankerConfig field the checkpoint leaves unset
                # ("'NoneType' object value of non-optional type ..."); loadranker fills them in.
                warnings.filterwarnings("ignore", message=".*non-optional type", category=RuntimeWarning)
                blender.loadranker(model_dir, device=self.device)
        except ValueError as err:  # llm-blender's word for "no such model, not even on the hub"
            raise ValueError(f"PairRM judge: cannot load {model_dir!r}: {err}") from err
        if blender.ranker_config.ranker_type != "pairranker":
            raise ValueError(
                f"PairRM judge: {model_dir!r} is a {blender.ranker_config.ranker_type!r} ranker; "
                "the judge needs a pairwise one ('pairranker', e.g. llm-blender/PairRM)"
            )
        self.ranker = blender.ranker
        if cfg.fused_attention:
            from sppo.judging.deberta_attention import fuse_disentangled_attention  # torch: in the actor only

            fuse_disentangled_attention(self.ranker.pretrained_model)
        self.pad_id = blender.ranker_tokenizer.pad_token_id
        # A private copy with our limits, as Blender.rank does with its rank_kwargs.
        self.collator = copy.copy(blender.ranker_collator)
        self.collator.source_maxlength = cfg.source_max_length
        self.collator.candidate_maxlength = cfg.candidate_max_length

    def _encode(self, prompt: str, cands: list[str]):
        """Token ids of the source and of each candidate, unpadded, as rank(batch_size=1) cuts them.

        The collator truncates the source to source_max_length and each candidate to
        candidate_max_length plus half of what the source left unused.
        """
        batch = self.collator([{"source": prompt, "candidates": cands}])
        source = batch["source_ids"][0][batch["source_attention_mask"][0].bool()]
        cand_ids, cand_mask = batch["candidate_ids"][0], batch["candidate_attention_mask"][0]
        return source, [ids[mask.bool()] for ids, mask in zip(cand_ids, cand_mask)]

    def _padded(self, seqs):
        import torch
        from torch.nn.utils.rnn import pad_sequence

        ids = pad_sequence(seqs, batch_first=True, padding_value=self.pad_id)
        lengths = torch.tensor([len(s) for s in seqs])
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        return ids.to(self.device), mask.to(self.device)

    def pair_logits(self, prompts: list[str], candidates: list[list[str]]) -> list[np.ndarray]:
        """One K x K matrix of ordered-pair logits c_ij per prompt (diagonal 0, as llm-blender's)."""
        import torch

        check_inputs(prompts, candidates)
        encoded = [self._encode(p, c) for p, c in zip(prompts, candidates)]
        jobs = [(n, i, j) for n, cands in enumerate(candidates) for i, j in ordered_pairs(len(cands))]

        def length(job):
            n, i, j = job
            return len(encoded[n][0]) + len(encoded[n][1][i]) + len(encoded[n][1][j])

        # Longest first: little padding per batch, and an out-of-memory shows up at once.
        jobs.sort(key=length, reverse=True)
        matrices = [np.zeros((len(c), len(c))) for c in candidates]
        bs = self.cfg.batch_size
        start = last_report = time.monotonic()
        for first in range(0, len(jobs), bs):
            batch = jobs[first:first + bs]
            source = self._padded([encoded[n][0] for n, _, _ in batch])
            left = self._padded([encoded[n][1][i] for n, i, _ in batch])
            right = self._padded([encoded[n][1][j] for n, _, j in batch])
            with torch.inference_mode():
                # llm-blender's own pair forward: concatenates source | cand1 | cand2, marks the
                # candidates' prefix tokens as <|candidate1|> / <|candidate2|>, runs the encoder
                # and the head, and returns left - right head scores.
                logits = self.ranker._forward(*source, *left, *right)["logits"]
            for (n, i, j), value in zip(batch, logits.float().cpu().numpy()):
                matrices[n][i, j] = value
            done, now = first + len(batch), time.monotonic()
            if now - last_report >= PROGRESS_EVERY_S or done == len(jobs):
                log.info("judging: %s", progress(done, len(jobs), now - start, "pairs"))
                last_report = now
        return matrices

    def win_matrices(self, prompts: list[str], candidates: list[list[str]]) -> list[np.ndarray]:
        """One K x K win-probability matrix per prompt, by cfg.estimator."""
        return [estimate_win_matrix(c, self.cfg.estimator) for c in self.pair_logits(prompts, candidates)]


class PairRMJudgeActor(PairRMJudge):
    """`PairRMJudge` in a Ray worker of its own: sets up that process's logging, which Ray
    leaves bare, so that the progress lines reach the driver's log."""

    def __init__(self, model_dir: str, cfg: JudgeConfig):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        super().__init__(model_dir, cfg)


# Win matrices for every prompt from one PairRM judge actor, killed afterwards.
judge_candidates = actor_judge(PairRMJudgeActor,
                               lambda candidates: f"{sum(len(c) * (len(c) - 1) for c in candidates)} ordered pairs")
