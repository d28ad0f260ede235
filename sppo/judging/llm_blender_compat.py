"""Run llm-blender 0.0.2 (last released April 2024) on transformers 5, mended from our side.

llm-blender is used unchanged; two names it imports from transformers 4 are put back
before it is imported. Each shim below is applied only when the name is missing, so
calling `import_llm_blender()` again (or on a transformers that still has them) is a no-op.

A third known transformers-5 difference needs no shim here: `DebertaV2Config.from_pretrained(
path, n_tasks=...)` silently drops keyword arguments the config class does not declare, so
`DebertaV2PairRM.from_pretrained(path, n_tasks=1, ...)` fails with "unexpected keyword argument
'n_tasks'". Neither llm-blender's loader nor ours passes them that way: our tiny PairRM writes
its PairRM fields into config.json (kept on load), and `Blender.loadranker` reads them from there.
"""

from __future__ import annotations

from types import ModuleType


def _restore_transformers_cache() -> None:
    # Symptom: `import llm_blender` -> ImportError: cannot import name 'TRANSFORMERS_CACHE'
    # from 'transformers.utils.hub'. transformers 4 defined it as an alias of the hub cache.
    import huggingface_hub.constants
    import transformers.utils.hub

    if not hasattr(transformers.utils.hub, "TRANSFORMERS_CACHE"):
        transformers.utils.hub.TRANSFORMERS_CACHE = huggingface_hub.constants.HF_HUB_CACHE


def _batch_encode_plus(self, batch_text_or_text_pairs, **kwargs):
    """transformers 4's `batch_encode_plus`: the tokenizer called on a list."""
    return self(batch_text_or_text_pairs, **kwargs)


def _restore_batch_encode_plus() -> None:
    # Symptom: `Blender.rank` -> AttributeError: DebertaV2Tokenizer has no attribute
    # 'batch_encode_plus' (llm_blender/pair_ranker/collator.py, encode_texts).
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    if not hasattr(PreTrainedTokenizerBase, "batch_encode_plus"):
        PreTrainedTokenizerBase.batch_encode_plus = _batch_encode_plus


def import_llm_blender() -> ModuleType:
    """Apply the shims (idempotent) and return the `llm_blender` package."""
    _restore_transformers_cache()
    _restore_batch_encode_plus()
    import llm_blender

    return llm_blender
