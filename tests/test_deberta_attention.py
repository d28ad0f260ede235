"""The fused DeBERTa attention gives the stock module's outputs (sppo/judging/deberta_attention.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import DebertaV2Config, DebertaV2Model
from transformers.models.deberta_v2.modeling_deberta_v2 import DisentangledSelfAttention

from sppo.judging import deberta_attention
from sppo.judging.deberta_attention import (
    FusedDisentangledSelfAttention,
    bias_pieces,
    fuse_disentangled_attention,
)


def deberta(**overrides) -> DebertaV2Model:
    """A small random DeBERTa-v3-style encoder (PairRM's layout: log buckets, c2p + p2c)."""
    settings = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=512, relative_attention=True,
                    position_buckets=64, pos_att_type=["p2c", "c2p"], share_att_key=True,
                    norm_rel_ebd="layer_norm", position_biased_input=False, type_vocab_size=0,
                    initializer_range=0.3)  # sharp attention, as the tiny PairRM has; 0.02 is near uniform
    settings.update(overrides)
    torch.manual_seed(0)
    return DebertaV2Model(DebertaV2Config(**settings)).eval()


def padded_batch(lengths: list[int], side: str = "right"):
    """Random ids, padded to the longest on `side`, with the attention mask."""
    gen = torch.Generator().manual_seed(1)
    longest = max(lengths)
    ids = torch.randint(3, 100, (len(lengths), longest), generator=gen)
    mask = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]).long()
    if side == "left":
        mask = mask.flip(-1)
    return ids * mask, mask


@pytest.mark.parametrize("share_att_key", [True, False])
# 40: inside one log bucket range; 700: past max_position (512) and the 512-long base index table.
@pytest.mark.parametrize("lengths, side", [([40], "right"), ([700], "right"), ([700, 300, 41], "right"),
                                           ([300, 41], "left")])
def test_fused_attention_matches_stock(share_att_key, lengths, side):
    model = deberta(share_att_key=share_att_key)
    ids, mask = padded_batch(lengths, side)
    with torch.inference_mode():
        stock = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert fuse_disentangled_attention(model)
        fused = model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()  # padding rows are not masked the stock way; nothing reads them
    assert not torch.equal(stock[real], torch.zeros_like(stock[real]))
    assert torch.allclose(fused[real], stock[real], atol=1e-4), (fused[real] - stock[real]).abs().max()


def test_the_relative_terms_weigh_more_than_the_tolerance():
    """Parity to 1e-4 says something only if the c2p/p2c terms move outputs by much more than
    that: reordering the relative-position embeddings must change the fused outputs."""
    model = deberta()
    fuse_disentangled_attention(model)
    ids, mask = padded_batch([200])
    with torch.inference_mode():
        before = model(input_ids=ids, attention_mask=mask).last_hidden_state
        weight = model.encoder.rel_embeddings.weight
        weight.copy_(weight[torch.randperm(weight.shape[0], generator=torch.Generator().manual_seed(2))])
        after = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (after - before).abs().max() > 1e-2


def test_training_mode_takes_the_stock_path():
    model = deberta(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids, mask = padded_batch([50, 30])
    stock = model.train()(input_ids=ids, attention_mask=mask).last_hidden_state
    fuse_disentangled_attention(model)
    fused = model.train()(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(fused, stock)  # bitwise: the same code ran
    fused.sum().backward()  # and it trains
    assert model.encoder.layer[0].attention.self.query_proj.weight.grad is not None


@pytest.mark.parametrize("overrides", [{"pos_att_type": ["c2p"]}, {"relative_attention": False}])
def test_other_attention_layouts_are_left_alone(overrides):
    model = deberta(**overrides)
    assert not fuse_disentangled_attention(model)
    assert all(type(m) is not FusedDisentangledSelfAttention for m in model.modules())
    assert any(type(m) is DisentangledSelfAttention for m in model.modules())


@pytest.mark.parametrize("budget", [2 * 2 * 60 * 60, 2 * 60 * 7])  # 2 sequences a piece; 7 rows a piece
def test_the_bias_built_in_pieces_gives_the_same_outputs(monkeypatch, budget):
    model = deberta()
    ids, mask = padded_batch([60, 45, 30, 60, 12])
    with torch.inference_mode():
        stock = model(input_ids=ids, attention_mask=mask).last_hidden_state
        fuse_disentangled_attention(model)
        monkeypatch.setattr(deberta_attention, "CPU_BIAS_ELEMENTS", budget)
        fused = model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert torch.allclose(fused[real], stock[real], atol=1e-4), (fused[real] - stock[real]).abs().max()


@pytest.mark.parametrize("batch, heads, length, budget", [(5, 2, 60, 2 * 60 * 60 * 2), (3, 2, 60, 2 * 60 * 7),
                                                          (2, 4, 9, 1), (4, 2, 10, 10**9)])
def test_bias_pieces_cover_every_row_once_within_the_budget(batch, heads, length, budget):
    covered = torch.zeros(batch, length, dtype=torch.long)
    for seqs, rows in bias_pieces(batch, heads, length, budget):
        covered[seqs, rows] += 1
        size = (seqs.stop - seqs.start) * heads * (rows.stop - rows.start) * length
        assert size <= max(budget, heads * length)  # at least one row of one sequence
    assert torch.equal(covered, torch.ones_like(covered))


def test_attention_weights_asked_for_come_from_the_stock_path_with_the_stock_mask():
    model = deberta()
    ids, mask = padded_batch([50, 30])
    with torch.inference_mode():
        stock = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        fuse_disentangled_attention(model)
        fused = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert torch.equal(fused.last_hidden_state, stock.last_hidden_state)
    for fused_layer, stock_layer in zip(fused.attentions, stock.attentions, strict=True):
        assert torch.equal(fused_layer, stock_layer)


def test_the_fused_encoder_passes_the_key_mask_in_eval_mode_and_the_stock_mask_in_training():
    model = deberta()
    fuse_disentangled_attention(model)
    _, mask = padded_batch([50, 30])
    assert model.encoder.get_attention_mask(mask).shape == (2, 1, 1, 50)  # not the (2, 1, 50, 50) product
    model.train()
    assert torch.equal(model.encoder.get_attention_mask(mask), mask[:, None, None, :] * mask[:, None, :, None])
