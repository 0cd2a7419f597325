"""The mil executor's fast mode fuses what `coreml-sd convert` emits, without changing results.

`coreml-sd convert` writes attention as per-head einsum pairs (Neural Engine layouts) or
heads-as-batch matmuls (GPU layout), and GroupNorm / channel LayerNorm as mean, sub, mul, mean,
rsqrt, mul. Each such group must run as one torch kernel (SDPA, group_norm, layer_norm) in fast
mode, and fused and op-by-op execution of the same package must agree to float rounding in fp32.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from helpers_mil import psnr  # noqa: E402

from conversion.convert import ConvertOptions, convert_model  # noqa: E402
from coreml_sd.mil.executor import Executor  # noqa: E402
from coreml_sd.mil.package import load_program  # noqa: E402
from coreml_sd.sources import open_model  # noqa: E402

PACKAGES = {"text_encoder": "TextEncoder", "unet": "Unet", "vae_decoder": "VAEDecoder", "vae_encoder": "VAEEncoder"}


@pytest.fixture(scope="module", params=["split_einsum_v2", "original"])
def converted(request, tiny_diffusers_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fusion") / request.param
    source = open_model(tiny_diffusers_dir)
    convert_model(source, out, ConvertOptions(components=tuple(PACKAGES), attention=request.param))
    return out, source


def _expected(component: str, program, source) -> dict[str, int]:
    mods = source.torch_modules(device="cpu", dtype=torch.float32)
    module = {"text_encoder": mods.text_encoder, "unet": mods.unet, "vae_decoder": mods.vae.decoder,
              "vae_encoder": mods.vae.encoder}[component]
    return {
        # one SDPA per softmax: per head (and query chunk) in the einsum layouts, per module otherwise
        "fused_attention": sum(op.op_type == "softmax" for op in program.function.operations),
        "fused_group_norm": sum(isinstance(m, torch.nn.GroupNorm) for m in module.modules()),
        "fused_layer_norm": sum(isinstance(m, torch.nn.LayerNorm) for m in module.modules()),
        "exact_attention": 0,  # exact mode's blocked attention; fast mode never uses it
    }


def _feeds(executor, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in executor.inputs:
        if spec.name == "input_ids":
            ids = rng.integers(0, 49406, size=spec.shape)
            ids[..., 0], ids[..., 9:] = 49406, 49407
            feeds[spec.name] = ids.astype(np.float32 if spec.dtype.startswith("fp") else np.int32)
        elif spec.name == "timestep":
            feeds[spec.name] = np.full(spec.shape, 421.0, dtype=np.float32)
        else:
            feeds[spec.name] = rng.standard_normal(spec.shape).astype(np.float32)
    return feeds


@pytest.mark.parametrize("component", list(PACKAGES))
def test_converted_packages_fuse_every_attention_and_norm(converted, component):
    out, source = converted
    program = load_program(out / f"{PACKAGES[component]}.mlpackage")
    fused = Executor(program, precision_mode="fast", fast_dtype="fp32")
    plain = Executor(program, precision_mode="fast", fast_dtype="fp32", fuse=False)
    expected = _expected(component, program, source)
    assert fused.fused == expected
    assert sum(expected.values()) > 0 and set(plain.fused.values()) == {0}
    feeds = _feeds(fused)
    a, b = fused(feeds), plain(feeds)
    assert set(a) == set(b)
    for name in a:
        assert psnr(a[name].float().numpy(), b[name].float().numpy()) >= 100, name
