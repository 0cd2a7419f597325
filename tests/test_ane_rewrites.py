"""The Neural-Engine rewrites compute what diffusers/transformers compute (fp32, tiny models).

Each rewrite loads the upstream module's weights strictly (same names; linear weights reshaped to
1x1 convolutions) and must match it within 1e-4 (max abs), for every attention layout.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coreml_sd.errors import ModelError
from conversion.ane import (text_encoder_from_transformers, unet_from_diffusers, vae_decoder_from_diffusers,
                            vae_encoder_from_diffusers)
from conversion.ane.attention import ATTENTION_IMPLEMENTATIONS, attention, causal_mask
from conversion.ane.layers import GroupNorm, LayerNormChannels
from tiny_models import TEXT_CONFIG, UNET_CONFIG, build_tiny_modules

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_modules(seed=0)


def _max_diff(a, b) -> float:
    return float((a - b).detach().abs().max())


def _unet_inputs(batch=2, size=8, context_dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, size, size, generator=g)
    timestep = torch.tensor([981.0, 1.0][:batch])
    context = torch.randn(batch, 77, context_dim, generator=g)
    return sample, timestep, context


def _ane_context(context):  # (B, 77, C) -> (B, C, 1, 77), the packages' layout
    return context.transpose(1, 2).unsqueeze(2)


@pytest.mark.parametrize("impl", ATTENTION_IMPLEMENTATIONS)
def test_unet_rewrite_equals_diffusers(tiny, impl):
    _, unet, _ = tiny
    sample, t, context = _unet_inputs()
    with torch.no_grad():
        ref = unet(sample, t, encoder_hidden_states=context).sample
        out = unet_from_diffusers(unet, attention=impl)(sample, t, _ane_context(context))
    assert ref.abs().max() > 0.1  # a real signal, not a vanishing output
    assert _max_diff(out, ref) <= TOL


def test_unet_rewrite_with_chunked_queries_equals_diffusers(tiny):
    """At 32x32 latents the first blocks attend over 1024 tokens: two query chunks of 512 (v2)."""
    _, unet, _ = tiny
    sample, t, context = _unet_inputs(size=32)
    with torch.no_grad():
        ref = unet(sample, t, encoder_hidden_states=context).sample
        out = unet_from_diffusers(unet, attention="split_einsum_v2")(sample, t, _ane_context(context))
    assert _max_diff(out, ref) <= TOL


def test_sd2_style_unet_linear_projection_and_head_list():
    """SD 2.x: linear proj_in/proj_out (loaded as 1x1 convs), per-block head counts, 1 head block."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(3)
    cfg = dict(UNET_CONFIG, use_linear_projection=True, attention_head_dim=(2, 4), cross_attention_dim=48,
               upcast_attention=True)
    unet = UNet2DConditionModel(**cfg).eval()
    assert unet.down_blocks[0].attentions[0].proj_in.weight.ndim == 2  # linear in diffusers
    sample, t, context = _unet_inputs(context_dim=48)
    with torch.no_grad():
        ref = unet(sample, t, encoder_hidden_states=context).sample
        rewrite = unet_from_diffusers(unet, attention="split_einsum")
        out = rewrite(sample, t, _ane_context(context))
    assert rewrite.down_blocks[0].attentions[0].proj_in.weight.shape == (32, 32, 1, 1)
    assert rewrite.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == 2
    assert _max_diff(out, ref) <= TOL


def test_unet_stages_split_anywhere_equal_the_whole(tiny):
    """The chunking primitive: running stages [0, k) then [k, n) equals one forward, for every k."""
    from conversion.ane.unet import chunk_boundary

    _, unet, _ = tiny
    rewrite = unet_from_diffusers(unet)
    sample, t, context = _unet_inputs()
    c = _ane_context(context)
    stages = rewrite.stages()
    with torch.no_grad():
        whole = rewrite(sample, t, c)
        for k in range(1, len(stages)):
            state = rewrite.run(rewrite.begin(sample, t), c, stages[1:k])
            out = rewrite.run(state, c, stages[k:]).h
            assert torch.equal(out, whole), k
    assert 1 <= chunk_boundary(rewrite) < len(stages)


@pytest.mark.parametrize("impl", ["split_einsum_v2", "original"])
def test_vae_decoder_and_encoder_rewrites_equal_diffusers(tiny, impl):
    _, _, vae = tiny
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 8, 8, generator=g)
    x = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        ref_image = vae.decode(z).sample
        ref_moments = vae.encode(x).latent_dist.parameters
        image = vae_decoder_from_diffusers(vae, attention=impl)(z)
        moments = vae_encoder_from_diffusers(vae, attention=impl)(x)
    assert _max_diff(image, ref_image) <= TOL
    assert _max_diff(moments, ref_moments) <= TOL


@pytest.mark.parametrize("impl", ATTENTION_IMPLEMENTATIONS)
def test_text_encoder_rewrite_equals_transformers(tiny, impl):
    text_encoder, _, _ = tiny
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])
    with torch.no_grad():
        ref = text_encoder(ids)
        hidden, pooled = text_encoder_from_transformers(text_encoder, attention=impl)(ids.float())
    assert _max_diff(hidden, ref.last_hidden_state) <= TOL
    assert _max_diff(pooled, ref.pooler_output) <= TOL


def test_text_encoder_pooled_output_follows_transformers_eos_rules():
    """eos_token_id 2 (legacy configs): the largest id's position; else the first eos_token_id."""
    from transformers import CLIPTextConfig, CLIPTextModel

    # largest id (49407) at 3; token 320 first at 1, again at 5: the two rules pick 3 and 1.
    ids = torch.tensor([[49406, 320, 1125, 49407, 539, 320] + [0] * 71])
    for eos in (2, 320):
        torch.manual_seed(0)
        model = CLIPTextModel(CLIPTextConfig(**dict(TEXT_CONFIG, eos_token_id=eos))).eval()
        with torch.no_grad():
            ref = model(ids).pooler_output
            _, pooled = text_encoder_from_transformers(model)(ids.float())
        assert _max_diff(pooled, ref) <= TOL, eos


def test_gelu_text_encoder_and_batch_of_two():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1)
    model = CLIPTextModel(CLIPTextConfig(**dict(TEXT_CONFIG, hidden_act="gelu"))).eval()
    ids = torch.randint(0, 49406, (2, 77))
    ids[:, 0], ids[0, 9:], ids[1, 20:] = 49406, 49407, 49407
    with torch.no_grad():
        ref = model(ids)
        hidden, pooled = text_encoder_from_transformers(model)(ids.float())
    assert _max_diff(hidden, ref.last_hidden_state) <= TOL
    assert _max_diff(pooled, ref.pooler_output) <= TOL


# -- building blocks ------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ATTENTION_IMPLEMENTATIONS)
@pytest.mark.parametrize("sq,sk,heads", [(1300, 77, 4), (77, 77, 2), (600, 600, 1)])
def test_attention_layouts_equal_sdpa(impl, sq, sk, heads):
    """(B, C, 1, S) attention vs torch's SDPA, with query lengths that are not a multiple of the chunk."""
    g = torch.Generator().manual_seed(sq)
    c = 16 * heads
    q, k, v = (torch.randn(2, c, 1, s, generator=g) for s in (sq, sk, sk))

    def heads_first(x):  # (B, C, 1, S) -> (B, heads, S, d)
        return x.reshape(2, heads, c // heads, -1).transpose(2, 3)

    mask = causal_mask(sq) if sq == sk else None
    ref = torch.nn.functional.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v),
                                                           is_causal=mask is not None)
    ref = ref.transpose(2, 3).reshape(2, c, 1, sq)
    out = attention(q, k, v, heads=heads, impl=impl, mask=mask)
    assert _max_diff(out, ref) <= TOL


def test_group_norm_and_channel_layer_norm_equal_torch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 6, 5, generator=g) * 3 + 1
    ref_gn = torch.nn.GroupNorm(8, 32, eps=1e-6)
    torch.nn.init.normal_(ref_gn.weight, generator=g)
    torch.nn.init.normal_(ref_gn.bias, generator=g)
    gn = GroupNorm(8, 32, 1e-6)
    gn.load_state_dict(ref_gn.state_dict())
    assert _max_diff(gn(x), ref_gn(x)) <= TOL

    s = torch.randn(2, 32, 1, 7, generator=g)
    ref_ln = torch.nn.LayerNorm(32, eps=1e-5)
    torch.nn.init.normal_(ref_ln.weight, generator=g)
    ln = LayerNormChannels(32, 1e-5)
    ln.load_state_dict(ref_ln.state_dict())
    expected = ref_ln(s.squeeze(2).transpose(1, 2)).transpose(1, 2).unsqueeze(2)
    assert _max_diff(ln(s), expected) <= TOL


# -- strict loading -------------------------------------------------------------------------------
def test_rewrite_shares_the_upstream_tensors(tiny):
    """Loaded by assignment: the conv weight is a view of diffusers' linear weight (no copy)."""
    _, unet, _ = tiny
    rewrite = unet_from_diffusers(unet)
    up = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    ours = rewrite.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    assert ours.shape == (*up.shape, 1, 1)
    assert ours.data_ptr() == up.data_ptr()


def test_loading_is_strict_about_names_and_shapes(tiny):
    from conversion.ane.loading import load_rewrite
    from conversion.ane.unet import UNet
    from conversion.ane.config import UNetConfig

    _, unet, _ = tiny
    config = UNetConfig.from_diffusers(unet.config)
    state = dict(unet.state_dict())
    missing = {k: v for k, v in state.items() if k != "conv_in.weight"}
    with pytest.raises(ModelError, match="missing conv_in.weight"):
        load_rewrite(lambda: UNet(config, attention="original"), missing, what="UNet")
    extra = dict(state, **{"time_embedding.extra.weight": torch.zeros(1)})
    with pytest.raises(ModelError, match="unexpected time_embedding.extra.weight"):
        load_rewrite(lambda: UNet(config, attention="original"), extra, what="UNet")
    wrong = dict(state, **{"conv_out.weight": torch.zeros(4, 32, 1, 1)})
    with pytest.raises(ModelError, match=r"conv_out.weight: expected shape \(4, 32, 3, 3\), found \(4, 32, 1, 1\)"):
        load_rewrite(lambda: UNet(config, attention="original"), wrong, what="UNet")


def test_unsupported_configs_are_named():
    from conversion.ane.config import UNetConfig

    with pytest.raises(ModelError, match="class_embed_type='timestep' is not supported"):
        UNetConfig.from_diffusers(dict(UNET_CONFIG, class_embed_type="timestep"))
    with pytest.raises(ModelError, match="unknown key.*brand_new_option"):
        UNetConfig.from_diffusers(dict(UNET_CONFIG, brand_new_option=1))
    with pytest.raises(ModelError, match="down block type 'SimpleCrossAttnDownBlock2D' is not supported"):
        UNetConfig.from_diffusers(dict(UNET_CONFIG, down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D")))
    with pytest.raises(ModelError, match="unknown attention implementation 'flash'"):
        unet_from_diffusers(build_tiny_modules()[1], attention="flash")


def test_diffusers_saved_config_is_accepted(tiny):
    """Every key diffusers writes for an SD-architecture UNet is known (new keys must be reviewed)."""
    from conversion.ane.config import UNetConfig

    _, unet, _ = tiny
    cfg = UNetConfig.from_diffusers(unet.config)
    assert cfg.heads == (8, 8) and cfg.block_out_channels == (32, 64) and cfg.downscale == 2
    assert np.isclose(cfg.norm_eps, 1e-5)
