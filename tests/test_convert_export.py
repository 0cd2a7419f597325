"""conversion.export: the emitted ML programs compute what the torch modules compute.

Every primitive is emitted into a one-op program, executed by the `mil` executor and compared
with its torch form; whole emitted UNets are checked for the Neural-Engine form (no linear op,
no tensor of rank > 4) and for compression ratios.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from coreml_sd.mil.executor import Executor
from coreml_sd.mil.package import load_program, program_from_function
from conversion.ane import unet_from_diffusers
from conversion.ane.ops import TORCH
from conversion.export import TensorIO, build_program, compress, kmeans_lut, to_mlmodel
from tiny_models import UNET_CONFIG, build_tiny_modules


class _Params(torch.nn.Module):
    def __init__(self, **tensors):
        super().__init__()
        for name, t in tensors.items():
            self.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))


def _run_both(fn, module, arrays: dict[str, np.ndarray], dtype: str):
    """(torch result, mil result) of `fn(ops, *inputs)` for float arrays in the given precision."""
    tdtype = torch.float16 if dtype == "fp16" else torch.float32
    ins = [TensorIO(k, v.shape, dtype) for k, v in arrays.items()]
    with torch.no_grad():
        ref = fn(TORCH, *[torch.from_numpy(v).to(tdtype) for v in arrays.values()])
    ref = ref if isinstance(ref, (list, tuple)) else [ref]
    outs = [TensorIO(f"out{i}", None, "fp32") for i in range(len(ref))]
    prog, _, _ = build_program(lambda ops, *xs: list(_as_list(fn(ops, *xs))), module, ins, outs, min_target="macOS13")
    executor = Executor(program_from_function(prog.functions["main"]), precision_mode="exact")
    got = executor({k: torch.from_numpy(v).to(tdtype) for k, v in arrays.items()})
    return [r.float() for r in ref], [got[f"out{i}"] for i in range(len(ref))]


def _as_list(x):
    return x if isinstance(x, (list, tuple)) else [x]


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


W = torch.from_numpy(_rand(6, 4, 3, 3, seed=1))
B = torch.from_numpy(_rand(6, seed=2))
PRIMITIVES = {
    "conv3x3_bias": (lambda o, x, m: o.conv(x, m.w, m.b, padding=1), {"x": (1, 4, 5, 5)}),
    "conv_stride2": (lambda o, x, m: o.conv(x, m.w, None, stride=2, padding=1), {"x": (1, 4, 6, 6)}),
    "pad": (lambda o, x, m: o.pad(x, (0, 1, 0, 1)), {"x": (1, 2, 3, 3)}),
    "add_sub_mul": (lambda o, x, m: o.mul(o.sub(o.add(x, 1.5), x), x), {"x": (2, 3, 1, 4)}),
    "silu_sigmoid_gelu": (lambda o, x, m: o.add(o.silu(x), o.mul(o.sigmoid(x), o.gelu(x))), {"x": (2, 8)}),
    "sin_cos": (lambda o, x, m: o.concat([o.sin(x), o.cos(x)], 1), {"x": (2, 5)}),
    "mean_rsqrt": (lambda o, x, m: o.rsqrt(o.mean(o.mul(x, x), (1, 3)), 1e-5), {"x": (2, 3, 1, 4)}),
    "reshape_transpose": (lambda o, x, m: o.transpose(o.reshape(x, (2, 3, 4)), (0, 2, 1)), {"x": (2, 12)}),
    "slice_split": (lambda o, x, m: [o.slice(x, 1, 1, 3), *o.split(x, 2, 3)], {"x": (1, 4, 1, 6)}),
    "einsum_pair": (lambda o, k, q: o.einsum("bkhc,bchq->bkhq", k, q), {"k": (2, 7, 1, 3), "q": (2, 3, 1, 5)}),
    "matmul_t": (lambda o, a, b: o.matmul(a, b, transpose_x=True, transpose_y=True), {"a": (2, 3, 4, 5), "b": (2, 3, 6, 4)}),
    "softmax": (lambda o, x, m: o.softmax(x, 1), {"x": (2, 9, 1, 4)}),
    "upsample2x": (lambda o, x, m: o.upsample2x(x), {"x": (1, 2, 3, 4)}),
    "cast_fp32": (lambda o, x, m: o.mul(o.cast(x, torch.float32), 3.0), {"x": (3, 4)}),
}


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("name", sorted(PRIMITIVES))
def test_primitive_emitted_equals_torch(name, dtype):
    fn, shapes = PRIMITIVES[name]
    tdtype = torch.float16 if dtype == "fp16" else torch.float32
    module = _Params(w=W.to(tdtype), b=B.to(tdtype))
    arrays = {k: _rand(*s, seed=i) for i, (k, s) in enumerate(shapes.items())}
    if len(arrays) == 1:
        def call(ops, x, fn=fn):
            return fn(ops, x, module)
    else:
        call = fn
    ref, got = _run_both(call, module, arrays, dtype)
    tol = 1e-5 if dtype == "fp32" else 2e-2
    for r, g in zip(ref, got):
        assert tuple(r.shape) == tuple(g.shape)
        assert torch.allclose(g, r, atol=tol, rtol=tol), float((g - r).abs().max())


def test_gather_argmax_equal():
    """The text encoder's embedding lookup and end-of-text search."""
    table = torch.from_numpy(_rand(50, 4))
    module = _Params(table=table)
    ids = np.array([[3, 7, 49, 2, 49, 0]], dtype=np.float32)

    def fn(ops, x):
        return [ops.gather(module.table, x, 0), ops.argmax(ops.equal(x, 49.0), 1)]

    ins = [TensorIO("ids", ids.shape, "fp32")]
    prog, _, _ = build_program(fn, module, ins, [TensorIO("rows", None, "fp32"), TensorIO("pos", None, "int32")],
                               min_target="macOS13")
    got = Executor(program_from_function(prog.functions["main"]))({"ids": ids})
    assert torch.equal(got["rows"], table[[3, 7, 49, 2, 49, 0]])
    assert int(got["pos"][0]) == 2


# -- whole UNets ---------------------------------------------------------------------------------
def _unet_program(unet, *, impl="split_einsum_v2", weights="fp16", size=8):
    rewrite = unet_from_diffusers(unet.half(), attention=impl)
    c = unet.config.cross_attention_dim
    ins = [TensorIO("sample", (2, 4, size, size), "fp16"), TensorIO("timestep", (2,), "fp16"),
           TensorIO("encoder_hidden_states", (2, c, 1, 77), "fp16")]
    prog, _, _ = build_program(lambda ops, s, t, e: [rewrite(s, t, e, ops=ops)], rewrite, ins,
                               [TensorIO("noise_pred", (2, 4, size, size), "fp32")], min_target="macOS13")
    compress(prog, weights)
    return prog


@pytest.mark.parametrize("impl", ["split_einsum_v2", "split_einsum"])
def test_neural_engine_unet_has_no_linear_and_no_rank5(impl, tmp_path):
    _, unet, _ = build_tiny_modules()
    package = to_mlmodel(_unet_program(unet, impl=impl, size=32), min_target="macOS13",
                         package_dir=tmp_path / "Unet.mlpackage")
    ops = list(load_program(package).function.operations)
    kinds = [op.op_type for op in ops]
    assert "linear" not in kinds and "matmul" not in kinds
    ranks = {op.op_type: max(len(v.shape) for v in op.outputs) for op in ops if op.outputs and op.op_type != "const"}
    assert max(ranks.values()) <= 4, {k: r for k, r in ranks.items() if r > 4}
    # One softmax and an einsum pair per head, per query chunk, per attention: the tiny UNet has 4
    # transformers (3 at the 32x32 level = 1024 tokens, 1 in the mid block at 16x16), 2 attentions
    # each, 8 heads; v2 cuts the 1024 queries into 2 chunks of 512.
    expected = {"split_einsum": 64, "split_einsum_v2": 3 * 2 * 8 * 2 + 1 * 2 * 8}[impl]
    assert kinds.count("softmax") == expected
    assert kinds.count("einsum") == 2 * expected


def _weight_bytes(package: Path) -> int:
    return sum(p.stat().st_size for p in (package / "Data" / "com.apple.CoreML" / "weights").rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def wide_unet():
    """A UNet whose weights are mostly in large tensors, like SD's (so ratios are meaningful).

    Weights are rounded to multiples of 1/512: storage sizes do not depend on the values, but
    k-means time grows with the number of distinct values, and this keeps the test fast.
    """
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    cfg = dict(UNET_CONFIG, block_out_channels=(64, 128), cross_attention_dim=64, norm_num_groups=16)
    unet = UNet2DConditionModel(**cfg).eval().requires_grad_(False)
    for p in unet.parameters():
        p.copy_(torch.round(p * 512) / 512)
    return unet


@pytest.fixture(scope="module")
def fp16_weight_bytes(wide_unet, tmp_path_factory):
    import copy

    path = tmp_path_factory.mktemp("fp16") / "Unet.mlpackage"
    return _weight_bytes(to_mlmodel(_unet_program(copy.deepcopy(wide_unet)), min_target="macOS13", package_dir=path))


@pytest.mark.parametrize("weights,limit", [("palettize-6", 0.40), ("palettize-4", 0.30), ("int8", 0.55)])
def test_compressed_unet_weights_are_small(wide_unet, fp16_weight_bytes, weights, limit, tmp_path):
    import copy

    small = to_mlmodel(_unet_program(copy.deepcopy(wide_unet), weights=weights), min_target="macOS13",
                       package_dir=tmp_path / "Unet.mlpackage")
    ratio = _weight_bytes(small) / fp16_weight_bytes
    assert ratio <= limit, ratio
    kinds = {op.op_type for op in load_program(small).function.operations}
    assert kinds & {"constexpr_lut_to_dense", "constexpr_affine_dequantize", "constexpr_blockwise_shift_scale"}


def test_kmeans_lut_is_coremltools_kmeans1d():
    """Large fp16 tensors: identical to coremltools' own k-means; small ones get the same exact method."""
    from coremltools.models.neural_network.quantization_utils import _get_kmeans_lookup_table_and_weight

    w = (np.random.default_rng(0).standard_normal((64, 320)) * 0.05).astype(np.float16)
    lut, idx = kmeans_lut(6)(w)
    ref_lut, ref_idx = _get_kmeans_lookup_table_and_weight(6, w)
    assert np.array_equal(lut, ref_lut.astype(np.float16)) and np.array_equal(idx, ref_idx)
    small = w[:8, :100]
    lut_s, idx_s = kmeans_lut(4)(small)
    x = small.astype(np.float32)
    mse = np.mean((lut_s[idx_s].reshape(small.shape).astype(np.float32) - x) ** 2)
    levels = np.linspace(x.min(), x.max(), 16)
    uniform_mse = np.mean((levels[np.abs(x[..., None] - levels).argmin(-1)] - x) ** 2)
    assert len(lut_s) == 16 and mse < uniform_mse  # k-means beats a uniform grid of the same size
