"""transformers' CLIPTextModel (SD's text encoder) over (B, C, 1, 77) activations.

Input ids arrive as float32 (B, 77), as Apple's Swift pipeline feeds them; outputs are
`last_hidden_state` (B, 77, C) after the final layer norm, and `pooled_outputs` (B, C): the
final state at the first end-of-text token, found as transformers does (configs with the legacy
eos_token_id 2 take the largest id instead).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from conversion.ane.attention import attention, causal_mask
from conversion.ane.config import TextEncoderConfig
from conversion.ane.layers import Conv2d, LayerNormChannels, Rewrite
from conversion.ane.ops import TORCH


class Embeddings(nn.Module):
    def __init__(self, c: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embedding = nn.Embedding(c.max_position_embeddings, c.hidden_size)


class CLIPAttention(nn.Module):
    def __init__(self, c: TextEncoderConfig, impl: str):
        super().__init__()
        self.heads, self.impl = c.num_attention_heads, impl
        d = c.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (Conv2d(d, d) for _ in range(4))

    def forward(self, x, mask, ops=TORCH):
        out = attention(self.q_proj(x, ops), self.k_proj(x, ops), self.v_proj(x, ops), heads=self.heads,
                        impl=self.impl, ops=ops, mask=mask)
        return self.out_proj(out, ops)


class MLP(nn.Module):
    def __init__(self, c: TextEncoderConfig):
        super().__init__()
        self.act = c.hidden_act
        self.fc1 = Conv2d(c.hidden_size, c.intermediate_size)
        self.fc2 = Conv2d(c.intermediate_size, c.hidden_size)

    def forward(self, x, ops=TORCH):
        x = self.fc1(x, ops)
        x = ops.mul(x, ops.sigmoid(ops.mul(x, 1.702))) if self.act == "quick_gelu" else ops.gelu(x)
        return self.fc2(x, ops)


class EncoderLayer(nn.Module):
    def __init__(self, c: TextEncoderConfig, impl: str):
        super().__init__()
        self.layer_norm1 = LayerNormChannels(c.hidden_size, c.layer_norm_eps)
        self.self_attn = CLIPAttention(c, impl)
        self.layer_norm2 = LayerNormChannels(c.hidden_size, c.layer_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, mask, ops=TORCH):
        x = ops.add(x, self.self_attn(self.layer_norm1(x, ops), mask, ops))
        return ops.add(x, self.mlp(self.layer_norm2(x, ops), ops))


class Encoder(nn.Module):
    def __init__(self, c: TextEncoderConfig, impl: str):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(c, impl) for _ in range(c.num_hidden_layers)])


class TextEncoder(Rewrite):
    """input_ids float (B, S) -> (last_hidden_state (B, S, C), pooled_outputs (B, C))."""

    def __init__(self, config: TextEncoderConfig, *, attention: str):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config, attention)
        self.final_layer_norm = LayerNormChannels(config.hidden_size, config.layer_norm_eps)

    def forward(self, input_ids, ops=TORCH):
        b, s = ops.shape(input_ids)
        c = self.config.hidden_size
        tokens = ops.cast(ops.gather(self.embeddings.token_embedding.weight, input_ids, 0), self.compute_dtype)
        positions = self.embeddings.position_embedding.weight  # (max positions, c), sliced as an op
        if s < positions.shape[0]:
            positions = ops.slice(positions, 0, 0, s)
        x = ops.add(ops.reshape(tokens, (b, s, c)), ops.reshape(positions, (1, s, c)))
        x = ops.reshape(ops.transpose(x, (0, 2, 1)), (b, c, 1, s))
        mask = causal_mask(s)
        for layer in self.encoder.layers:
            x = layer(x, mask, ops)
        x = self.final_layer_norm(x, ops)
        hidden = ops.transpose(ops.reshape(x, (b, c, s)), (0, 2, 1))  # (b, s, c)
        eos_id = self.config.eos_token_id
        eos = ops.argmax(input_ids if eos_id == 2 else ops.equal(input_ids, eos_id), 1)  # (b,)
        if b > 1:
            eos = ops.add(eos, ops.const(np.arange(b) * s, torch.int32, like=eos))
        pooled = ops.gather(ops.reshape(hidden, (b * s, c)), eos, 0)  # (b, c)
        return hidden, pooled
