"""diffusers' ControlNetModel rewritten for the Neural Engine: the UNet rewrite's input half plus its own parts.

A ControlNet is a copy of the UNet's input half (conv_in, time embedding, down blocks, middle block)
that also embeds a conditioning image, and a 1x1 "zero" convolution per skip connection and for the
middle block. So the rewrite is the UNet rewrite (`conversion.ane.unet.UNet`: same layouts, same
stages, same parameter names) built without its up half, plus diffusers' names for the rest:

    controlnet_cond_embedding   conv_in, blocks, conv_out (SiLU after each but the last)
    controlnet_down_blocks.{i}  the zero convolution of skip i
    controlnet_mid_block        the middle block's

forward(sample, timestep, encoder_hidden_states (B, C, 1, 77), controlnet_cond (B, 3, H, W) in [0, 1],
*extra) -> the residuals, unscaled, down blocks then middle block (Apple's `additional_residual_0..N`).
"""

from __future__ import annotations

from torch import nn

from conversion.ane.config import ControlNetConfig
from conversion.ane.layers import Conv2d
from conversion.ane.ops import TORCH
from conversion.ane.unet import Stage, UNet, UNetState


class ConditioningEmbedding(nn.Module):
    """diffusers' ControlNetConditioningEmbedding: the image down to the latent size, to conv_in's width."""

    def __init__(self, channels: int, widths: tuple[int, ...], out_channels: int):
        super().__init__()
        self.conv_in = Conv2d(channels, widths[0], 3, padding=1)
        blocks = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            blocks += [Conv2d(cin, cin, 3, padding=1), Conv2d(cin, cout, 3, stride=2, padding=1)]
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, x, ops=TORCH):
        x = ops.silu(self.conv_in(x, ops))
        for block in self.blocks:
            x = ops.silu(block(x, ops))
        return self.conv_out(x, ops)


class ControlNet(UNet):
    def __init__(self, config: ControlNetConfig, *, attention: str):
        nn.Module.__init__(self)
        self.config = c = config.unet
        self.controlnet_config = config
        self._build_encoder(c, attention)
        ch0 = c.block_out_channels[0]
        self.controlnet_cond_embedding = ConditioningEmbedding(config.conditioning_channels, config.hint_channels, ch0)
        widths = [ch0]
        for i, ch in enumerate(c.block_out_channels):
            widths += [ch] * c.layers_per_block + ([ch] if i < len(c.block_out_channels) - 1 else [])
        self.controlnet_down_blocks = nn.ModuleList(Conv2d(w, w) for w in widths)
        self.controlnet_mid_block = Conv2d(c.block_out_channels[-1], c.block_out_channels[-1])

    def stages(self) -> list[Stage]:
        return self.encoder_stages()

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, *extra, ops=TORCH):
        state = self.begin(sample, timestep, extra, ops)
        cond = self.controlnet_cond_embedding(ops.cast(controlnet_cond, self.compute_dtype), ops)
        h = ops.add(state.h, cond)  # conv_in(sample) + the image's embedding, the first skip too
        state = self.run(UNetState(h, state.emb, (h,)), encoder_hidden_states, self.stages()[1:], ops)
        down = [conv(skip, ops) for conv, skip in zip(self.controlnet_down_blocks, state.skips)]
        return (*down, self.controlnet_mid_block(state.h, ops))
