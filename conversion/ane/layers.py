"""Building blocks in the Neural Engine's preferred form, with diffusers' parameter names.

Layout facts the Neural Engine rewards (Apple, "Deploying Transformers on the Apple Neural
Engine", 2022): activations as (B, C, 1, S) so the channel axis is the one convolutions and
reductions run along; 1x1 convolutions instead of linear layers (the weight of a linear layer
(out, in) becomes (out, in, 1, 1) at load time, nothing else changes); normalizations computed
over the channel axis without ever building a tensor of rank 5.
"""

from __future__ import annotations

import torch
from torch import nn

from conversion.ane.ops import TORCH


class Rewrite(nn.Module):
    """Base of the top-level rewritten modules: inputs are cast to `compute_dtype` on entry.

    By default that is the weights' dtype (an fp16 model emits an fp16 program). Setting
    `compute_dtype_override = torch.float32` on a module with fp16 weights computes in fp32 with
    each weight upcast as it is used: the parity gate's reference for compressed packages.
    """

    compute_dtype_override: torch.dtype | None = None

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.compute_dtype_override or next(self.parameters()).dtype


def channel_view(t: torch.Tensor) -> torch.Tensor:
    """A per-channel parameter (C,) as (1, C, 1, 1), a view (no copy)."""
    return t.reshape(1, -1, 1, 1)


class Conv2d(nn.Module):
    """A convolution with diffusers' parameter names; 1x1 ones also replace linear layers."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, *, stride: int = 1,
                 padding: int = 0, bias: bool = True):
        super().__init__()
        self.stride, self.padding = stride, padding
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None

    def forward(self, x, ops=TORCH):
        return ops.conv(x, self.weight, self.bias, stride=self.stride, padding=self.padding)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm computed on a rank-4 view (B, G, C/G, H*W) instead of a rank-5 one.

    coremltools lowers torch's group_norm through a (B, G, C/G, H, W) reshape; the Neural Engine
    handles rank-4 tensors best, so the spatial axes are merged first.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float):
        super().__init__()
        self.num_groups, self.eps = num_groups, eps
        self.weight = nn.Parameter(torch.empty(num_channels))
        self.bias = nn.Parameter(torch.empty(num_channels))

    def forward(self, x, ops=TORCH):
        b, c, h, w = ops.shape(x)
        g = ops.reshape(x, (b, self.num_groups, c // self.num_groups, h * w))
        centred = ops.sub(g, ops.mean(g, (2, 3)))
        var = ops.mean(ops.mul(centred, centred), (2, 3))
        g = ops.mul(centred, ops.rsqrt(var, self.eps))
        x = ops.reshape(g, (b, c, h, w))
        return ops.add(ops.mul(x, channel_view(self.weight)), channel_view(self.bias))


class LayerNormChannels(nn.Module):
    """torch.nn.LayerNorm over the channel axis of a (B, C, 1, S) tensor (same parameters)."""

    def __init__(self, num_channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(num_channels))
        self.bias = nn.Parameter(torch.empty(num_channels))

    def forward(self, x, ops=TORCH):
        centred = ops.sub(x, ops.mean(x, (1,)))
        var = ops.mean(ops.mul(centred, centred), (1,))
        x = ops.mul(centred, ops.rsqrt(var, self.eps))
        return ops.add(ops.mul(x, channel_view(self.weight)), channel_view(self.bias))


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D (default time-scale-shift, SiLU): two 3x3 convs and a skip.

    The time embedding arrives as (B, T, 1, 1) and its projection is a 1x1 convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, *, temb_channels: int | None, groups: int,
                 eps: float):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = Conv2d(temb_channels, out_channels) if temb_channels else None
        self.norm2 = GroupNorm(groups, out_channels, eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = Conv2d(in_channels, out_channels) if in_channels != out_channels else None

    def forward(self, x, emb=None, ops=TORCH):
        h = self.conv1(ops.silu(self.norm1(x, ops)), ops)
        if self.time_emb_proj is not None:
            h = ops.add(h, self.time_emb_proj(ops.silu(emb), ops))  # (B, C, 1, 1) broadcast
        h = self.conv2(ops.silu(self.norm2(h, ops)), ops)
        skip = self.conv_shortcut(x, ops) if self.conv_shortcut is not None else x
        return ops.add(skip, h)


class Downsample(nn.Module):
    """A stride-2 3x3 convolution; `padding=0` is the VAE encoder's (0, 1, 0, 1) zero pad."""

    def __init__(self, channels: int, *, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x, ops=TORCH):
        if self.padding == 0:
            x = ops.pad(x, (0, 1, 0, 1))
        return self.conv(x, ops)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, ops=TORCH):
        return self.conv(ops.upsample2x(x), ops)
