"""Reward-model judging: a scalar reward per candidate, a Bradley-Terry K x K win matrix per prompt.

A reward model (a sequence-classification head with one output, e.g. ArmoRM-Llama3-8B-v0.1)
scores each (prompt, candidate) conversation; P_ij = sigmoid(r_i - r_j), the Bradley-Terry
probability that candidate i beats candidate j. The matrix has PairRM's shape and properties
(P_ij + P_ji = 1, 0.5 on the diagonal), so SPPO runs on it as it does on PairRM, and the
DPO-style pair rule (max- vs min-reward candidate, sppo/pairs.py) reads the rewards back from it.

- Pure core: `bradley_terry_matrix`.
- `RewardModelJudge`: the transformers model, every candidate of every prompt flattened into
  length-sorted batches.
- `judge_candidates`: the Ray shell, one judge actor (`RewardModelJudgeActor`) per call.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from sppo.config import JudgeConfig
from sppo.judging.actor import actor_judge, check_inputs
from sppo.judging.pairrm import win_matrix
from sppo.models import local_model

log = logging.getLogger("sppo.judging")

# Seconds between progress lines while judging.
PROGRESS_EVERY_S = 10.0


def bradley_terry_matrix(rewards: np.ndarray) -> np.ndarray:
    """P_ij = sigmoid(r_i - r_j) from a vector of K scalar rewards."""
    return win_matrix(rewards)


class RewardModelJudge:
    """A transformers sequence-classification reward model scoring each candidate on its own.

    Each candidate is rendered as the conversation [user: prompt, assistant: candidate] by the
    reward model's own chat template (as ArmoRM's model card does) and cut to
    source_max_length + candidate_max_length tokens. Models whose output carries a `score`
    (ArmoRM's gated preference score; needs judge.trust_remote_code) give that, others their
    single logit. bf16 on CUDA, fp32 on CPU.
    """

    def __init__(self, model_dir: str, cfg: JudgeConfig):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model_dir = local_model(model_dir)  # a storage URI or tiny: spec, fetched or built on this node
        if Path(model_dir).is_dir() and not (Path(model_dir) / "config.json").is_file():
            raise FileNotFoundError(f"reward model directory {model_dir}: no config.json")
        self.cfg = cfg
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        remote = cfg.trust_remote_code
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=remote)
        if not self.tokenizer.chat_template:
            raise ValueError(f"reward-model judge: {model_dir!r} has no chat template to render (prompt, response)")
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, trust_remote_code=remote,
            dtype=torch.bfloat16 if self.device == "cuda" else torch.float32,
        ).to(self.device).eval()
        self.model_dir = model_dir
        # Padding goes on the right and the head reads the last non-pad token; a tokenizer
        # without a pad token (Llama 3's) pads with UNK or, failing that, EOS.
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.unk_token or self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.max_length = cfg.source_max_length + cfg.candidate_max_length

    def _encode(self, prompt: str, response: str) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
        )
        # The template carries BOS itself.
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[: self.max_length]

    def _scalar(self, output):
        """The reward of each sequence: the model's `score` where it has one (ArmoRM), else its
        single logit."""
        score = getattr(output, "score", None)
        if score is not None:
            return score.float().reshape(-1)
        if output.logits.shape[-1] != 1:
            raise ValueError(
                f"reward-model judge: {self.model_dir!r} outputs {output.logits.shape[-1]} logits per "
                "sequence and no `score`; a scalar reward model has one (num_labels=1)"
            )
        return output.logits.float()[:, 0]

    def rewards(self, prompts: list[str], candidates: list[list[str]]) -> list[np.ndarray]:
        """One vector of K rewards per prompt."""
        import torch

        check_inputs(prompts, candidates)
        jobs = [(n, i, self._encode(p, c)) for n, (p, cands) in enumerate(zip(prompts, candidates))
                for i, c in enumerate(cands)]
        # Longest first: little padding per batch, and an out-of-memory shows up at once.
        jobs.sort(key=lambda job: len(job[2]), reverse=True)
        out = [np.zeros(len(c)) for c in candidates]
        bs = self.cfg.batch_size
        start = last_report = time.monotonic()
        for first in range(0, len(jobs), bs):
            batch = jobs[first:first + bs]
            padded = self.tokenizer.pad({"input_ids": [ids for _, _, ids in batch]}, padding_side="right",
                                        return_tensors="pt").to(self.device)
            with torch.inference_mode():
                output = self.model(**padded)
            values = self._scalar(output)
            for (n, i, _), value in zip(batch, values.cpu().numpy()):
                out[n][i] = value
            done, now = first + len(batch), time.monotonic()
            if now - last_report >= PROGRESS_EVERY_S or done == len(jobs):
                log.info("scored %d/%d candidates (%.1f/s)", done, len(jobs), done / max(now - start, 1e-9))
                last_report = now
        return out

    def win_matrices(self, prompts: list[str], candidates: list[list[str]]) -> list[np.ndarray]:
        return [bradley_terry_matrix(r) for r in self.rewards(prompts, candidates)]


class RewardModelJudgeActor(RewardModelJudge):
    """`RewardModelJudge` in a Ray worker of its own, with logging set up so that its
    progress lines reach the driver's log."""

    def __init__(self, model_dir: str, cfg: JudgeConfig):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        super().__init__(model_dir, cfg)


# Bradley-Terry win matrices for every prompt from one reward-model actor, killed afterwards.
judge_candidates = actor_judge(RewardModelJudgeActor,
                               lambda candidates: f"{sum(map(len, candidates))} candidates")
