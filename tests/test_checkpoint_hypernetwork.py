"""AUTOMATIC1111 hypernetworks: attention with the key/value context rewritten, checked directly."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from helpers_checkpoint import write_hypernetwork  # noqa: E402
from tiny_models import build_tiny_modules  # noqa: E402

from coreml_sd.checkpoint.hypernetwork import install, load_hypernetwork  # noqa: E402
from coreml_sd.errors import ModelError  # noqa: E402
from coreml_sd.sources import open_model  # noqa: E402


def direct_attention(attn, x, ctx, key_net, value_net, strength):
    """Attention computed by hand with k/v context = context + strength * mlp(context)."""
    k_ctx, v_ctx = ctx + strength * key_net(ctx), ctx + strength * value_net(ctx)
    q, k, v = attn.to_q(x), attn.to_k(k_ctx), attn.to_v(v_ctx)
    b, n, heads = x.shape[0], x.shape[1], attn.heads
    split = lambda t: t.view(b, t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731  (b, heads, seq, dim_head)
    q, k, v = split(q), split(k), split(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, -1)
    return attn.to_out[0](out)


@pytest.mark.parametrize("kw", [{}, {"activation": "swish", "layer_norm": False, "dropout": (0, 0, 0)},
                                {"activation": "tanh", "activate_output": True}])
def test_cross_attention_matches_direct_computation(tmp_path, kw):
    _, unet, _ = build_tiny_modules(0)
    path, nets = write_hypernetwork(tmp_path / "toon.pt", **kw)
    net = load_hypernetwork(path)
    patched = copy.deepcopy(unet)
    assert install(patched, net, 0.7) > 0
    attn = patched.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 16, 32, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        got = attn(x, encoder_hidden_states=ctx)
        expected = direct_attention(attn, x, ctx, nets[32][0], nets[32][1], 0.7)
    assert torch.allclose(got, expected, atol=1e-5)
    plain = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    assert not torch.allclose(plain(x, encoder_hidden_states=ctx), got, atol=1e-3)


def test_strength_zero_is_the_plain_unet_and_widths_select_layers(tmp_path):
    _, unet, _ = build_tiny_modules(0)
    path, _ = write_hypernetwork(tmp_path / "toon.pt", widths=(32, 64))
    net = load_hypernetwork(path)
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    zero, full = copy.deepcopy(unet), copy.deepcopy(unet)
    # Every attention with a 32- or 64-wide context: cross-attention (32) and the self-attention of
    # both levels (32, 64 channels), as AUTOMATIC1111 applies it.
    n_attn = sum(1 for n, _ in unet.named_modules() if n.endswith((".attn1", ".attn2")))
    assert install(zero, net, 0.0) == n_attn
    install(full, net, 1.0)
    with torch.no_grad():
        base = unet(x, 500, encoder_hidden_states=ctx).sample
        assert torch.allclose(zero(x, 500, encoder_hidden_states=ctx).sample, base, atol=1e-5)
        assert not torch.allclose(full(x, 500, encoder_hidden_states=ctx).sample, base, atol=1e-3)


def test_hypernetwork_for_another_width_is_refused(tmp_path):
    _, unet, _ = build_tiny_modules(0)
    path, _ = write_hypernetwork(tmp_path / "sd1.pt", widths=(48,))
    with pytest.raises(ModelError, match="no attention layer"):
        install(unet, load_hypernetwork(path), 1.0)


def test_source_lists_the_hypernetwork_in_generation_settings(tiny_diffusers_dir, tmp_path):
    path, _ = write_hypernetwork(tmp_path / "toon.pt")
    source = open_model(tiny_diffusers_dir, hypernetworks=[(path, 0.6)])
    extras = source.generation_extras
    assert extras["Hypernet"] == "toon" and extras["Hypernet strength"] == "0.6" and len(extras["Hypernet hash"]) == 10
    unet = source.torch_modules(device="cpu", dtype=torch.float32).unet
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    assert type(attn.processor).__name__ == "HypernetworkAttnProcessor"


def test_networks_follow_the_unet_to_its_device(tmp_path):
    """The MLPs are loaded on the CPU; installed on a UNet on another device (CUDA, MPS; here the
    meta device) they are moved with it, so no attention mixes devices."""
    _, unet, _ = build_tiny_modules(0)
    path, _ = write_hypernetwork(tmp_path / "toon.pt")
    unet = unet.to("meta")
    install(unet, load_hypernetwork(path), 1.0)
    processor = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.processor
    tensors = [t for mlp in processor.pair for w, b, ln in mlp.layers for t in (w, b, *(ln or ()))]
    assert tensors and all(t.device.type == "meta" for t in tensors)
