"""The pipeline takes A1111's sampler names, eta, ENSD and A1111 plans, and then makes A1111's image.

The end-to-end reference is A1111's sampling written out on the tiny SD model: its CFG denoiser
(uncond + (cond - uncond) * scale over k-diffusion's DiscreteEpsDDPMDenoiser of the same UNet and
embeddings), k-diffusion's sampler and sigmas, the initial noise from torch's generator with the
image seed, and for SDE samplers k-diffusion's BrownianTreeNoiseSampler seeded with the image seed.
"""

from __future__ import annotations

import numpy as np
import pytest

from coreml_sd import Pipeline

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def pipe(tiny_diffusers_dir):
    return Pipeline.load(tiny_diffusers_dir, backend="torch", device="cpu", precision="fp32")


def _latents(pipe, **kwargs):
    (image,) = pipe("a red cat", negative_prompt="blurry", seed=kwargs.pop("seed", 21), steps=kwargs.pop("steps", 6),
                    guidance_scale=5.0, **kwargs)
    return image


def test_a1111_combined_names_are_our_sampler_and_schedule(pipe):
    named = _latents(pipe, sampler="DPM++ 2M Karras")
    keyed = _latents(pipe, sampler="dpmpp_2m", schedule="karras")
    np.testing.assert_array_equal(named.latents, keyed.latents)
    assert (named.params.sampler, named.params.schedule) == ("DPM++ 2M", "karras")
    assert _latents(pipe, sampler="dpmpp_2m", schedule="Karras").params.schedule == "karras"


def test_eta_and_ensd_change_the_image_and_are_recorded(pipe):
    plain = _latents(pipe, sampler="Euler a")
    assert "Eta" not in plain.params.extras and "ENSD" not in plain.params.extras
    tuned = _latents(pipe, sampler="Euler a", eta=0.67, ensd=31337)
    assert (tuned.params.extras["Eta"], tuned.params.extras["ENSD"]) == ("0.67", "31337")
    assert np.abs(tuned.latents - plain.latents).max() > 1e-2
    ddim = _latents(pipe, sampler="DDIM", schedule="automatic", eta=0.5)
    assert ddim.params.extras["Eta DDIM"] == "0.5"


def _a1111_reference(pipe, sampler: str, schedule: str, steps: int, seed: int, scale: float):
    """A1111's txt2img sampling loop for one image on the same UNet and embeddings."""
    from coreml_sd.schedules import alphas_cumprod
    from helpers_a1111 import a1111_sigmas
    from kdiffusion_ref import load

    sampling, external = load()
    unet = pipe.source.torch_modules(device="cpu", dtype=torch.float32).unet
    cond, uncond = (torch.as_tensor(np.asarray(pipe.encode_prompt(t).hidden)) for t in ("a red cat", "blurry"))

    def apply_model(x, t, **_):
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=torch.cat([cond, uncond])).sample

    model = external.DiscreteEpsDDPMDenoiser(apply_model, torch.from_numpy(alphas_cumprod(pipe.info.scheduler).copy()),
                                             quantize=False)

    def cfg(x, sigma, **_):  # A1111's CFGDenoiser: the conditional rows first, then the unconditional
        out_cond, out_uncond = model(torch.cat([x, x]), torch.cat([sigma, sigma])).chunk(2)
        return out_uncond + (out_cond - out_uncond) * scale

    sigmas = a1111_sigmas(sampler, schedule, steps, model)
    size = pipe.info.sample_size // pipe.info.vae_scale_factor
    x = torch.randn((1, pipe.info.latent_channels, size, size), generator=torch.Generator().manual_seed(seed))
    x = x * sigmas[0]
    noise_sampler = sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=[seed])
    function = getattr(sampling, {"dpmpp_2m_sde": "sample_dpmpp_2m_sde", "dpmpp_sde": "sample_dpmpp_sde"}[sampler])
    with torch.no_grad():
        return function(cfg, x, sigmas, disable=True, noise_sampler=noise_sampler).numpy()


@pytest.mark.filterwarnings("ignore:Should have:UserWarning")
@pytest.mark.parametrize("name,a1111,sampler,schedule", [
    ("DPM++ 2M SDE Karras", True, "dpmpp_2m_sde", "karras"),  # an old sampler: A1111's only with a1111=True
    ("DPM++ SDE Karras", False, "dpmpp_sde", "karras"),
    ("DPM++ 2M SDE", False, "dpmpp_2m_sde", "exponential"),  # not "default": A1111's automatic is Exponential
])
def test_sde_recipe_gives_a1111s_image(pipe, name, a1111, sampler, schedule):
    image = _latents(pipe, sampler=name, schedule="automatic" if "Karras" not in name else "default", a1111=a1111,
                     steps=8, seed=7)
    ref = _a1111_reference(pipe, sampler, schedule, 8, 7, 5.0)
    # The Brownian tree's 1e-6 grid is float32's resolution at the top sigmas: see BROWNIAN_REL_TOL.
    scale = max(1.0, float(np.abs(ref).max()))
    assert float(np.abs(image.latents - ref).max()) <= 2e-3 * scale
    # Without Brownian noise (diffusers' convention) the old sampler draws other noise: a different image.
    if a1111:
        other = _latents(pipe, sampler=name, steps=8, seed=7)
        assert float(np.abs(other.latents - ref).max()) > 1e-2 * scale
