"""diffusers' UNet2DConditionModel (SD 1.x / 2.x) rewritten for the Neural Engine.

Same parameter names as diffusers, so its state dict loads strictly (linear weights reshaped to
1x1 convolutions). Differences in form only:

* the text embedding arrives as (B, C, 1, 77), the layout of Apple's Swift pipeline;
* the time embedding is (B, C, 1, 1) and every projection of it a 1x1 convolution;
* the sinusoidal timestep features are computed in fp32 whatever the model dtype: in fp16,
  t * freq for t near 1000 is off by up to 0.5 and sin() of it is noise.

The forward pass is a list of stages over a `UNetState` (current features, time embedding, skip
connections), so the network can be cut into two halves between any two stages (`UnetChunk1/2`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from conversion.ane.config import UNetConfig
from conversion.ane.layers import Conv2d, Downsample, GroupNorm, ResnetBlock, Rewrite, Upsample
from conversion.ane.ops import TORCH
from conversion.ane.transformer import SpatialTransformer


@dataclass(frozen=True)
class UNetState:
    h: object
    emb: object
    skips: tuple


@dataclass(frozen=True)
class Stage:
    kind: str  # "in" | "down" | "downsample" | "mid" | "up" | "upsample" | "out"
    block: int = -1
    layer: int = -1

    @property
    def name(self) -> str:
        return "_".join(str(p) for p in (self.kind, self.block, self.layer) if p != -1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.linear_1 = Conv2d(in_channels, channels)
        self.linear_2 = Conv2d(channels, channels)

    def forward(self, x, ops=TORCH):
        return self.linear_2(ops.silu(self.linear_1(x, ops)), ops)


class _Block(nn.Module):
    """A down or up block: resnets, optional transformers, optional resampler (diffusers names)."""

    def __init__(self, resnets, attentions=None, downsampler=None, upsampler=None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if attentions is not None:
            self.attentions = nn.ModuleList(attentions)
        if downsampler is not None:
            self.downsamplers = nn.ModuleList([downsampler])
        if upsampler is not None:
            self.upsamplers = nn.ModuleList([upsampler])

    def attention(self, j: int):
        return self.attentions[j] if hasattr(self, "attentions") else None


class MidBlock(nn.Module):
    def __init__(self, resnets, attentions):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)


class UNet(Rewrite):
    def __init__(self, config: UNetConfig, *, attention: str):
        super().__init__()
        self.config = config
        self._build_encoder(config, attention)
        self._build_decoder(config, attention)

    def _resnet(self, cin: int, cout: int) -> ResnetBlock:
        c = self.config
        return ResnetBlock(cin, cout, temb_channels=c.block_out_channels[0] * 4, groups=c.norm_num_groups,
                           eps=c.norm_eps)

    def _transformer(self, ch: int, block: int, attention: str) -> SpatialTransformer:
        c = self.config
        return SpatialTransformer(ch, heads=c.heads[block], cross_attention_dim=c.cross_attention_dim, impl=attention,
                                  groups=c.norm_num_groups, num_layers=c.transformer_layers[block])

    def _build_encoder(self, c: UNetConfig, attention: str) -> None:
        """The input half (conv_in, time and extra embeddings, down blocks, middle block): all a
        ControlNet has of a UNet."""
        ch0 = c.block_out_channels[0]
        temb = ch0 * 4
        self.conv_in = Conv2d(c.in_channels, ch0, 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch0, temb)
        if c.class_embed_type:
            self.class_embedding = TimestepEmbedding(c.projection_dim, temb)
        if c.addition_embed_type:
            self.add_embedding = TimestepEmbedding(c.projection_dim, temb)
        n = len(c.block_out_channels)
        self.down_blocks = nn.ModuleList()
        cout = ch0
        for i, kind in enumerate(c.down_block_types):
            cin, cout = cout, c.block_out_channels[i]
            self.down_blocks.append(_Block(
                [self._resnet(cin if j == 0 else cout, cout) for j in range(c.layers_per_block)],
                [self._transformer(cout, i, attention) for _ in range(c.layers_per_block)]
                if kind.startswith("CrossAttn") else None,
                downsampler=Downsample(cout, padding=1) if i < n - 1 else None,
            ))
        top = c.block_out_channels[-1]
        self.mid_block = MidBlock([self._resnet(top, top), self._resnet(top, top)], [self._transformer(top, n - 1, attention)])

    def _build_decoder(self, c: UNetConfig, attention: str) -> None:
        n, ch0 = len(c.block_out_channels), c.block_out_channels[0]
        rev = tuple(reversed(c.block_out_channels))
        self.up_blocks = nn.ModuleList()
        prev = c.block_out_channels[-1]
        for i, kind in enumerate(c.up_block_types):
            cout, cskip_in = rev[i], rev[min(i + 1, n - 1)]
            layers = c.layers_per_block + 1
            resnets = [self._resnet((prev if j == 0 else cout) + (cskip_in if j == layers - 1 else cout), cout)
                       for j in range(layers)]
            attns = ([self._transformer(cout, n - 1 - i, attention) for _ in range(layers)]
                     if kind.startswith("CrossAttn") else None)
            self.up_blocks.append(_Block(resnets, attns, upsampler=Upsample(cout) if i < n - 1 else None))
            prev = cout
        self.conv_norm_out = GroupNorm(c.norm_num_groups, ch0, c.norm_eps)
        self.conv_out = Conv2d(ch0, c.out_channels, 3, padding=1)

    # -- stages ---------------------------------------------------------------------------------
    def encoder_stages(self) -> list[Stage]:
        """The input half's stages, up to and including the middle block."""
        out = [Stage("in")]
        for i, block in enumerate(self.down_blocks):
            out += [Stage("down", i, j) for j in range(len(block.resnets))]
            if hasattr(block, "downsamplers"):
                out.append(Stage("downsample", i))
        return out + [Stage("mid")]

    def stages(self) -> list[Stage]:
        out = self.encoder_stages()
        for i, block in enumerate(self.up_blocks):
            out += [Stage("up", i, j) for j in range(len(block.resnets))]
            if hasattr(block, "upsamplers"):
                out.append(Stage("upsample", i))
        return out + [Stage("out")]

    def stage_modules(self, stage: Stage) -> list[nn.Module]:
        if stage.kind == "in":
            return [self.conv_in, self.time_embedding] + [getattr(self, n) for n in ("class_embedding", "add_embedding")
                                                         if hasattr(self, n)]
        if stage.kind == "out":
            return [self.conv_norm_out, self.conv_out]
        if stage.kind == "mid":
            return [self.mid_block]
        block = (self.down_blocks if stage.kind.startswith("down") else self.up_blocks)[stage.block]
        if stage.kind in ("downsample", "upsample"):
            return [getattr(block, stage.kind + "rs")[0]]
        attn = block.attention(stage.layer)
        return [block.resnets[stage.layer]] + ([attn] if attn is not None else [])

    def run_stage(self, stage: Stage, state: UNetState, context, ops=TORCH) -> UNetState:
        h, emb, skips = state.h, state.emb, state.skips
        if stage.kind in ("down", "up"):
            block = (self.down_blocks if stage.kind == "down" else self.up_blocks)[stage.block]
            if stage.kind == "up":
                h, skips = ops.concat([h, skips[-1]], 1), skips[:-1]
            h = block.resnets[stage.layer](h, emb, ops)
            attn = block.attention(stage.layer)
            if attn is not None:
                h = attn(h, context, ops)
            return UNetState(h, emb, skips + (h,) if stage.kind == "down" else skips)
        if stage.kind == "downsample":
            h = self.down_blocks[stage.block].downsamplers[0](h, ops)
            return UNetState(h, emb, skips + (h,))
        if stage.kind == "upsample":
            return UNetState(self.up_blocks[stage.block].upsamplers[0](h, ops), emb, skips)
        if stage.kind == "mid":
            mid = self.mid_block
            h = mid.resnets[0](h, emb, ops)
            h = mid.resnets[1](mid.attentions[0](h, context, ops), emb, ops)
            return UNetState(h, emb, skips)
        if stage.kind == "out":
            return UNetState(self.conv_out(ops.silu(self.conv_norm_out(h, ops)), ops), emb, skips)
        raise ValueError(f"unknown stage {stage}")

    def begin(self, sample, timestep, extra=(), ops=TORCH) -> UNetState:
        """The "in" stage: conv_in and the time embedding (plus the extra inputs' embeddings, in
        `config.extra_inputs` order)."""
        dtype = self.compute_dtype
        h = self.conv_in(ops.cast(sample, dtype), ops)
        emb = self.time_embedding(ops.cast(self.time_features(timestep, ops), dtype), ops)
        extra = dict(zip(self.config.extra_inputs, extra))
        if self.config.class_embed_type:  # "projection": the class labels are the embedding's input
            labels = ops.cast(extra["class_labels"], dtype)
            emb = ops.add(emb, self.class_embedding(ops.reshape(labels, (*ops.shape(labels), 1, 1)), ops))
        if self.config.addition_embed_type:  # "text_time" (SDXL): text_embeds and sinusoidal time_ids
            emb = ops.add(emb, self.add_embedding(self._text_time(extra["text_embeds"], extra["time_ids"], ops), ops))
        return UNetState(h, emb, (h,))

    def _text_time(self, text_embeds, time_ids, ops=TORCH):
        """(B, T + k * d, 1, 1): the pooled text embedding beside d sinusoidal features of each time id."""
        batch, k = ops.shape(time_ids)
        feats = self.sinusoid(ops.reshape(time_ids, (-1,)), self.config.addition_time_embed_dim, ops)  # (B * k, d)
        feats = ops.reshape(feats, (batch, k * self.config.addition_time_embed_dim))
        both = ops.concat([ops.cast(text_embeds, torch.float32), feats], 1)
        return ops.reshape(ops.cast(both, self.compute_dtype), (batch, ops.shape(both)[1], 1, 1))

    def time_features(self, timestep, ops=TORCH):
        """Sinusoidal timestep features (B, C, 1, 1) in fp32, as diffusers' get_timestep_embedding."""
        dim = self.config.block_out_channels[0]
        feats = self.sinusoid(timestep, dim, ops)
        return ops.reshape(feats, (ops.shape(feats)[0], dim, 1, 1))

    def sinusoid(self, values, dim: int, ops=TORCH):
        """(N,) -> (N, dim) sinusoidal features in fp32 (diffusers' get_timestep_embedding, even dim)."""
        c = self.config
        half = dim // 2
        exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32) / (half - c.freq_shift)
        freqs = torch.exp(exponent).reshape(1, half).numpy()
        t = ops.reshape(ops.cast(values, torch.float32), (-1, 1))
        args = ops.mul(t, ops.const(freqs, torch.float32, like=t))  # (N, half)
        parts = [ops.cos(args), ops.sin(args)] if c.flip_sin_to_cos else [ops.sin(args), ops.cos(args)]
        return ops.concat(parts, 1)

    def run(self, state: UNetState, context, stages: list[Stage], ops=TORCH, residuals=None) -> UNetState:
        """Run `stages` from `state`. `residuals` (a ControlledUnet's, ControlNet's order: one per skip, then
        the middle block's): as diffusers, added to the skips once the down blocks are done and to the
        middle block's output."""
        context = ops.cast(context, self.compute_dtype)
        for stage in stages:
            if residuals and stage.kind == "mid":
                res = [ops.cast(r, self.compute_dtype) for r in residuals]
                state = UNetState(state.h, state.emb, tuple(ops.add(s, r) for s, r in zip(state.skips, res[:-1])))
                state = self.run_stage(stage, state, context, ops)
                state = UNetState(ops.add(state.h, res[-1]), state.emb, state.skips)
            else:
                state = self.run_stage(stage, state, context, ops)
        return state

    def forward(self, sample, timestep, encoder_hidden_states, *extra, residuals=(), ops=TORCH):
        """sample (B, 4, h, w), timestep (B,), encoder_hidden_states (B, C, 1, 77), and the extra inputs
        in `config.extra_inputs` order (class_labels, or text_embeds and time_ids) -> (B, 4, h, w).
        `residuals`: ControlNet residuals (a ControlledUnet)."""
        state = self.begin(sample, timestep, extra, ops)
        return self.run(state, encoder_hidden_states, self.stages()[1:], ops, residuals).h

    def residual_shapes(self, batch: int, latent_hw: tuple[int, int]) -> list[tuple[int, ...]]:
        return residual_shapes(self.config, batch, latent_hw)


def residual_shapes(c: UNetConfig, batch: int, latent_hw: tuple[int, int]) -> list[tuple[int, ...]]:
    """Shapes of the ControlNet residuals a UNet takes at a latent size: one per skip (conv_in's, each
    down layer's, each downsampler's), then the middle block's (Apple's additional_residual_0..N)."""
    h, w = latent_hw
    shapes = [(batch, c.block_out_channels[0], h, w)]
    for i, ch in enumerate(c.block_out_channels):
        shapes += [(batch, ch, h, w)] * c.layers_per_block
        if i < len(c.block_out_channels) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2  # 3x3, stride 2, padding 1
            shapes.append((batch, ch, h, w))
    return shapes + [(batch, c.block_out_channels[-1], h, w)]


def parameter_bytes(modules: list[nn.Module]) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def chunk_boundary(unet: UNet) -> int:
    """Index of the first stage of the second half, balancing the halves' weight bytes."""
    stages = unet.stages()
    sizes = [parameter_bytes(unet.stage_modules(s)) for s in stages]
    total, best, acc, best_gap = sum(sizes), 1, 0, None
    for k in range(1, len(stages)):
        acc += sizes[k - 1]
        gap = abs(total - 2 * acc)
        if best_gap is None or gap < best_gap:
            best, best_gap = k, gap
    return best
