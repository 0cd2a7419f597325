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


def test_auto_compiles_only_where_it_was_measured_to_pay():
    for device, mode in torch_compile.AUTO_MODES.items():
        assert torch_compile.resolve_mode("auto", device, torch.bfloat16) == mode
    assert torch_compile.resolve_mode("auto", "cpu", torch.bfloat16) == "default"  # measured to pay in bf16
    assert torch_compile.resolve_mode("auto", "cpu", torch.float32) is None  # fp32 on a CPU: not measured
    assert torch_compile.resolve_mode(None, "cpu") is None
    assert torch_compile.resolve_mode("max-autotune", "cpu") == "max-autotune"
    with pytest.raises(InputError, match="resolve 'auto'"):
        torch_compile.compile_unet(None, "auto", device="cpu")


def test_compiled_graphs_are_cached_under_the_coreml_sd_cache_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("COREML_SD_CACHE", str(tmp_path))
    assert torch_compile.cache_dir() == tmp_path / "torch-compile"
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "torch-compile")  # where inductor looks
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert torch_compile.cache_dir() == tmp_path / "mine"  # the user's choice wins


def test_cpu_compile_prepares_channels_last_and_computes_the_same():
    """The CPU path's preparation (channels_last, no QKV fusion) through torch.compile's eager backend:
    the same numbers as the module itself, in bf16 (the CPU's auto precision)."""
    from tiny_models import build_tiny_modules

    _, unet, _ = build_tiny_modules(seed=6)
    unet = unet.to(torch.bfloat16)
    plain = TorchUNet(copy.deepcopy(unet), torch.bfloat16, SD1)
    module = torch_compile.compile_unet(copy.deepcopy(unet), "default", device="cpu", backend="eager")
    assert module._orig_mod.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not any("Fused" in type(p).__name__ for p in module._orig_mod.attn_processors.values())
    gen = torch.Generator().manual_seed(1)
    x, h = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 32, generator=gen)
    c = Conditioning(h)
    got, want = TorchUNet(module, torch.bfloat16, SD1).predict(x, torch.full((2,), 500.0), c), \
        plain.predict(x, torch.full((2,), 500.0), c)
    # the same bf16 arithmetic in another memory layout: bf16 rounding of differently ordered sums
    assert (got - want).abs().max().item() <= 2e-2 * want.abs().max().item()
