"""Prompt rendering in the chat-template styles of the production models.

The fixtures are written in the style of each family's template (role markers, BOS handling,
generation prompt); the tokenizer is the tiny one with a post-processor that adds BOS on its
own, as Llama-3's and Gemma-2's tokenizers do, so a doubled BOS would show.
"""

import pytest
from tokenizers import processors
from transformers import AutoTokenizer

from sppo.chat import render_prompt, render_prompt_ids
from sppo.config import TrainConfig
from sppo.training_data import encode_pairs

TEMPLATES = {
    "llama-3": (
        "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
        "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "gemma-2": (
        "{{ bos_token }}{% for message in messages %}<start_of_turn>"
        "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
        "{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
        "<start_of_turn>model\n",
    ),
    # Mistral-Instruct: no separate generation prompt; the assistant turn follows [/INST].
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "[INST] {{ message['content'] }} [/INST]{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}"
        "{% endfor %}",
        " [/INST]",
    ),
}
MARKERS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>"]
PROMPTS = ["Reply with None if there is no date in: None of us came.", "What is 2 + 2?"]


@pytest.fixture(params=sorted(TEMPLATES))
def styled_tokenizer(request, tiny_policy_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": MARKERS})
    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    tokenizer.chat_template, generation_suffix = TEMPLATES[request.param]
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id  # the trap is armed
    return tokenizer, generation_suffix


def test_single_bos_and_prompt_kept_whole(styled_tokenizer):
    tokenizer, generation_suffix = styled_tokenizer
    for prompt, ids in zip(PROMPTS, render_prompt_ids(tokenizer, PROMPTS)):
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
        text = tokenizer.decode(ids)
        assert prompt in text  # "None" included: no string splitting anywhere
        assert text.endswith(generation_suffix)
        assert render_prompt(tokenizer, prompt).endswith(generation_suffix)


def test_training_sees_the_ids_sampling_sent(styled_tokenizer):
    tokenizer, _ = styled_tokenizer
    rows = [{"prompt": p, "chosen": "Four.", "rejected": "Five."} for p in PROMPTS]
    cfg = TrainConfig()
    pairs = encode_pairs(tokenizer, rows, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    for pair, sent in zip(pairs, render_prompt_ids(tokenizer, PROMPTS)):
        for seq in (pair.chosen, pair.rejected):
            assert list(seq.input_ids[: seq.prompt_length]) == sent
            assert list(seq.input_ids).count(tokenizer.bos_token_id) == 1
