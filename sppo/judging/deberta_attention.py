"""DeBERTa-v2 disentangled attention for inference, fused into SDPA calls.

PairRM is a DeBERTa-v3 encoder. transformers' `DisentangledSelfAttention` rebuilds the
log-bucketed relative positions of every (query, key) pair on each forward, gathers the
content->position and position->content terms through expanded L x L index tensors, adds them
up in four passes (one through a transposed view), masks, and runs its own softmax. On a CPU
these L x L passes, not the matmuls, are most of the judge's time (docs/performance.md).

Here the same scores are computed as:

    bias[i, j] = C[i, c2p[i, j]] + P[j, p2c[j, i]]   C = q Kr^T / s,  P = k Qr^T / s
    out = scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1/s)

with the bucket indices built once per (device, length) from transformers' own
`build_relative_position` and flattened so that both terms are one `index_select` each, and
on a CPU the bias built and used a cache-sized piece of the batch at a time.
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
# Elements of the [sequences, heads, rows, L] attention bias built at a time on a CPU: 2 MB in
# fp32 stays in cache from the gathers that write it to the SDPA call that reads it. Built whole,
# at 4 pairs of ~800 tokens (20 MB a layer), attention took 1.2-1.5x as long, and the larger the
# batch the worse (docs/performance.md). Accelerators build it whole.
CPU_BIAS_ELEMENTS = 1 << 19


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
    # int32 when the tables allow: index_select reads half the index bytes, ~1.3x faster on a CPU.
    fits = max(length, 2 * span) * length < torch.iinfo(torch.int32).max
    return (c2p_flat.int(), p2c_flat.int()) if fits else (c2p_flat, p2c_flat)


def bias_pieces(batch: int, heads: int, length: int, budget: int) -> list[tuple[slice, slice]]:
    """(sequences, query rows) pieces whose bias, [sequences, heads, rows, length], has at most
    `budget` elements (or one row of one sequence, if even that is more): whole sequences
    while they fit, else row blocks of one sequence."""
    per_sequence = heads * length * length
    if per_sequence <= budget:
        step = budget // per_sequence
        return [(slice(i, min(batch, i + step)), slice(0, length)) for i in range(0, batch, step)]
    rows = max(1, budget // (heads * length))
    return [(slice(i, i + 1), slice(r, min(length, r + rows))) for i in range(batch) for r in range(0, length, rows)]


def disentangled_attention(q, k, v, pos_key, pos_query, c2p_flat, p2c_flat, key_mask, scale: float):
    """Attention with DeBERTa's c2p and p2c relative terms, as SDPA calls over pieces of the batch.

    q, k, v: (B, H, L, d); pos_key, pos_query: (1, H, 2span, d) projected relative embeddings;
    c2p_flat, p2c_flat: from `flat_indices`; key_mask: (B, 1, 1, L) bool, True where a key is a
    real token, or None when all are; scale: DeBERTa's sqrt(d * 3). Returns (B, H, L, d).
    The bias is built and used a piece at a time (`bias_pieces`, `CPU_BIAS_ELEMENTS`).
    """
    b, h, length, _ = q.shape
    c2p = torch.matmul(q, pos_key.transpose(-1, -2) / scale)  # (B, H, L, 2span)
    p2c = torch.matmul(pos_query / scale, k.transpose(-1, -2))  # (B, H, 2span, L)
    if key_mask is not None:
        # Column j of bias takes its p2c term from column j of p2c only: masking the keys there
        # masks the whole column, in 2span x L writes instead of L x L. Added, not masked_fill'ed:
        # a broadcast bool mask made masked_fill_ 16x slower on a CPU. The dtype's minimum plus a
        # score stays the minimum (or -inf in half precision): no weight either way.
        padding = torch.zeros(key_mask.shape, dtype=p2c.dtype, device=p2c.device)
        p2c += padding.masked_fill_(~key_mask, torch.finfo(p2c.dtype).min)
    budget = CPU_BIAS_ELEMENTS if q.device.type == "cpu" else b * h * length * length
    c2p, p2c = c2p.view(b * h, -1), p2c.view(b * h, -1)  # one row per (sequence, head)
    out = torch.empty_like(q)
    for seqs, rows in bias_pieces(b, h, length, budget):
        heads = slice(seqs.start * h, seqs.stop * h)
        window = slice(rows.start * length, rows.stop * length)
        bias = torch.index_select(c2p[heads], 1, c2p_flat[window])
        bias += torch.index_select(p2c[heads], 1, p2c_flat[window])
        out[seqs, :, rows] = F.scaled_dot_product_attention(
            q[seqs, :, rows], k[seqs], v[seqs], attn_mask=bias.view(-1, h, rows.stop - rows.start, length),
            scale=1.0 / scale)
    return out


class FusedDisentangledSelfAttention(DisentangledSelfAttention):
    """`DisentangledSelfAttention` with `disentangled_attention` as its inference forward.

    Installed by swapping the class of an existing module, so parameters are shared and
    nothing is copied. Training mode and output_attentions take the stock path.
    """

    def forward(self, hidden_states, attention_mask, output_attentions=False, query_states=None,
                relative_pos=None, rel_embeddings=None):
        if self.training or output_attentions or query_states is not None:
            # The stock forward builds relative_pos itself when the fused encoder passed None,
            # and gets the pairwise mask the stock encoder would have built.
            if attention_mask.shape[-2] == 1:
                attention_mask = attention_mask * attention_mask.transpose(-1, -2)
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
        # The fused encoder passes the key mask (B, 1, 1, L); a stock one mask_i * mask_j, whose
        # diagonal is the key mask.
        if attention_mask.shape[-2] != 1:
            attention_mask = attention_mask.diagonal(dim1=-2, dim2=-1).unsqueeze(-2)
        key_mask = attention_mask.bool()
        if bool(key_mask.all()):
            key_mask = None
        scale = (self.attention_head_size * 3) ** 0.5
        out = disentangled_attention(q, k, v, pos_key, pos_query, c2p_flat, p2c_flat, key_mask, scale)
        return out.transpose(1, 2).reshape(b, length, -1), None


def _no_relative_positions(hidden_states, query_states=None, relative_pos=None):
    """The fused encoder's get_rel_pos: the fused layers index their own cached bucket tables."""
    return relative_pos


def _key_mask_in_eval(encoder):
    """The fused encoder's get_attention_mask: in eval mode a 2-D padding mask becomes the key
    mask (B, 1, 1, L), all the fused layers read, instead of the stock (B, 1, L, L) product
    (20 MB of int64 per layer call at 4 pairs of 800 tokens). In training mode, the stock mask."""
    stock = encoder.get_attention_mask

    def get_attention_mask(attention_mask):
        if encoder.training or attention_mask.dim() != 2:
            return stock(attention_mask)
        return attention_mask[:, None, None, :]

    return get_attention_mask


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
    encoders[0].get_attention_mask = _key_mask_in_eval(encoders[0])
    return True
