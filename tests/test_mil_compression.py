"""Packages compressed with `coremltools.optimize.coreml` execute and match dequantize-then-run.

The reference for each compressed package is the same package with its weights decompressed by
coremltools itself (`decompress_weights`), run by the same executor: outputs must agree to float
precision. Each decompression op's result must equal coremltools' own numpy decompression
(`materialized_val_inference`) exactly. Covers iOS16 forms (packed LUT, affine dequantize, bit
mask) and iOS18 forms (grouped and vector LUTs, blockwise int8/int4, sparse + LUT/quantized).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_mil import ct, convert_module, op_types, psnr, run_package

import coremltools.optimize.coreml as cto
from coreml_sd.mil.executor import materialize_constants
from coreml_sd.mil.package import load_program


class ConvLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.linear = torch.nn.Linear(32, 64)

    def forward(self, x):
        return self.linear(torch.nn.functional.silu(self.conv(x)).mean((2, 3)))


X = np.random.default_rng(0).standard_normal((2, 16, 8, 8)).astype(np.float32)
THRESHOLD = 1000  # compress both weights (4608 and 2048 elements)


def _pal(nbits, **kw):
    return "palettize", cto.OpPalettizerConfig(nbits=nbits, weight_threshold=THRESHOLD, **kw)


def _quant(**kw):
    return "quantize", cto.OpLinearQuantizerConfig(weight_threshold=THRESHOLD, **kw)


def _prune():
    return "prune", cto.OpMagnitudePrunerConfig(target_sparsity=0.5, weight_threshold=THRESHOLD)


# name -> (target, [compression steps applied in order], expected decompression ops, min PSNR vs uncompressed)
CONFIGS = {
    "palettize4-ios16": ("iOS16", [_pal(4)], {"constexpr_lut_to_dense"}, 25),
    "palettize6-ios16": ("iOS16", [_pal(6)], {"constexpr_lut_to_dense"}, 35),
    "palettize8-ios16": ("iOS16", [_pal(8)], {"constexpr_lut_to_dense"}, 45),
    "int8-symmetric-ios16": ("iOS16", [_quant(mode="linear_symmetric")], {"constexpr_affine_dequantize"}, 45),
    "int8-affine-ios16": ("iOS16", [_quant(mode="linear")], {"constexpr_affine_dequantize"}, 45),
    "prune-ios16": ("iOS16", [_prune()], {"constexpr_sparse_to_dense"}, 5),
    "palettize4-grouped-ios18": ("iOS18", [_pal(4, granularity="per_grouped_channel", group_size=8)],
                                 {"constexpr_lut_to_dense"}, 25),
    "palettize6-ios18": ("iOS18", [_pal(6)], {"constexpr_lut_to_dense"}, 35),
    "palettize8-ios18": ("iOS18", [_pal(8)], {"constexpr_lut_to_dense"}, 45),
    "palettize3-vector-ios18": ("iOS18", [_pal(3, cluster_dim=2)], {"constexpr_lut_to_dense"}, 15),
    "int8-ios18": ("iOS18", [_quant(mode="linear_symmetric")], {"constexpr_blockwise_shift_scale"}, 45),
    "int4-blockwise-ios18": ("iOS18", [_quant(mode="linear", dtype="int4", granularity="per_block", block_size=8)],
                             {"constexpr_blockwise_shift_scale"}, 25),
    "prune-ios18": ("iOS18", [_prune()], {"constexpr_sparse_to_dense"}, 5),
    "prune-palettize4-ios18": ("iOS18", [_prune(), _pal(4)], {"constexpr_lut_to_sparse", "constexpr_sparse_to_dense"}, 5),
    "prune-int8-ios18": ("iOS18", [_prune(), _quant(mode="linear_symmetric")],
                         {"constexpr_sparse_blockwise_shift_scale", "constexpr_sparse_to_dense"}, 5),
}

_STEPS = {"palettize": cto.palettize_weights, "quantize": cto.linear_quantize_weights, "prune": cto.prune_weights}


@pytest.fixture(scope="module")
def base_packages(tmp_path_factory):
    """Uncompressed fp16 packages of the same module for each deployment target."""
    torch.manual_seed(0)
    module = ConvLinear()
    folder = tmp_path_factory.mktemp("mil_compression")
    return {
        name: convert_module(module, (torch.from_numpy(X),), ["x"], folder / f"base_{name}.mlpackage",
                             precision="fp16", target=getattr(ct.target, name), output_names=["y"])
        for name in ("iOS16", "iOS18")
    }


def _compress(base_path, steps, out_dir):
    model = ct.models.MLModel(str(base_path), skip_model_load=True)
    for index, (kind, config) in enumerate(steps):
        model = _STEPS[kind](model, cto.OptimizationConfig(global_config=config), joint_compression=index > 0)
    compressed = out_dir / "compressed.mlpackage"
    model.save(str(compressed))
    decompressed = out_dir / "decompressed.mlpackage"
    cto.decompress_weights(model).save(str(decompressed))
    return compressed, decompressed


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compressed_package_matches_dequantize_then_run(name, base_packages, tmp_path):
    target, steps, expected_ops, min_psnr = CONFIGS[name]
    compressed, decompressed = _compress(base_packages[target], steps, tmp_path)
    assert expected_ops <= op_types(compressed)
    assert not any(op.startswith("constexpr_") for op in op_types(decompressed))

    out = run_package(compressed, {"x": X})["y"]
    ref = run_package(decompressed, {"x": X})["y"]
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    # compression really changed the weights, and the model still computes the same function
    uncompressed = run_package(base_packages[target], {"x": X})["y"]
    assert min_psnr <= psnr(out, uncompressed) < 100


@pytest.mark.parametrize("name", ["palettize6-ios16", "int8-affine-ios16", "prune-ios16", "palettize4-grouped-ios18",
                                  "palettize3-vector-ios18", "int4-blockwise-ios18", "prune-palettize4-ios18",
                                  "prune-int8-ios18"])
def test_decompression_ops_equal_coremltools_numpy_decompression(name, base_packages, tmp_path):
    target, steps, _, _ = CONFIGS[name]
    compressed, _ = _compress(base_packages[target], steps, tmp_path)
    program = load_program(compressed)
    ops = [op for op in program.function.operations if op.op_type.startswith("constexpr_")]
    names = [var.name for op in ops for var in op.outputs]
    values = materialize_constants(program, names, precision_mode="exact")
    for op in ops:
        expected = op.materialized_val_inference()
        expected = expected if isinstance(expected, tuple) else (expected,)
        for var, reference in zip(op.outputs, expected):
            actual = values[var.name].cpu().numpy()
            np.testing.assert_array_equal(actual.astype(np.float64), np.asarray(reference).astype(np.float64),
                                          err_msg=f"{op.op_type} {op.name}")


def test_fast_mode_decompresses_into_compute_dtype(base_packages, tmp_path):
    compressed, decompressed = _compress(base_packages["iOS18"], CONFIGS["palettize4-grouped-ios18"][1], tmp_path)
    out = run_package(compressed, {"x": X}, mode="fast", fast_dtype="bf16")["y"]
    ref = run_package(decompressed, {"x": X}, mode="exact")["y"]
    assert psnr(out, ref) >= 30
