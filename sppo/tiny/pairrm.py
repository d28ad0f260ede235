"""A tiny PairRM built from code: llm-blender's `DebertaV2PairRM` on a 2-layer DeBERTa-v2.

Random weights (fixed seed), so its preferences mean nothing; it exists so that every code
path of the judging stage (tokenisation, truncation, pairing, the model itself) runs for real
without a model hub. The directory loads with llm-blender's own `Blender.loadranker`: config.json
holds the DeBERTa-v2 config, the PairRM fields of `DebertaV2PairRM`, and the `RankerConfig`
fields (`ranker_type`, token limits) that `loadranker` reads from the same file.

On load, llm-blender first builds a bare `DebertaV2Model` from config.json and transformers
reports every weight as missing/unexpected (the checkpoint's keys carry the `pretrained_model.`
prefix of llm-blender's ranker); llm-blender then loads all of them, strictly, from
model.safetensors. The report is noise, not a failed load.
"""

from __future__ import annotations

import hashlib
import math
import string
from collections import Counter
from pathlib import Path

from sppo.tiny.policy import bundled_prompts

VOCAB_SIZE = 600
SEED = 0
# DeBERTa-v3's special tokens, in its id order.
SPECIAL_TOKENS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
# sentencepiece's word-start mark, as DebertaV2Tokenizer's Metaspace pre-tokenizer writes it.
WORD_START = "▁"
# Added by llm-blender's CrossCompareCollator (plain `add_tokens`) when it is built; adding
# them here first fixes their ids, so config.json can name them and the embedding matrix
# already has their rows when llm-blender resizes it to len(tokenizer).
SOURCE_PREFIX, CAND1_PREFIX, CAND2_PREFIX, CAND_PREFIX = (
    "<|source|>", "<|candidate1|>", "<|candidate2|>", "<|candidate|>"
)


def _corpus_hash() -> str:
    return hashlib.sha256("\n".join(bundled_prompts()).encode()).hexdigest()[:8]


BUILD_VERSION = f"v1-{_corpus_hash()}"


def unigram_vocab() -> list[tuple[str, float]]:
    """Unigram pieces with log-frequency scores: the bundled prompts' most frequent words
    (with the "▁" word-start mark) and every printable or seen character, so nothing is unknown.

    Counted rather than trained: tokenizers' UnigramTrainer orders equally scored pieces
    differently from one process to the next, which would change token ids between builds.
    """
    prompts = bundled_prompts()
    words = Counter(WORD_START + word for prompt in prompts for word in prompt.split())
    chars = Counter(char for prompt in prompts for char in prompt if not char.isspace())
    chars[WORD_START] = sum(words.values())
    alphabet = sorted(set(string.printable.strip()) | set(chars))
    total = sum(words.values()) + sum(chars.values())
    room = VOCAB_SIZE - len(SPECIAL_TOKENS) - len(alphabet)
    top_words = sorted(words.items(), key=lambda item: (-item[1], item[0]))[:room]
    return (
        [(token, 0.0) for token in SPECIAL_TOKENS]
        + [(word, math.log(count / total)) for word, count in top_words]
        + [(char, math.log(max(chars[char], 1) / total)) for char in alphabet]
    )


def build_tokenizer():
    """A DeBERTa-v2 (Unigram, sentencepiece-style) tokenizer over the bundled prompts' vocabulary."""
    from transformers import DebertaV2Tokenizer

    tokenizer = DebertaV2Tokenizer(vocab=unigram_vocab(), unk_id=SPECIAL_TOKENS.index("[UNK]"))
    tokenizer.add_tokens([SOURCE_PREFIX, CAND1_PREFIX, CAND2_PREFIX, CAND_PREFIX])
    return tokenizer


def build(out_dir: Path) -> None:
    import torch
    from transformers import DebertaV2Config

    from sppo.judging.llm_blender_compat import import_llm_blender

    import_llm_blender()
    from llm_blender.pair_ranker.pairrm import DebertaV2PairRM

    tokenizer = build_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    config = DebertaV2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        # DeBERTa-v3's attention: relative positions only, log buckets, shared keys.
        relative_attention=True,
        position_biased_input=False,
        pos_att_type=["p2c", "c2p"],
        max_relative_positions=-1,
        position_buckets=64,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        type_vocab_size=0,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        # Far wider than the usual 0.02: with that, a random model scores every candidate
        # alike (score spread ~1e-6); at 0.3 scores within a prompt spread by about 1-2.
        initializer_range=0.3,
        # DebertaV2PairRM's fields.
        n_tasks=1,
        drop_out=0.05,
        sep_token_id=tokenizer.sep_token_id,
        source_prefix_id=ids(SOURCE_PREFIX),
        cand_prefix_id=ids(CAND_PREFIX),
        cand1_prefix_id=ids(CAND1_PREFIX),
        cand2_prefix_id=ids(CAND2_PREFIX),
        # llm-blender's RankerConfig fields, read by Blender.loadranker.
        ranker_type="pairranker",
        source_maxlength=1224,
        candidate_maxlength=412,
        dtype="float32",
    )
    torch.manual_seed(SEED)
    model = DebertaV2PairRM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
