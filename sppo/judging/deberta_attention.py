"""DeBERTa-v2 disentangled attention for inference, fused into one SDPA call per layer.

PairRM is a DeBERTa-v3 encoder. transformers' `DisentangledSelfAttention` rebuilds the
log-bucketed relative positions of every (query, key) pair on each forward, gathers the
content->position and position->content terms through expanded L x L index tensors, adds them
up in four passes (one through a transposed view), masks, and runs its own softmax. On a CPU
these L x L passes, not the matmuls, are most of the judge's time (docs/performance.md).

Here the same scores are computed as:

    bias[i, j] = C[i, c2p[i, j]] + P[j, p2c[j, i]]   C = q Kr^T / s,  P = k Qr^T / s
    out = scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1/s)

with the bucket indices built once per (device, length) from transformers' own
`build_relative_position` and flattened so that both terms are one `index_select` each.
Same parameters and the same arithmetic up to float rounding (the parity tests compare with the
stock module) for the padding masks the encoder builds from a 2-D attention_mask; rows of
padding queries, which nothing reads, are not masked the stock way.

`fuse_disentangled_attention(model)` switches a loaded DeBERTa-v2 model to this path, in
place, where its config allows (relative attention with both c2p and p2c terms); otherwise it
leaves the model alone and says why.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from transformers.models.deberta_v2.modeling_deberta_v2 import DisentangledSelfAttention, build_relative_position

log = logging.getLogger("sppo.judging")

# Base index tables are built for lengths rounded up to this, so a stream of slightly different
# lengths reuses one table (positions depend on i - j only: a shorter length is its top-left block).
_BASE_LENGTH_STEP = 512


@functools.lru_cache(maxsize=4)
def _base_indices(size: int, buckets: int, max_position: int, span: int, device: str):
    """c2p[i, j] and p2c[j, i] (i.e. transposed) bucket indices for lengths up to `size`."""
    probe = torch.empty(1, size, 1, device=device)
    rel = build_relative_position(probe, probe, bucket_size=buckets, max_position=max_position)[0]
    c2p = torch.clamp(rel + span, 0, 2 * span - 1)
    p2c_t = torch.clamp(-rel + span, 0, 2 * span - 1).T.contiguous()
    return c2p, p2c_t


@functools.lru_cache(maxsize=2)  # a forward's layers share one length; batches change it
def flat_indices(length: int, buckets: int, max_position: int, span: int, device: str):
    """Indices into C (L x 2span) and P^T (2span x L), flattened, such that
    C.flatten()[c2p_flat] is the c2p term and P^T.flatten()[p2c_flat] the p2c term, row-major L x L."""
    size = -(-length // _BASE_LENGTH_STEP) * _BASE_LENGTH_STEP
    c2p, p2c_t = _base_indices(size, buckets, max_position, span, device)
    rows = torch.arange(length, device=device)
    c2p_flat = (rows[:, None] * (2 * span) + c2p[:length, :length]).reshape(-1)
    p2c_flat = (p2c_t[:length, :length] * length + rows[None, :]).reshape(-1)
    return c2p_flat, p2c_flat


def disentangled_attention(q, k, v, pos_key, pos_query, c2p_flat, p2c_flat, key_mask, scale: float):
    """Attention with DeBERTa's c2p and p2c relative terms, as one SDPA call.

    q, k, v: (B, H, L, d); pos_key, pos_query: (1, H, 2span, d) projected relative embeddings;
    c2p_flat, p2c_flat: from `flat_indices`; key_mask: (B, 1, 1, L) bool, True where a key is a
    real token, or None when all are; scale: DeBERTa's sqrt(d * 3). Returns (B, H, L, d).
    """
    b, h, length, _ = q.shape
    c2p = torch.matmul(q, pos_key.transpose(-1, -2) / scale)  # (B, H, L, 2span)
    p2c = torch.matmul(pos_query / scale, k.transpose(-1, -2))  # (B, H, 2span, L)
    if key_mask is not None:
        # Column j of bias takes its p2c term from column j of p2c only: masking the keys there
        # masks the whole column, in 2span x L writes instead of L x L.
        p2c.masked_fill_(~key_mask, torch.finfo(p2c.dtype).min)
    bias = torch.index_select(c2p.reshape(b * h, -1), 1, c2p_flat)
    bias += torch.index_select(p2c.reshape(b * h, -1), 1, p2c_flat)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(b, h, length, length), scale=1.0 / scale)


class FusedDisentangledSelfAttention(DisentangledSelfAttention):
    """`DisentangledSelfAttention` with `disentangled_attention` as its inference forward.

    Installed by swapping the class of an existing module, so parameters are shared and
    nothing is copied. Training mode and output_attentions take the stock path.
    """

    def forward(self, hidden_states, attention_mask, output_attentions=False, query_states=None,
                relative_pos=None, rel_embeddings=None):
        if self.training or output_attentions or query_states is not None:
            # The stock forward builds relative_pos itself when the fused encoder passed None.
            return super().forward(hidden_states, attention_mask, output_attentions, query_states,
                                   relative_pos, rel_embeddings)
        b, length, _ = hidden_states.shape

        def heads(x):  # (B, L, H * d) -> (B, H, L, d)
            return x.view(x.shape[0], x.shape[1], self.num_attention_heads, -1).transpose(1, 2)

        q = heads(self.query_proj(hidden_states))
        k = heads(self.key_proj(hidden_states))
        v = heads(self.value_proj(hidden_states))
        rel = rel_embeddings[: 2 * self.pos_ebd_size].unsqueeze(0)
        pos_key = heads((self.key_proj if self.share_att_key else self.pos_key_proj)(rel))
        pos_query = heads((self.query_proj if self.share_att_key else self.pos_query_proj)(rel))
        c2p_flat, p2c_flat = flat_indices(length, self.position_buckets, self.max_relative_positions,
                                          self.pos_ebd_size, str(hidden_states.device))
        # The encoder passes mask_i * mask_j, whose diagonal is the padding mask itself: O(L), not O(L^2).
        key_mask = attention_mask.diagonal(dim1=-2, dim2=-1).bool().unsqueeze(-2)
        if bool(key_mask.all()):
            key_mask = None
        scale = (self.attention_head_size * 3) ** 0.5
        out = disentangled_attention(q, k, v, pos_key, pos_query, c2p_flat, p2c_flat, key_mask, scale)
        return out.transpose(1, 2).reshape(b, length, -1), None


def _no_relative_positions(hidden_states, query_states=None, relative_pos=None):
    """The fused encoder's get_rel_pos: the fused layers index their own cached bucket tables."""
    return relative_pos


def fuse_disentangled_attention(model) -> bool:
    """Switch every DeBERTa-v2 attention layer of `model` to the fused forward, in place.

    Returns False, changing nothing, where the config has no disentangled attention with both
    relative terms (the fused path computes exactly that case).
    """
    config = model.config
    types = set(getattr(config, "pos_att_type", None) or [])
    if not getattr(config, "relative_attention", False) or types != {"c2p", "p2c"}:
        log.info("judge: stock DeBERTa attention (relative_attention=%s, pos_att_type=%s)",
                 getattr(config, "relative_attention", None), sorted(types))
        return False
    layers = [m for m in model.modules() if type(m) is DisentangledSelfAttention]
    encoders = [m for m in model.modules() if hasattr(m, "get_rel_pos") and hasattr(m, "layer")]
    if not layers or len(encoders) != 1:
        log.info("judge: stock DeBERTa attention (%d attention layers, %d encoders)", len(layers), len(encoders))
        return False
    for layer in layers:
        layer.__class__ = FusedDisentangledSelfAttention
    # The stock encoder builds the log-bucketed L x L positions on every forward; no layer reads them now.
    encoders[0].get_rel_pos = _no_relative_positions
    return True
