"""Scaled dot-product attention over (B, C, 1, S) tensors, in three layouts.

* `split_einsum` (Neural Engine): one einsum pair per head, on (B, dim_head, 1, S) slices, so
  no tensor ever needs the (B, heads, S, S) rank-4-with-batched-heads layout; softmax runs over
  the channel axis of a (B, S_k, 1, S_q) tensor.
* `split_einsum_v2` (Neural Engine, default): as `split_einsum`, and queries are also cut into
  chunks of 512 so that long sequences (4096 tokens at 512x512) keep each attention matrix small
  enough for the Neural Engine's on-chip memory.
* `original` (GPU): heads as a batch axis, (B, heads, dim_head, S), two batched matmuls.

The einsum equations are the family MIL's `einsum` op implements natively ("nchw,nwhu->nchu").
"""

from __future__ import annotations

import math

import numpy as np
from torch import nn

from coreml_sd.conversion_names import ATTENTION_IMPLEMENTATIONS  # noqa: F401  (its home for the converter)
from conversion.ane.layers import Conv2d
from conversion.ane.ops import TORCH

QUERY_CHUNK = 512
MASKED = -1e4  # additive mask value: exp(-1e4 - max) is 0 in fp16 and fp32, without inf arithmetic


def attention(q, k, v, *, heads: int, impl: str, ops=TORCH, mask: np.ndarray | None = None):
    """softmax(q k^T / sqrt(d) + mask) v for q (B, C, 1, Sq), k and v (B, C, 1, Sk) -> (B, C, 1, Sq).

    `mask` is an additive (Sq, Sk) array (e.g. CLIP's causal mask), or None.
    """
    if impl == "original":
        return _batched_heads(q, k, v, heads=heads, ops=ops, mask=mask)
    chunk = QUERY_CHUNK if impl == "split_einsum_v2" else None
    return _split_heads(q, k, v, heads=heads, ops=ops, mask=mask, query_chunk=chunk)


def _batched_heads(q, k, v, *, heads, ops, mask):
    b, c, _, sq = ops.shape(q)
    sk = ops.shape(k)[3]
    d = c // heads
    q = ops.reshape(ops.mul(q, 1.0 / math.sqrt(d)), (b, heads, d, sq))
    k = ops.reshape(k, (b, heads, d, sk))
    v = ops.reshape(v, (b, heads, d, sk))
    w = ops.matmul(q, k, transpose_x=True)  # (b, heads, sq, sk)
    if mask is not None:
        w = ops.add(w, ops.const(mask.reshape(1, 1, sq, sk), ops.dtype(w), like=w))
    w = ops.softmax(w, 3)
    out = ops.matmul(v, w, transpose_y=True)  # (b, heads, d, sq)
    return ops.reshape(out, (b, c, 1, sq))


def _split_heads(q, k, v, *, heads, ops, mask, query_chunk):
    c, sq = ops.shape(q)[1], ops.shape(q)[3]
    d = c // heads
    q = ops.mul(q, 1.0 / math.sqrt(d))
    k_t = ops.transpose(k, (0, 3, 2, 1))  # (b, sk, 1, c): keys on the channel axis
    # Queries in equal chunks: the count divides the length at every size a flexible program
    # takes (ops.chunks), so one program chunks each of its sizes evenly.
    n = ops.chunks(sq, query_chunk) if query_chunk else 1
    masks = [None] * n if mask is None else [  # one constant per chunk, shared by the heads
        ops.const(m.T.reshape(1, -1, 1, m.shape[0]), ops.dtype(q), like=q) for m in np.split(mask, n, axis=0)]
    outs = []
    for h in range(heads):
        if heads == 1:
            q_h, k_h, v_h = q, k_t, v
        else:
            q_h = ops.slice(q, 1, h * d, (h + 1) * d)  # (b, d, 1, sq)
            k_h = ops.slice(k_t, 3, h * d, (h + 1) * d)  # (b, sk, 1, d)
            v_h = ops.slice(v, 1, h * d, (h + 1) * d)  # (b, d, 1, sk)
        pieces = []
        for q_c, m in zip([q_h] if n == 1 else ops.split(q_h, n, 3), masks):
            w = ops.einsum("bkhc,bchq->bkhq", k_h, q_c)  # (b, sk, 1, q)
            if m is not None:
                w = ops.add(w, m)
            w = ops.softmax(w, 1)
            pieces.append(ops.einsum("bchk,bkhq->bchq", v_h, w))  # (b, d, 1, q)
        outs.append(ops.concat(pieces, 3))
    return ops.concat(outs, 1)


def causal_mask(length: int) -> np.ndarray:
    """(S, S) additive mask hiding later tokens from earlier ones (CLIP's text encoder)."""
    return np.triu(np.full((length, length), MASKED, dtype=np.float32), k=1)


class Attention(nn.Module):
    """diffusers' `Attention` (to_q, to_k, to_v, to_out.0) over (B, C, 1, S) with 1x1 convs."""

    def __init__(self, query_dim: int, *, heads: int, dim_head: int, impl: str,
                 cross_attention_dim: int | None = None, qkv_bias: bool = False):
        super().__init__()
        inner = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        self.heads, self.impl = heads, impl
        self.to_q = Conv2d(query_dim, inner, bias=qkv_bias)
        self.to_k = Conv2d(kv_dim, inner, bias=qkv_bias)
        self.to_v = Conv2d(kv_dim, inner, bias=qkv_bias)
        self.to_out = nn.ModuleList([Conv2d(inner, query_dim)])

    def forward(self, x, context=None, ops=TORCH):
        context = x if context is None else context
        out = attention(self.to_q(x, ops), self.to_k(context, ops), self.to_v(context, ops),
                        heads=self.heads, impl=self.impl, ops=ops)
        return self.to_out[0](out, ops)
