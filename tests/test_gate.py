"""The parity gate's machinery: fp32 references from fp16 weights, and the gate failing on planted
faults (a wrong weight, a wrong layout, fp16 overflow) with nothing written."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conversion.reference import fp32_compute
from conversion.verify import text_encoder_case, unet_case, vae_decoder_case


@pytest.fixture(scope="module")
def tiny16():
    from tiny_models import build_tiny_modules

    te, unet, vae = build_tiny_modules(seed=4)
    return te.half(), unet.half(), vae.half()


def _cases(te, unet, vae):

    def tokenizer(text):  # ids of a fixed length, like the CLIP tokenizer's
        return [49406] + [min(ord(c), 49405) for c in text[:75]] + [49407] * (76 - min(len(text), 75))

    _, te_refs = text_encoder_case(te, tokenizer)
    _, unet_refs = unet_case(unet, batch=2, latent_shape=(4, 8, 8), context_dim=32)
    _, vae_refs = vae_decoder_case(vae, latent_shape=(4, 8, 8))
    return {**te_refs, **unet_refs, **vae_refs}


def test_fp32_compute_equals_an_fp32_copy_of_the_model(tiny16):
    """The same numbers as `.float()` (whose code paths include diffusers' VAE decoder casting its
    activations to its parameters' dtype), while the weights stay fp16."""
    with fp32_compute():
        got = _cases(*tiny16)
    assert all(p.dtype == torch.float16 for m in tiny16 for p in m.parameters())
    expected = _cases(*(copy.deepcopy(m).float() for m in tiny16))
    assert set(got) == {"last_hidden_state", "pooled_outputs", "noise_pred", "image"}
    for name, ref in expected.items():
        np.testing.assert_array_equal(got[name], ref, err_msg=name)


# -- planted faults: the gate must fail, and nothing may be written --------------------------------
def _rewrite_with(fault):
    """conversion.ane.unet_from_diffusers, with `fault(rewrite)` applied to the rewrite it builds
    (after the reference was computed from the upstream module)."""
    from conversion import ane

    build = ane.unet_from_diffusers

    def patched(unet, **kwargs):
        rewrite = build(unet, **kwargs)
        with torch.no_grad():
            fault(rewrite)
        return rewrite

    return patched


def _wrong_weight(rewrite):
    """A stale/wrong weight: half the output channels of one convolution negated."""
    w = rewrite.down_blocks[0].resnets[0].conv1.weight
    w.data = torch.cat([-w[: w.shape[0] // 2], w[w.shape[0] // 2:]])


def _wrong_layout(rewrite):
    """A linear weight mapped to a 1x1 convolution without its transpose (in/out swapped)."""
    w = rewrite.down_blocks[0].attentions[0].proj_in.weight
    w.data = w.transpose(0, 1).contiguous()


def _overflowing_source(tiny_diffusers_dir):
    """The tiny model with conv_in scaled so that the next GroupNorm's variance (mean of squares of
    values ~ +-1000) exceeds fp16's range: finite in the fp32 reference, inf in an fp16 package."""
    from coreml_sd.sources import open_model

    source = open_model(tiny_diffusers_dir)
    load = source.torch_modules

    def scaled(**kwargs):
        mods = load(**kwargs)
        with torch.no_grad():
            mods.unet.conv_in.weight.mul_(2000.0)
            mods.unet.conv_in.bias.mul_(2000.0)
        return mods

    source.torch_modules = scaled
    return source


@pytest.mark.parametrize("background", [False, True], ids=["inline", "background"])
@pytest.mark.parametrize("fault", ["wrong_weight", "wrong_layout", "fp16_overflow"])
def test_gate_fails_on_planted_faults_and_writes_nothing(fault, background, tiny_diffusers_dir, tmp_path,
                                                         monkeypatch):
    from conversion import ane
    from conversion.convert import ConvertOptions, convert_model
    from conversion.export import ConversionError
    from coreml_sd.sources import open_model

    if fault == "fp16_overflow":
        source = _overflowing_source(tiny_diffusers_dir)
    else:
        source = open_model(tiny_diffusers_dir)
        monkeypatch.setattr(ane, "unet_from_diffusers", _rewrite_with(globals()[f"_{fault}"]))
    options = ConvertOptions(components=("unet",), background_gate=background)
    with pytest.raises(ConversionError, match=r"parity gate failed for unet: noise_pred -?(\d+\.\d|inf) dB"):
        convert_model(source, tmp_path / "out", options)
    assert list(tmp_path.iterdir()) == []


def test_background_gate_gives_the_inline_figures(tiny_diffusers_dir, tmp_path, monkeypatch):
    """The same packages checked in the worker process: the same parity figures, a verify stage
    recorded for each component, and the worker gone afterwards. Every reference and check runs on
    one thread here, as the worker's do while the machine is busy: the figures are then bit for bit
    the inline ones (with other thread counts float sums split differently: under
    ATEN_CPU_CAPABILITY=default a UNet figure moved by 0.15 dB)."""
    import multiprocessing

    import conversion.gate as gate
    from conversion.convert import ConvertOptions, convert_model
    from coreml_sd.sources import open_model

    monkeypatch.setattr(gate, "others_running", lambda: True)  # no check gets every core
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        parts = ("text_encoder", "unet", "vae_decoder")
        inline = convert_model(open_model(tiny_diffusers_dir), tmp_path / "inline",
                               ConvertOptions(components=parts, background_gate=False))
        background = convert_model(open_model(tiny_diffusers_dir), tmp_path / "background",
                                   ConvertOptions(components=parts, background_gate=True))
    finally:
        torch.set_num_threads(threads)
    for part in parts:
        assert background.parity[part].psnr_db == inline.parity[part].psnr_db
        assert background.parity[part].passed
    verified = [r for r in background.stages if r.stage == "verify"]
    assert sorted(r.component for r in verified) == sorted(parts)
    assert all("beside the conversion" in r.detail for r in verified)
    assert {r.stage for r in background.stages if r.component == "model"} >= {"load", "gate wait", "write"}
    assert not [p for p in multiprocessing.active_children() if p.name == "coreml-sd-gate"]


def test_a_large_unet_waits_for_the_checks_before_its_reference(tiny_diffusers_dir, tmp_path, monkeypatch):
    """Past SERIAL_UNET_BYTES (SDXL's UNet) the UNet's reference starts only when the earlier checks
    are done, so the two never hold memory at once; the figures stay the inline ones."""
    import conversion.convert as convert
    from coreml_sd.sources import open_model

    import conversion.gate as gate

    monkeypatch.setattr(convert, "SERIAL_UNET_BYTES", 0)  # the tiny UNet counts as large
    monkeypatch.setattr(gate, "others_running", lambda: False)  # an idle machine, whatever runs beside the test
    parts = ("text_encoder", "unet", "vae_decoder")
    result = convert.convert_model(open_model(tiny_diffusers_dir), tmp_path / "serial",
                                   convert.ConvertOptions(components=parts, background_gate=True))
    stages = [(r.component, r.stage, r.detail) for r in result.stages]
    wait = next(i for i, s in enumerate(stages) if s[1] == "gate wait" and "before the UNet" in s[2])
    unet_reference = stages.index(next(s for s in stages if s[:2] == ("unet", "reference")))
    checks = [i for i, s in enumerate(stages) if s[1] == "verify" and s[0] in ("text_encoder", "vae_decoder")]
    assert checks and max(checks) < wait < unet_reference  # judged (recorded) before the UNet starts
    assert all(result.parity[p].passed for p in parts)
    # The checks nothing runs beside (the VAE's, while the conversion waits; the UNet's, last) get every
    # core; the text encoder's ran beside the VAE's reference, on one thread.
    cores = {r.component: r.detail.rsplit(", ", 1)[1] for r in result.stages if r.stage == "verify"}
    assert cores == {"text_encoder": "one thread", "vae_decoder": "every core", "unet": "every core"}


def test_gate_worker_does_not_outlive_a_killed_conversion(tiny_diffusers_dir, tmp_path):
    """SIGKILL to the converting process (no cleanup runs): its gate worker notices and exits."""
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    psutil = pytest.importorskip("psutil")
    child = textwrap.dedent(f"""
        from pathlib import Path
        from conversion.convert import ConvertOptions, convert_model
        from coreml_sd.sources import open_model
        convert_model(open_model(Path({str(tiny_diffusers_dir)!r})), Path({str(tmp_path / 'out')!r}),
                      ConvertOptions(components=("unet", "vae_decoder"), background_gate=True))
        print("done", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    workers = []
    while time.monotonic() < deadline and not workers and proc.poll() is None:
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "python" in p.name().lower()]
        time.sleep(0.05)
    assert workers, "the gate worker never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    gone, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, f"gate worker(s) still running: {[p.pid for p in alive]}"


@pytest.mark.parametrize("background", [False, True], ids=["inline", "background"])
def test_a_gate_run_that_cannot_run_fails_the_conversion(tmp_path, background):
    from conversion.gate import GateRunner
    from coreml_sd.errors import CoreMLSDError

    gates = GateRunner(background=background)
    try:  # inline the loader's own error; from the worker, the conversion's naming the component
        with pytest.raises(CoreMLSDError, match=r"(could not run unet|Core ML package).*missing\.mlpackage"):
            gates.submit("unet", [(tmp_path / "missing.mlpackage", [("sample", "fp16")])],
                         [("", {"sample": np.zeros((1, 4), np.float32)})], ["noise_pred"], last=True)
            gates.wait()
    finally:
        gates.close()
