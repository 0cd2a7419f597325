"""The torch backend's compile option: the UNet it prepares (fused QKV, channels_last) computes the
same, CUDA-graph outputs are copied out, and modes are checked before anything loads."""

from __future__ import annotations

import copy
import types

import pytest

torch = pytest.importorskip("torch")

from coreml_sd.backends import torch_compile  # noqa: E402
from coreml_sd.backends.torch_backend import TorchUNet  # noqa: E402
from coreml_sd.conditioning import Conditioning  # noqa: E402
from coreml_sd.families import SD1  # noqa: E402
from coreml_sd.errors import InputError  # noqa: E402


def test_compiled_unet_equals_eager():
    from tiny_models import build_tiny_modules

    _, unet, _ = build_tiny_modules(seed=5)
    plain = TorchUNet(copy.deepcopy(unet), torch.float32, SD1)
    # "eager" runs the captured graph without inductor: the preparation is what is checked here
    # (inductor itself is torch's); device "mps" takes the GPU path (channels_last) on any machine.
    module = torch_compile.compile_unet(copy.deepcopy(unet), "max-autotune", device="mps", backend="eager")
    compiled = TorchUNet(module, torch.float32, SD1)
    prepared = module._orig_mod
    assert prepared.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert any("Fused" in type(p).__name__ for p in prepared.attn_processors.values())
    gen = torch.Generator().manual_seed(0)
    x, h = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 32, generator=gen)
    for t in (999.0, 10.0):
        ts = torch.full((2,), t)
        c = Conditioning(h)
        assert (compiled.predict(x, ts, c) - plain.predict(x, ts, c)).abs().max().item() < 1e-5


def test_cuda_graph_outputs_are_copied_out():
    """A replayed graph writes its next output into the same buffer: fp32 results must be copies."""
    buffer = torch.zeros(2, 4, 8, 8)
    module = lambda sample, t, encoder_hidden_states: types.SimpleNamespace(sample=buffer)  # noqa: E731
    out = TorchUNet(module, torch.float32, SD1, cuda_graphs=True).predict(torch.ones(2, 4, 8, 8), torch.ones(2),
                                                                            Conditioning(torch.ones(2, 77, 32)))
    buffer.fill_(1.0)
    assert out.abs().max().item() == 0.0


def test_modes_and_cuda_graphs():
    assert torch_compile.uses_cuda_graphs("max-autotune", "cuda")
    assert torch_compile.uses_cuda_graphs("reduce-overhead", "cuda")
    assert not torch_compile.uses_cuda_graphs("max-autotune-no-cudagraphs", "cuda")
    assert not torch_compile.uses_cuda_graphs("max-autotune", "cpu")


def test_unknown_mode_is_refused_before_loading(tmp_path):
    from coreml_sd.pipeline import Pipeline

    with pytest.raises(InputError, match="valid modes: default, reduce-overhead, max-autotune"):
        Pipeline.load(tmp_path / "not-looked-at", device="cpu", compile="fastest")
