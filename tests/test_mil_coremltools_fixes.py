"""conversion.coremltools_fixes: converting `int()` of a traced shape product works under numpy 2."""

from __future__ import annotations

import numpy as np
import torch
from helpers_mil import ct, run_package, trace


class FlattenSpatial(torch.nn.Module):
    """The pattern of diffusers' Transformer2DModel: reshape to (batch, height * width, channels)."""

    def forward(self, x):
        b, c, h, w = x.shape
        return x.permute(0, 2, 3, 1).reshape(b, h * w, c) * 2


def test_int_of_traced_shape_product_converts_and_runs(tmp_path):
    from benchmarks import coremltools_fixes

    coremltools_fixes.apply()
    coremltools_fixes.apply()  # idempotent
    x = torch.randn(2, 3, 4, 5)
    traced = trace(FlattenSpatial(), (x,))
    assert any(n.kind() == "aten::Int" for n in traced.inlined_graph.nodes())  # the op the fix is for
    model = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=tuple(x.shape))], convert_to="mlprogram",
                       compute_precision=ct.precision.FLOAT32)
    model.save(str(tmp_path / "flatten.mlpackage"))
    out = next(iter(run_package(tmp_path / "flatten.mlpackage", {"x": x.numpy()}).values()))
    np.testing.assert_allclose(out, FlattenSpatial()(x).numpy(), rtol=1e-6)
