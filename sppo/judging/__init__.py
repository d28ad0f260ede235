"""Judging stage: a K x K win-probability matrix per prompt, by the judge kind the config names.

`JUDGES` maps judge.kind to a function `(judge_path, prompts, candidates, judge_cfg, role)
-> list[np.ndarray]` (one K x K matrix per prompt, P_ij + P_ji = 1) that runs the
judge on Ray as the judging role says (`sppo.roles.judging_role`: resources, restarts, deadlines).
- pairrm: PairRM (llm-blender), sppo/judging/pairrm.py.
- reward_model: a scalar reward model, Bradley-Terry P_ij = sigmoid(r_i - r_j), sppo/judging/reward_model.py.
- rule: a deterministic rule on text features, no model, sppo/judging/rules.py.
"""

from __future__ import annotations

from sppo.judging import pairrm, reward_model, rules

JUDGES = {
    "pairrm": pairrm.judge_candidates,
    "reward_model": reward_model.judge_candidates,
    "rule": rules.judge_candidates,
}
