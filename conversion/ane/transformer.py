"""diffusers' Transformer2DModel and BasicTransformerBlock over (B, C, 1, H*W) activations."""

from __future__ import annotations

from torch import nn

from conversion.ane.attention import Attention
from conversion.ane.layers import Conv2d, GroupNorm, LayerNormChannels
from conversion.ane.ops import TORCH


class GEGLU(nn.Module):
    """proj to 2x inner channels, then hidden * gelu(gate) (diffusers' GEGLU, split on channels)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = Conv2d(dim, inner * 2)

    def forward(self, x, ops=TORCH):
        hidden, gate = ops.split(self.proj(x, ops), 2, 1)
        return ops.mul(hidden, ops.gelu(gate))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        # net.1 is diffusers' dropout (no parameters); kept so the names net.0 / net.2 line up.
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Identity(), Conv2d(inner, dim)])

    def forward(self, x, ops=TORCH):
        return self.net[2](self.net[0](x, ops), ops)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, feed-forward; each pre-normed, residual."""

    def __init__(self, dim: int, *, heads: int, cross_attention_dim: int, impl: str, eps: float = 1e-5):
        super().__init__()
        dim_head = dim // heads
        self.norm1 = LayerNormChannels(dim, eps)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim_head, impl=impl)
        self.norm2 = LayerNormChannels(dim, eps)
        self.attn2 = Attention(dim, heads=heads, dim_head=dim_head, impl=impl,
                               cross_attention_dim=cross_attention_dim)
        self.norm3 = LayerNormChannels(dim, eps)
        self.ff = FeedForward(dim)

    def forward(self, x, context, ops=TORCH):
        x = ops.add(self.attn1(self.norm1(x, ops), ops=ops), x)
        x = ops.add(self.attn2(self.norm2(x, ops), context, ops=ops), x)
        return ops.add(self.ff(self.norm3(x, ops), ops), x)


class SpatialTransformer(nn.Module):
    """diffusers' Transformer2DModel (continuous input): norm, proj_in, blocks, proj_out, residual.

    `proj_in`/`proj_out` are 1x1 convolutions whether the checkpoint stored them as convolutions
    (SD 1.x) or as linear layers (SD 2.x, `use_linear_projection`): the loader reshapes the latter.
    """

    def __init__(self, channels: int, *, heads: int, cross_attention_dim: int, impl: str, groups: int,
                 num_layers: int = 1):
        super().__init__()
        self.norm = GroupNorm(groups, channels, 1e-6)
        self.proj_in = Conv2d(channels, channels)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(channels, heads=heads, cross_attention_dim=cross_attention_dim, impl=impl)
            for _ in range(num_layers)
        ])
        self.proj_out = Conv2d(channels, channels)

    def forward(self, x, context, ops=TORCH):
        b, c, h, w = ops.shape(x)
        hidden = self.proj_in(self.norm(x, ops), ops)
        hidden = ops.reshape(hidden, (b, c, 1, h * w))
        for block in self.transformer_blocks:
            hidden = block(hidden, context, ops)
        hidden = self.proj_out(ops.reshape(hidden, (b, c, h, w)), ops)
        return ops.add(hidden, x)
