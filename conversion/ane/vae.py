"""diffusers' AutoencoderKL decoder and encoder, with the mid-block attention in (B, C, 1, H*W).

The decoder module includes `post_quant_conv` and the encoder `quant_conv`, so their packages
map latents (already divided by the scaling factor) to images in [-1, 1] and images to the
latent distribution's mean and log-variance, as Apple's Swift pipeline expects.
"""

from __future__ import annotations

from torch import nn

from conversion.ane.attention import attention
from conversion.ane.config import VAEConfig
from conversion.ane.layers import Conv2d, Downsample, GroupNorm, ResnetBlock, Rewrite, Upsample
from conversion.ane.ops import TORCH

EPS = 1e-6


class VAEAttention(nn.Module):
    """diffusers' single-head `Attention` of the VAE mid block (group_norm, to_q/k/v, to_out.0)."""

    def __init__(self, channels: int, *, groups: int, impl: str):
        super().__init__()
        self.impl = impl
        self.group_norm = GroupNorm(groups, channels, EPS)
        self.to_q = Conv2d(channels, channels)
        self.to_k = Conv2d(channels, channels)
        self.to_v = Conv2d(channels, channels)
        self.to_out = nn.ModuleList([Conv2d(channels, channels)])

    def forward(self, x, ops=TORCH):
        b, c, h, w = ops.shape(x)
        n = self.group_norm(x, ops)
        q, k, v = (ops.reshape(p(n, ops), (b, c, 1, h * w)) for p in (self.to_q, self.to_k, self.to_v))
        out = ops.reshape(attention(q, k, v, heads=1, impl=self.impl, ops=ops), (b, c, h, w))
        return ops.add(self.to_out[0](out, ops), x)


class VAEMidBlock(nn.Module):
    def __init__(self, channels: int, *, groups: int, impl: str, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock(channels, channels, temb_channels=None, groups=groups, eps=EPS) for _ in range(2)])
        if add_attention:
            self.attentions = nn.ModuleList([VAEAttention(channels, groups=groups, impl=impl)])

    def forward(self, x, ops=TORCH):
        x = self.resnets[0](x, ops=ops)
        if hasattr(self, "attentions"):
            x = self.attentions[0](x, ops)
        return self.resnets[1](x, ops=ops)


class _Stage(nn.Module):
    def __init__(self, resnets, *, downsampler=None, upsampler=None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if downsampler is not None:
            self.downsamplers = nn.ModuleList([downsampler])
        if upsampler is not None:
            self.upsamplers = nn.ModuleList([upsampler])

    def forward(self, x, ops=TORCH):
        for r in self.resnets:
            x = r(x, ops=ops)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x, ops)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x, ops)
        return x


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig, impl: str):
        super().__init__()
        g, rev = c.norm_num_groups, tuple(reversed(c.block_out_channels))
        self.conv_in = Conv2d(c.latent_channels, rev[0], 3, padding=1)
        self.mid_block = VAEMidBlock(rev[0], groups=g, impl=impl, add_attention=c.mid_block_attention)
        self.up_blocks = nn.ModuleList()
        prev = rev[0]
        for i, ch in enumerate(rev):
            resnets = [ResnetBlock(prev if j == 0 else ch, ch, temb_channels=None, groups=g, eps=EPS)
                       for j in range(c.layers_per_block + 1)]
            self.up_blocks.append(_Stage(resnets, upsampler=Upsample(ch) if i < len(rev) - 1 else None))
            prev = ch
        self.conv_norm_out = GroupNorm(g, rev[-1], EPS)
        self.conv_out = Conv2d(rev[-1], c.out_channels, 3, padding=1)

    def forward(self, z, ops=TORCH):
        x = self.mid_block(self.conv_in(z, ops), ops)
        for block in self.up_blocks:
            x = block(x, ops)
        return self.conv_out(ops.silu(self.conv_norm_out(x, ops)), ops)


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig, impl: str):
        super().__init__()
        g, chs = c.norm_num_groups, c.block_out_channels
        self.conv_in = Conv2d(c.in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        prev = chs[0]
        for i, ch in enumerate(chs):
            resnets = [ResnetBlock(prev if j == 0 else ch, ch, temb_channels=None, groups=g, eps=EPS)
                       for j in range(c.layers_per_block)]
            self.down_blocks.append(_Stage(resnets, downsampler=Downsample(ch, padding=0)
                                           if i < len(chs) - 1 else None))
            prev = ch
        self.mid_block = VAEMidBlock(chs[-1], groups=g, impl=impl, add_attention=c.mid_block_attention)
        self.conv_norm_out = GroupNorm(g, chs[-1], EPS)
        self.conv_out = Conv2d(chs[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x, ops=TORCH):
        x = self.conv_in(x, ops)
        for block in self.down_blocks:
            x = block(x, ops)
        x = self.mid_block(x, ops)
        return self.conv_out(ops.silu(self.conv_norm_out(x, ops)), ops)


class VAEDecoder(Rewrite):
    """z (B, 4, h, w), already divided by the scaling factor -> image (B, 3, 8h, 8w) in [-1, 1]."""

    def __init__(self, config: VAEConfig, *, attention: str):
        super().__init__()
        if config.use_post_quant_conv:
            self.post_quant_conv = Conv2d(config.latent_channels, config.latent_channels)
        self.decoder = Decoder(config, attention)

    def forward(self, z, ops=TORCH):
        z = ops.cast(z, self.compute_dtype)
        if hasattr(self, "post_quant_conv"):
            z = self.post_quant_conv(z, ops)
        return self.decoder(z, ops)


class VAEEncoder(Rewrite):
    """x (B, 3, H, W) in [-1, 1] -> (B, 8, H/8, W/8): the latent distribution's mean, log-variance."""

    def __init__(self, config: VAEConfig, *, attention: str):
        super().__init__()
        self.encoder = Encoder(config, attention)
        if config.use_quant_conv:
            self.quant_conv = Conv2d(2 * config.latent_channels, 2 * config.latent_channels)

    def forward(self, x, ops=TORCH):
        x = self.encoder(ops.cast(x, self.compute_dtype), ops)
        return self.quant_conv(x, ops) if hasattr(self, "quant_conv") else x
