"""transformers' CLIPTextModel (SD's text encoder) over (B, C, 1, 77) activations.

Input ids arrive as float32 (B, 77), as Apple's Swift pipeline feeds them; outputs are the
hidden state the family feeds the UNet, (B, 77, C) — the last layer's after the final layer norm
(SD 1.x/2.x: `last_hidden_state`), or another layer's without it (SDXL: `hidden_embeds`, the
penultimate layer's) — and `pooled_outputs`: the final state at the first end-of-text token,
found as transformers does (configs with the legacy eos_token_id 2, SDXL's among them, take the
largest id instead), through the text projection where the model has one (SDXL's OpenCLIP
bigG: its `text_embeds`, (B, P)).
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
    """input_ids float (B, S) -> (hidden state (B, S, C), pooled_outputs (B, C) or (B, P) projected).

    `hidden_layer`: which hidden state, as transformers' `hidden_states[hidden_layer]` (-1: the last
    layer's); `final_norm`: whether it goes through the final layer norm; `projection_dim`: the
    width of a text projection of the pooled output (CLIPTextModelWithProjection), None without.
    """

    def __init__(self, config: TextEncoderConfig, *, attention: str, hidden_layer: int = -1,
                 final_norm: bool = True, projection_dim: int | None = None):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config, attention)
        self.final_layer_norm = LayerNormChannels(config.hidden_size, config.layer_norm_eps)
        n = config.num_hidden_layers
        if not -n - 1 <= hidden_layer <= -1:
            raise ValueError(f"hidden_layer {hidden_layer} is not one of the {n + 1} hidden states")
        self.layers_taken = n + 1 + hidden_layer  # the hidden state after this many layers
        self.final_norm = final_norm
        if projection_dim is not None:
            self.text_projection = Conv2d(config.hidden_size, projection_dim, bias=False)

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
        taken = x
        for i, layer in enumerate(self.encoder.layers):
            x = layer(x, mask, ops)
            if i + 1 == self.layers_taken:
                taken = x
        x = self.final_layer_norm(x, ops)
        if self.layers_taken == len(self.encoder.layers):
            taken = x if self.final_norm else taken
        elif self.final_norm:
            taken = self.final_layer_norm(taken, ops)
        last = ops.transpose(ops.reshape(x, (b, c, s)), (0, 2, 1))  # (b, s, c)
        eos_id = self.config.eos_token_id
        eos = ops.argmax(input_ids if eos_id == 2 else ops.equal(input_ids, eos_id), 1)  # (b,)
        if b > 1:
            eos = ops.add(eos, ops.const(np.arange(b) * s, torch.int32, like=eos))
        pooled = ops.gather(ops.reshape(last, (b * s, c)), eos, 0)  # (b, c)
        if hasattr(self, "text_projection"):  # (b, c, 1, 1) through the 1x1 projection -> (b, p)
            projected = self.text_projection(ops.reshape(pooled, (b, c, 1, 1)), ops)
            pooled = ops.reshape(projected, (b, self.text_projection.weight.shape[0]))
        hidden = last if taken is x else ops.transpose(ops.reshape(taken, (b, c, s)), (0, 2, 1))
        return hidden, pooled
