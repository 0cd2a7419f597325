"""mil backend components: packages in Apple's tensor contract behave like the diffusers modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_mil import ct, convert_module, mb, psnr, types
from tiny_models import build_tiny_modules

from coreml_sd.backends.mil_backend import load_mil_component
from coreml_sd.conditioning import Conditioning
from coreml_sd.errors import InputError, ModelError


class SmallDenoiser(torch.nn.Module):
    """A UNet stand-in with the same contract, small enough to convert in a second (the real tiny
    UNet's parity is test_mil_models' job): depends on every input, position by position."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.time = torch.nn.Linear(1, 4)
        self.context = torch.nn.Linear(32, 4)

    def forward(self, sample, timestep, context):  # context (B, 77, C), diffusers' layout
        t = self.time(timestep[:, None] / 1000)
        c = self.context(context * torch.linspace(0, 1, 77)[None, :, None]).mean(1)
        return self.conv(sample) * (t + c)[:, :, None, None]


class AppleLayoutUNet(torch.nn.Module):
    """The UNet contract of Apple's packages: text embedding in (B, C, 1, 77)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states.squeeze(2).transpose(1, 2))


class TextEncoder(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids.long(), return_dict=False)
        return out[0], out[1]


class Decoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z, return_dict=False)[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny torch modules and their packages in Apple's contract (fp32 programs)."""
    text_encoder, _, vae = build_tiny_modules(seed=2)
    torch.manual_seed(2)
    unet = SmallDenoiser().eval()
    folder = tmp_path_factory.mktemp("mil_backend")
    g = torch.Generator().manual_seed(0)
    paths = {
        "text_encoder": convert_module(TextEncoder(text_encoder), (torch.zeros(1, 77),), ["input_ids"],
                                       folder / "TextEncoder.mlpackage", output_names=["last_hidden_state", "pooled_outputs"]),
        "unet": convert_module(AppleLayoutUNet(unet), (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([1.0, 1.0]),
                                                       torch.randn(2, 32, 1, 77, generator=g)),
                               ["sample", "timestep", "encoder_hidden_states"], folder / "Unet.mlpackage",
                               output_names=["noise_pred"]),
        "vae_decoder": convert_module(Decoder(vae), (torch.randn(1, 4, 8, 8, generator=g),), ["z"],
                                      folder / "VAEDecoder.mlpackage", output_names=["image"]),
    }
    return (text_encoder, unet, vae), paths


def test_text_encoder_takes_int_ids_of_any_batch(tiny):
    (text_encoder, _, _), paths = tiny
    component = load_mil_component(paths["text_encoder"], "text_encoder", device="cpu", precision_mode="exact")
    ids = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(5))
    out = component.encode(ids.numpy())  # batch 2 through a batch-1 package, numpy int64 in
    with torch.no_grad():
        ref = text_encoder(ids)
    assert out.hidden.shape == (2, 77, 32) and out.hidden.dtype == torch.float32
    assert psnr(out.hidden.numpy(), ref[0].numpy()) >= 60
    assert psnr(out.pooled.numpy(), ref[1].numpy()) >= 60
    with pytest.raises(InputError, match="expected integer token ids"):
        component.encode(ids.float())


def test_unet_adapts_diffusers_layout_and_batches(tiny):
    (_, unet, _), paths = tiny
    component = load_mil_component(paths["unet"], "unet", device="cpu", precision_mode="exact")
    assert component.batch_size == 2
    g = torch.Generator().manual_seed(6)
    sample, context = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 77, 32, generator=g)
    timestep = torch.tensor([999.0, 999.0, 10.0, 10.0])
    out = component.predict(sample, timestep, Conditioning(context))  # two runs of the batch-2 package
    with torch.no_grad():
        ref = unet(sample, timestep, context)
    assert out.shape == (4, 4, 8, 8)
    assert psnr(out.numpy(), ref.numpy()) >= 60
    # a scalar timestep is broadcast over the batch
    single = component.predict(sample[:2], torch.tensor(999.0), Conditioning(context[:2]))
    torch.testing.assert_close(single, out[:2])
    # three rows: the second run filled up with a copy of the last row, whose output is dropped
    three = component.predict(sample[:3], timestep[:3], Conditioning(context[:3]))
    assert three.shape == (3, 4, 8, 8)
    torch.testing.assert_close(three, out[:3])


def test_vae_decoder_and_fast_components(tiny):
    (_, _, vae), paths = tiny
    parts = {k: load_mil_component(paths[k], k, device="cpu", precision_mode="fast", fast_dtype="fp32")
             for k in ("text_encoder", "unet", "vae_decoder")}
    assert {k: p.runs_on for k, p in parts.items()} == {k: "mil cpu fast (fp32 for fp16 ops)" for k in parts}
    z = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32))
    image = parts["vae_decoder"].decode(z)
    with torch.no_grad():
        ref = vae.decode(z).sample
    assert image.shape == (2, 3, 16, 16)
    assert psnr(image.numpy(), ref.numpy()) >= 60


def _save(prog, path):
    ct.convert(prog, convert_to="mlprogram", compute_precision=ct.precision.FLOAT32).save(str(path))
    return path


def test_chunked_unet_runs_chunks_in_sequence(tmp_path):
    specs = [mb.TensorSpec(shape=(2, 4, 8, 8), dtype=types.fp32), mb.TensorSpec(shape=(2,), dtype=types.fp32),
             mb.TensorSpec(shape=(2, 6, 1, 77), dtype=types.fp32)]

    @mb.program(input_specs=specs)
    def chunk1(sample, timestep, encoder_hidden_states):
        t = mb.reshape(x=timestep, shape=[2, 1, 1, 1])
        ctx = mb.reduce_mean(x=encoder_hidden_states, axes=[1, 2, 3], keep_dims=True)
        return mb.add(x=mb.mul(x=sample, y=t), y=ctx, name="hidden")

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 4, 8, 8), dtype=types.fp32),
                             mb.TensorSpec(shape=(2, 4, 8, 8), dtype=types.fp32)])
    def chunk2(hidden, sample):
        return mb.sub(x=hidden, y=sample, name="noise_pred")

    paths = [_save(chunk1, tmp_path / "UnetChunk1.mlpackage"), _save(chunk2, tmp_path / "UnetChunk2.mlpackage")]
    component = load_mil_component(paths, "unet", device="cpu", precision_mode="exact")
    g = torch.Generator().manual_seed(7)
    sample, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 6, generator=g)
    timestep = torch.tensor([3.0, 0.5])
    out = component.predict(sample, timestep, Conditioning(context))
    expected = sample * timestep.reshape(2, 1, 1, 1) + context.mean((1, 2)).reshape(2, 1, 1, 1) - sample
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_component_errors(tiny, tmp_path):
    _, paths = tiny
    with pytest.raises(InputError, match="unknown component role 'vae'; valid: text_encoder, unet, vae_decoder"):
        load_mil_component(paths["unet"], "vae", device="cpu")
    with pytest.raises(ModelError, match="a UNet package needs inputs sample, timestep, encoder_hidden_states"):
        load_mil_component(paths["vae_decoder"], "unet", device="cpu")
