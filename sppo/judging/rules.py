"""A deterministic rule-based judge: each candidate gets a score from named text features, and
P_ij = sigmoid((s_i - s_j) / temperature), a proper win matrix (P_ij + P_ji = 1, 0.5 on the
diagonal).

It needs no model, so the tiny default can show that SPPO learns what a judge prefers: the tiny
policy starts from random weights and writes byte-level noise, and `letters` (the share of
characters that are ASCII letters or spaces) rewards responses that read more like words, which
the policy can learn within a few iterations by moving probability away from byte tokens.

Features (judge.rule.weights names them; each lies in [0, 1]):
- letters: share of characters that are ASCII letters or spaces.
- keywords: share of words (lowercased, punctuation stripped) that are in judge.rule.keywords.
- length: the response's length in characters over 1000, capped at 1: a judge that pays for
  length, as learned judges do (PairRM included), for the length-controlled win rate to correct.

The judge runs on the driver: scoring a few thousand strings takes milliseconds, and a Ray actor
would only add its start-up time.
"""

from __future__ import annotations

import logging
import re
import string

import numpy as np

from sppo.config import JudgeConfig, RuleJudgeConfig
from sppo.judging.actor import check_inputs
from sppo.judging.pairrm import win_matrix
from sppo.roles import Role

log = logging.getLogger("sppo.judging")

_LETTERS = frozenset(string.ascii_letters + " ")
_WORD = re.compile(r"[a-z0-9']+")


def letter_fraction(text: str, cfg: RuleJudgeConfig) -> float:
    return sum(ch in _LETTERS for ch in text) / len(text) if text else 0.0


def keyword_fraction(text: str, cfg: RuleJudgeConfig) -> float:
    words = _WORD.findall(text.lower())
    wanted = {k.lower() for k in cfg.keywords}
    return sum(w in wanted for w in words) / len(words) if words else 0.0


# Characters at which the length feature is full: longer than the tiny configs' answers (up to
# 32 tokens), so that every extra character still pays.
FULL_LENGTH_CHARS = 1000


def length_fraction(text: str, cfg: RuleJudgeConfig) -> float:
    return min(len(text) / FULL_LENGTH_CHARS, 1.0)


FEATURES = {"letters": letter_fraction, "keywords": keyword_fraction, "length": length_fraction}


def rule_score(text: str, cfg: RuleJudgeConfig) -> float:
    """sum over features f of weights[f] * f(text)."""
    return float(sum(weight * FEATURES[name](text, cfg) for name, weight in cfg.weights.items()))


def rule_win_matrix(candidates: list[str], cfg: RuleJudgeConfig) -> np.ndarray:
    """K x K: P_ij = sigmoid((s_i - s_j) / temperature)."""
    scores = np.array([rule_score(c, cfg) for c in candidates])
    return win_matrix(scores / cfg.temperature)


def judge_candidates(
    judge_path: str, prompts: list[str], candidates: list[list[str]], cfg: JudgeConfig, role: Role | None = None,
) -> list[np.ndarray]:
    """The judging stage's interface (sppo.judging.JUDGES); judge_path and role are unused: the
    rule needs no model, runs on the driver and finishes in milliseconds."""
    check_inputs(prompts, candidates)
    log.info("judging %d prompts with the rule judge (weights %s)", len(prompts), dict(cfg.rule.weights))
    return [rule_win_matrix(cands, cfg.rule) for cands in candidates]
