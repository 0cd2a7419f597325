"""Packages made by plain `coremltools.convert` of diffusers' own tiny modules execute correctly.

fp32 programs must match torch at >= 60 dB PSNR; fp16 programs in `exact` mode at >= 40 dB (what
Core ML's fp16 execution reaches), and `fast` mode (bf16 compute) must stay usable (>= 30 dB).
Attention is covered in the layouts coremltools emits: plain matmul/softmax (default target),
`scaled_dot_product_attention` (iOS18 target), and Apple's per-head einsum split with and
without chunked queries (small modules written here in that layout).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_mil import ct, convert_module, op_types, psnr, run_package, trace
from tiny_models import build_tiny_modules

from coreml_sd.mil import compiler


class UNetWrapper(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class DecoderWrapper(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z, return_dict=False)[0]


class EncoderWrapper(torch.nn.Module):
    """Apple's VAEEncoder contract: mean and log-variance concatenated on channels."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x):
        return self.vae.quant_conv(self.vae.encoder(x))


class TextWrapper(torch.nn.Module):
    """float32 token ids in (Apple's TextEncoder contract), cast to integers inside."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids.long(), return_dict=False)
        return out[0], out[1]


@pytest.fixture(scope="module")
def modules():
    return build_tiny_modules(seed=0)


def _inputs(kind: str):
    g = torch.Generator().manual_seed(1)
    if kind == "unet":
        return {
            "sample": torch.randn(2, 4, 8, 8, generator=g),
            "timestep": torch.tensor([999.0, 21.0]),
            "encoder_hidden_states": torch.randn(2, 77, 32, generator=g),
        }
    if kind == "vae_decoder":
        return {"z": torch.randn(1, 4, 8, 8, generator=g)}
    if kind == "vae_encoder":
        return {"x": torch.rand(1, 3, 16, 16, generator=g) * 2 - 1}
    ids = torch.randint(0, 49406, (1, 77), generator=g)
    ids[0, 0], ids[0, 9:] = 49406, 49407  # BOS, a short prompt, EOS padding (pooled output reads the first EOS)
    return {"input_ids": ids.float()}


_OUTPUTS = {
    "unet": ["noise_pred"],
    "vae_decoder": ["image"],
    "vae_encoder": ["latent"],
    "text_encoder": ["last_hidden_state", "pooled_outputs"],
}


def _module(kind, modules):
    text_encoder, unet, vae = modules
    return {
        "unet": lambda: UNetWrapper(unet),
        "vae_decoder": lambda: DecoderWrapper(vae),
        "vae_encoder": lambda: EncoderWrapper(vae),
        "text_encoder": lambda: TextWrapper(text_encoder),
    }[kind]()


@pytest.fixture(scope="module")
def packages(modules, tmp_path_factory):
    """kind, precision -> converted package path (converted lazily, once per module)."""
    cache, traced = {}, {}
    folder = tmp_path_factory.mktemp("mil_models")

    def get(kind: str, precision: str):
        key = (kind, precision)
        if key not in cache:
            feeds = _inputs(kind)
            if kind not in traced:
                traced[kind] = trace(_module(kind, modules), tuple(feeds.values()))
            cache[key] = convert_module(
                traced[kind], tuple(feeds.values()), list(feeds), folder / f"{kind}_{precision}.mlpackage",
                precision=precision, output_names=_OUTPUTS[kind],
            )
        return cache[key]

    return get


def _reference(kind, modules, feeds):
    with torch.no_grad():
        out = _module(kind, modules)(*feeds.values())
    out = out if isinstance(out, tuple) else (out,)
    return {name: value.numpy() for name, value in zip(_OUTPUTS[kind], out)}


KINDS = ["unet", "vae_decoder", "vae_encoder", "text_encoder"]


@pytest.mark.parametrize("kind", KINDS)
def test_fp32_program_matches_torch_at_60db(kind, modules, packages):
    feeds = _inputs(kind)
    out = run_package(packages(kind, "fp32"), {k: v.numpy() for k, v in feeds.items()}, mode="exact")
    ref = _reference(kind, modules, feeds)
    for name in _OUTPUTS[kind]:
        assert out[name].shape == ref[name].shape
        assert psnr(out[name], ref[name]) >= 60, (name, psnr(out[name], ref[name]))


@pytest.mark.parametrize("kind", KINDS)
def test_fp16_program_in_exact_mode_matches_torch_at_40db(kind, modules, packages, monkeypatch):
    feeds = _inputs(kind)
    path = packages(kind, "fp16")
    assert any(op.endswith("cast") for op in op_types(path))  # it really is an fp16 program
    ref = _reference(kind, modules, feeds)
    arrays = {k: v.numpy() for k, v in feeds.items()}
    exact = run_package(path, arrays, mode="exact")
    fast = run_package(path, arrays, mode="fast", fast_dtype="bf16")
    monkeypatch.setattr(compiler, "SMALL", 0)  # tiny models: without this almost all stays fp32
    fast_all_bf16 = run_package(path, arrays, mode="fast", fast_dtype="bf16")
    for name in _OUTPUTS[kind]:
        assert psnr(exact[name], ref[name]) >= 40, (name, psnr(exact[name], ref[name]))
        assert psnr(fast[name], ref[name]) >= 40, (name, psnr(fast[name], ref[name]))
        assert psnr(fast_all_bf16[name], ref[name]) >= 30, (name, psnr(fast_all_bf16[name], ref[name]))
        # exact mode differs from fp32 because it rounds like Core ML, not by accident
        assert psnr(exact[name], ref[name]) < 120


def test_attention_as_scaled_dot_product_attention_op(modules, tmp_path):
    """With an iOS18 target coremltools keeps torch's SDPA as one op (diffusers' attention blocks)."""
    _, unet, _ = modules
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.eval()  # cross-attention
    g = torch.Generator().manual_seed(4)
    x, context = torch.randn(2, 64, 32, generator=g), torch.randn(2, 77, 32, generator=g)

    class Wrapper(torch.nn.Module):
        def forward(self, x, context):
            return block(x, encoder_hidden_states=context)

    path = convert_module(Wrapper(), (x, context), ["x", "context"], tmp_path / "sdpa.mlpackage",
                          precision="fp16", target=ct.target.iOS18)
    assert "scaled_dot_product_attention" in op_types(path)
    out = next(iter(run_package(path, {"x": x.numpy(), "context": context.numpy()}, mode="exact").values()))
    with torch.no_grad():
        assert psnr(out, Wrapper()(x, context).numpy()) >= 40


def test_plain_unet_attention_is_matmul_softmax(packages):
    types = op_types(packages("unet", "fp32"))
    assert {"matmul", "softmax", "conv", "linear", "layer_norm", "upsample_nearest_neighbor"} <= types


class SplitEinsumAttention(torch.nn.Module):
    """Self-attention in the Neural-Engine layout: (B, C, 1, S) tensors, one einsum pair per head,
    optionally with the queries processed in chunks (the 'v2' layout for long sequences)."""

    def __init__(self, dim=16, heads=2, query_chunk=None):
        super().__init__()
        self.heads, self.head_dim, self.query_chunk = heads, dim // heads, query_chunk
        self.to_q = torch.nn.Conv2d(dim, dim, 1, bias=False)
        self.to_k = torch.nn.Conv2d(dim, dim, 1, bias=False)
        self.to_v = torch.nn.Conv2d(dim, dim, 1, bias=False)
        self.to_out = torch.nn.Conv2d(dim, dim, 1)

    def _head(self, q, k, v):
        # q, v: (B, d, 1, Sq|Sk); k: (B, Sk, 1, d)
        weights = torch.einsum("bchq,bkhc->bkhq", q, k) * self.head_dim**-0.5  # (B, Sk, 1, Sq)
        weights = weights.softmax(dim=1)
        return torch.einsum("bkhq,bchk->bchq", weights, v)  # (B, d, 1, Sq)

    def forward(self, x):  # x: (B, C, 1, S)
        q, k, v = self.to_q(x), self.to_k(x).transpose(1, 3), self.to_v(x)
        d = self.head_dim
        heads = []
        for h in range(self.heads):
            qh, kh, vh = q[:, h * d:(h + 1) * d], k[..., h * d:(h + 1) * d], v[:, h * d:(h + 1) * d]
            if self.query_chunk is None:
                heads.append(self._head(qh, kh, vh))
            else:
                chunks = qh.split(self.query_chunk, dim=3)
                heads.append(torch.cat([self._head(qc, kh, vh) for qc in chunks], dim=3))
        return self.to_out(torch.cat(heads, dim=1))


def _plain_attention(module: SplitEinsumAttention, x):
    """The same attention written with torch's SDPA in (B, S, C) layout, as the reference."""
    b, c, _, s = x.shape
    seq = x[:, :, 0].transpose(1, 2)  # (B, S, C)

    def proj(conv):
        return (seq @ conv.weight[:, :, 0, 0].T).reshape(b, s, module.heads, module.head_dim).transpose(1, 2)

    out = torch.nn.functional.scaled_dot_product_attention(proj(module.to_q), proj(module.to_k), proj(module.to_v))
    out = out.transpose(1, 2).reshape(b, s, c) @ module.to_out.weight[:, :, 0, 0].T + module.to_out.bias
    return out.transpose(1, 2)[:, :, None]


@pytest.mark.parametrize("query_chunk", [None, 4], ids=["split_einsum", "chunked_queries"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_split_einsum_attention_layouts(query_chunk, precision, tmp_path):
    torch.manual_seed(3)
    module = SplitEinsumAttention(query_chunk=query_chunk).eval()
    x = torch.randn(2, 16, 1, 12)
    path = convert_module(module, (x,), ["x"], tmp_path / "attn.mlpackage", precision=precision)
    types = op_types(path)
    assert "einsum" in types and "softmax" in types
    with torch.no_grad():
        reference = _plain_attention(module, x).numpy()
        assert psnr(module(x).numpy(), reference) > 100  # the layout itself is the same attention
    out = next(iter(run_package(path, {"x": x.numpy()}, mode="exact").values()))
    assert psnr(out, reference) >= (60 if precision == "fp32" else 40)
    # exact mode's blocked attention (the default) against the einsum ops one by one
    unfused = next(iter(run_package(path, {"x": x.numpy()}, mode="exact", fuse=False).values()))
    assert psnr(out, unfused) >= (100 if precision == "fp32" else 60)


def _expected_fusions(kind, modules):
    from diffusers.models.attention_processor import Attention
    from transformers.models.clip.modeling_clip import CLIPAttention

    text_encoder, unet, vae = modules
    module = {"unet": unet, "text_encoder": text_encoder, "vae_decoder": vae.decoder, "vae_encoder": vae.encoder}[kind]
    return {
        "fused_attention": sum(isinstance(m, (Attention, CLIPAttention)) for m in module.modules()),
        "fused_group_norm": sum(isinstance(m, torch.nn.GroupNorm) for m in module.modules()),
        "fused_layer_norm": 0,  # coremltools keeps torch's LayerNorm as one `layer_norm` op
        "exact_attention": 0,
    }


@pytest.mark.parametrize("kind", ["unet", "text_encoder", "vae_decoder"])
def test_fast_mode_fuses_every_attention_and_group_norm_without_changing_results(kind, modules, packages):
    """In fp32 compute, fused and op-by-op execution must agree to float rounding."""
    from coreml_sd.mil.executor import Executor
    from coreml_sd.mil.package import load_program

    program = load_program(packages(kind, "fp32"))
    fused = Executor(program, precision_mode="fast", fast_dtype="fp32")
    plain = Executor(program, precision_mode="fast", fast_dtype="fp32", fuse=False)
    assert fused.fused == _expected_fusions(kind, modules)
    assert plain.fused == {"fused_attention": 0, "fused_group_norm": 0, "fused_layer_norm": 0, "exact_attention": 0}
    assert fused.num_steps < plain.num_steps
    feeds = {k: v.numpy() for k, v in _inputs(kind).items()}
    a, b = fused(feeds), plain(feeds)
    for name in _OUTPUTS[kind]:
        assert psnr(a[name].numpy(), b[name].numpy()) >= 100


@pytest.mark.parametrize("kind", ["unet", "text_encoder", "vae_decoder"])
def test_exact_mode_runs_attention_in_query_blocks_with_the_same_roundings(kind, modules, packages, monkeypatch):
    """Exact mode's blocked attention (exact_fusion.py) rounds what the ops round: against the ops
    run one by one, only fp16 rounding flips from the products' summation order may differ.
    Blocks of a few rows, so every attention really is cut (the text encoder's causal mask too)."""
    from coreml_sd.mil import exact_fusion
    from coreml_sd.mil.executor import Executor
    from coreml_sd.mil.package import load_program

    monkeypatch.setattr(exact_fusion, "BLOCK_ELEMENTS", 64)
    program = load_program(packages(kind, "fp16"))
    blocked = Executor(program, precision_mode="exact")
    plain = Executor(program, precision_mode="exact", fuse=False)
    assert blocked.fused["exact_attention"] == _expected_fusions(kind, modules)["fused_attention"] > 0
    assert blocked.fused["fused_attention"] == blocked.fused["fused_group_norm"] == 0
    feeds = {k: v.numpy() for k, v in _inputs(kind).items()}
    full = Executor(program, precision_mode="fast", fast_dtype="fp32", fuse=False)  # no rounding at all
    a, b, c = blocked(feeds), plain(feeds), full(feeds)
    for name in _OUTPUTS[kind]:
        x, y, z = a[name].numpy(), b[name].numpy(), c[name].numpy()
        assert np.array_equal(x, x.astype(np.float16)), "fp16 results stay fp16 values"
        if kind == "text_encoder":  # its products' sums come out the same blocked or not: equal
            np.testing.assert_array_equal(x, y)
        # elsewhere the two differ by rounding flips only, and the blocked run is as far from
        # unrounded fp32 as the op-by-op one
        assert psnr(x, y) >= 60
        assert abs(psnr(x, z) - psnr(y, z)) <= 1.5
