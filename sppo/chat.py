"""Prompt rendering shared by sampling and training, so both see identical token ids.

The tokenizer's own chat template renders the prompt (with `add_generation_prompt=True`);
the text is then tokenized with `add_special_tokens=False` because the template already
carries BOS: this is what keeps BOS single. The prompt text is passed through verbatim
(no string splitting), so prompts that contain words like "None" stay whole.
"""

from __future__ import annotations

from collections.abc import Sequence


def render_prompt(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def render_prompt_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    texts = [render_prompt(tokenizer, p) for p in prompts]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
