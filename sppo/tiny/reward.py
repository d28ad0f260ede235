"""A tiny scalar reward model built from code: the tiny policy's backbone under a new
one-output sequence-classification head, with the policy's tokenizer and chat template.

Reward models are usually made this way (a chat model's backbone, a scalar head). The head is
random (fixed seed), so its rewards mean nothing; it exists so that every code path of the
reward-model judge (chat rendering, batching, padding, the head) runs for real without a model
hub, the way ArmoRM-Llama3-8B-v0.1 runs on a GPU cluster.
"""

from __future__ import annotations

from pathlib import Path

from sppo.tiny.policy import BUILD_VERSION as POLICY_BUILD_VERSION
from sppo.tiny.policy import FINAL_NORM_GAIN

SEED = 0
BUILD_VERSION = f"v1-policy-{POLICY_BUILD_VERSION}"


def build(out_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from sppo.tiny import resolve_model

    policy_dir = resolve_model("tiny:policy")
    model = LlamaForSequenceClassification.from_pretrained(policy_dir, num_labels=1, dtype=torch.float32)
    # A wider head than the default init (std 0.02, rewards within ~0.1 of each other and win
    # probabilities of ~0.5 everywhere) spreads the rewards like a trained model's: std 0.5 on a
    # hidden state of RMS 1, so divided by the policy's final-norm gain.
    torch.manual_seed(SEED)
    torch.nn.init.normal_(model.score.weight, std=0.5 / FINAL_NORM_GAIN)
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(policy_dir).save_pretrained(out_dir)
