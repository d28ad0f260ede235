"""A tiny Llama policy with a byte-level BPE tokenizer and a chat template, built from code.

Head size 32 because vLLM's CPU attention supports 32, 64, 80, ... but not 16.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

VOCAB_SIZE = 1024
# Chat template in the style of the production models: BOS once, role tags, an end-of-turn
# token that is also EOS, and the assistant tag when add_generation_prompt is set.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def bundled_prompts() -> list[str]:
    text = resources.files("sppo.data").joinpath("tiny_prompts.jsonl").read_text()
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]


def _corpus_hash() -> str:
    data = resources.files("sppo.data").joinpath("tiny_prompts.jsonl").read_bytes()
    return hashlib.sha256(data).hexdigest()[:8]


BUILD_VERSION = f"v2-{_corpus_hash()}"
# The final norm's gain. With the default init (gain 1, LM head std 0.02 over 64 dimensions) every
# logit lies within about +-1.3 whatever the hidden state, so only the LM head and that norm can
# sharpen the output: a LoRA adapter, which changes hidden states alone, could barely move it
# (configs/tiny-lora.yaml reached 0.56 at iteration 3). Gain 10 spreads the logits as a trained
# model's (std 1.7 over the vocabulary; docs/lora.md).
FINAL_NORM_GAIN = 10.0


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(bundled_prompts(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
    )
    return tokenizer


def build(out_dir: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.norm.weight.fill_(FINAL_NORM_GAIN)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
