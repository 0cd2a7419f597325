"""fp16 VAE overflow (SDXL's VAE): detected and avoided on every backend; a non-finite decode is an error.

The tiny VAE is made to overflow as SDXL's does: its decoder's conv_in is scaled up, so the
residual stream of every level carries values whose squares (GroupNorm's variance; 2^10) or the
values themselves (2^17) exceed fp16's 65504, while the fp32 decode stays finite.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import tiny_sdxl as T  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from coreml_sd.errors import ModelError  # noqa: E402
from coreml_sd.sources import open_model  # noqa: E402

PROMPT = "a lighthouse at dusk"


def hot_vae(gain: float):
    vae = T.build_vae(2)
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(gain)
        vae.decoder.conv_in.bias.mul_(gain)
    return vae


def latents(vae, n=2):
    from conversion.vae_fp16 import calibration_latents

    return torch.from_numpy(calibration_latents(vae, 16, 16)[:n])


def test_rescaled_decoder_computes_the_same_function():
    """Scaling the streams and inner activations (with GroupNorm eps by the square) changes nothing in fp32."""
    from conversion.ane import vae_decoder_from_diffusers
    from conversion.vae_fp16 import apply_scales, choose_scales, measure_peaks

    vae = hot_vae(2.0**10)
    z = latents(vae)
    upstream = copy.deepcopy(vae)
    rewrite = vae_decoder_from_diffusers(upstream)
    with torch.no_grad():
        before = rewrite(z)
        scales = choose_scales(measure_peaks(rewrite, z.numpy()), 2)
        assert scales.streams[0] <= 2.0**-6  # the big stream of the first level is scaled
        scales.inner.update({f"up_blocks.1.resnets.{j}": 2.0**-(j + 1) for j in range(3)})  # and some inner ones
        apply_scales(rewrite, scales)
        after = rewrite(z)
        reference = vae.decode(z).sample
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()
    assert (before - reference).abs().max() <= 1e-5 * reference.abs().max()
    # The rewrite got new tensors; the upstream module it shared them with is untouched.
    assert not torch.equal(rewrite.decoder.conv_in.weight, upstream.decoder.conv_in.weight)
    assert torch.equal(upstream.decoder.conv_in.weight, vae.decoder.conv_in.weight)


def _hot_file(tmp_path, gain):
    mods = T.build_tiny_sdxl(0)
    mods["vae"] = hot_vae(gain)
    return T.write_single_file(mods, tmp_path / f"hot{int(np.log2(gain))}.safetensors", family="sdxl")


@pytest.mark.parametrize("gain", [2.0**10, 2.0**17], ids=["squares-overflow", "values-overflow"])
def test_conversion_makes_an_overflowing_decoder_fp16_safe(tmp_path, gain):
    from conversion.convert import ConvertOptions, convert_model
    from conversion.export import ConversionError

    path = _hot_file(tmp_path, gain)
    options = ConvertOptions(components=("vae_decoder",))
    # Values past 65504 give NaN/inf; squares past it a GroupNorm of zeros: both fail the gate.
    failure = "the package returns NaN/inf values .*fp16 overflow" if gain > 2**16 else r"image \(test image and noise\) 1\d\.\d dB"
    with pytest.raises(ConversionError, match=f"parity gate failed for vae_decoder: {failure}"):
        convert_model(open_model(path), tmp_path / "plain", ConvertOptions(components=("vae_decoder",),
                                                                           vae_fp16_fix=False))
    assert not (tmp_path / "plain").exists()
    result = convert_model(open_model(path), tmp_path / "safe", options)
    record = result.manifest.parity["components"]["vae_decoder"]
    assert record["passed"] and record["fp16_rescale"]["peak"] > 256 and record["fp16_rescale"]["scaled_peak"] <= 16
    # Gated on latents of a test image and noise, as floats and as 8-bit pixels.
    assert set(record["psnr_db"]) == {"image (test image and noise)", "image (test image and noise) 8-bit"}
    assert min(record["psnr_db"].values()) >= 35


def test_torch_fp16_decoder_decodes_in_fp32_where_fp16_overflows(caplog):
    from coreml_sd.backends.torch_backend import TorchVAEDecoder

    vae = hot_vae(2.0**17)
    z = latents(vae)
    with torch.no_grad():
        expected = vae.decode(z).sample
        assert not torch.isfinite(copy.deepcopy(vae).half().decode(z.half()).sample).all()  # the failure
    vae.config.force_upcast = False  # an fp16 VAE that does not say it overflows: detected on the first decode
    decoder = TorchVAEDecoder(copy.deepcopy(vae).half(), torch.float16)
    with caplog.at_level("WARNING", logger="coreml_sd"):
        out = decoder.decode(z)
    assert "overflowed in fp16" in caplog.text and decoder.upcast
    # fp32 decode of the fp16-rounded weights: within fp16 weight rounding of the fp32 model's image
    assert torch.isfinite(out).all() and (out - expected).abs().max() <= 2e-2
    vae.config.force_upcast = True  # SDXL's config: fp32 from the start, as diffusers
    assert TorchVAEDecoder(copy.deepcopy(vae).half(), torch.float16).upcast
    assert not TorchVAEDecoder(copy.deepcopy(vae), torch.bfloat16).upcast  # bf16 has fp32's range


def test_a_non_finite_decode_is_an_error_not_a_black_image(tmp_path, monkeypatch):
    from coreml_sd.backends.torch_backend import TorchVAEDecoder
    from coreml_sd.cli import main
    from coreml_sd.pipeline import Pipeline

    mods = T.build_tiny_sdxl(0)
    path = T.write_single_file(mods, tmp_path / "xl.safetensors", family="sdxl")
    monkeypatch.setattr(TorchVAEDecoder, "decode", lambda self, z: torch.full((1, 3, 16, 16), float("nan")))
    pipe = Pipeline.load(path, backend="torch", device="cpu", precision="fp32")
    with pytest.raises(ModelError, match=r"the vae_decoder \(torch cpu fp32\) returned 768 NaN/inf values of 768 "
                                         r"for image 1 \(seed 3\); no image was made"):
        pipe(PROMPT, seed=3, steps=2)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["generate", PROMPT, "--model", str(path), "--steps", "2", "--backend", "torch",
                                       "-o", str(out)])
    assert result.exit_code == 1 and "NaN/inf" in result.output
    assert not out.exists() or not any(out.iterdir())


def test_non_finite_latents_name_the_unet(tmp_path, monkeypatch):
    from coreml_sd.backends.torch_backend import TorchUNet
    from coreml_sd.pipeline import Pipeline

    path = T.write_single_file(T.build_tiny_sdxl(0), tmp_path / "xl.safetensors", family="sdxl")
    monkeypatch.setattr(TorchUNet, "predict", lambda self, sample, t, cond: sample * float("inf"))
    with pytest.raises(ModelError, match=r"the unet \(torch cpu fp32\) returned"):
        Pipeline.load(path, backend="torch", device="cpu", precision="fp32")(PROMPT, seed=3, steps=2)
