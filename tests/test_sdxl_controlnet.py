"""SDXL ControlNets on torch: our pipeline equals diffusers' StableDiffusionXLControlNetPipeline.

A tiny SDXL ControlNet is built from the tiny SDXL UNet (ControlNetModel.from_unet keeps its
`text_time` embedding, so the ControlNet takes the pooled text and the size time ids as SDXL
ControlNets do), with non-zero output convolutions so the control image changes the result by far
more than the tolerance (checked). Same weights and seeds on both sides.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import tiny_sdxl as T  # noqa: E402
from helpers_controlnet import build_tiny_controlnet, control_picture, write_controlnet_folder  # noqa: E402
from test_sdxl import EPS32, TOL_ULPS, assert_latents_close  # noqa: E402

from coreml_sd.errors import ModelError  # noqa: E402
from coreml_sd.pipeline import Pipeline  # noqa: E402

STEPS, CFG, SEED = 6, 5.0, 11
PROMPT, NEGATIVE = "a red cat on a blue sofa", "blurry"


@pytest.fixture(scope="module")
def xl_control(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_control")
    mods = T.build_tiny_sdxl(0)
    net = build_tiny_controlnet(mods["unet"], seed=4)
    return {"mods": mods, "net": net, "folder": T.save_folder(T.diffusers_pipeline(mods), root / "base"),
            "net_dir": write_controlnet_folder(root / "cn_xl", net), "image": control_picture(seed=7)}


def _reference(xl, *, scale: float, start: float = 0.0, end: float = 1.0, guess: bool = False):
    from diffusers import StableDiffusionXLControlNetPipeline

    mods = xl["mods"]
    tok1, tok2 = T.tokenizers()
    pipe = StableDiffusionXLControlNetPipeline(
        vae=mods["vae"], text_encoder=mods["text_encoder"], text_encoder_2=mods["text_encoder_2"], tokenizer=tok1,
        tokenizer_2=tok2, unet=mods["unet"], controlnet=xl["net"],
        scheduler=diffusers.EulerAncestralDiscreteScheduler.from_config(T.scheduler().config),
        force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, negative_prompt=NEGATIVE, image=xl["image"], num_inference_steps=STEPS, guidance_scale=CFG,
               height=16, width=16, generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent",
               controlnet_conditioning_scale=scale, control_guidance_start=start, control_guidance_end=end,
               guess_mode=guess)
    return out.images.numpy()


def _ours(pipe, xl, units, **kwargs):
    return pipe(PROMPT, negative_prompt=NEGATIVE, seed=SEED, sampler="euler_a", steps=STEPS, guidance_scale=CFG,
                controlnets=units, control_resize_mode="stretch", **kwargs)[0].latents


@pytest.fixture(scope="module")
def pipe(xl_control):
    return Pipeline.load(xl_control["folder"], backend="torch", device="cpu", precision="fp32")


@pytest.mark.parametrize("scale,start,end", [(1.0, 0.0, 1.0), (0.6, 0.2, 0.8)])
def test_sdxl_controlnet_equals_diffusers(pipe, xl_control, scale, start, end):
    expected = _reference(xl_control, scale=scale, start=start, end=end)
    got = _ours(pipe, xl_control, [(xl_control["net_dir"], xl_control["image"], scale, start, end)])
    assert_latents_close(got, expected)
    plain = pipe(PROMPT, negative_prompt=NEGATIVE, seed=SEED, sampler="euler_a", steps=STEPS,
                 guidance_scale=CFG)[0].latents
    assert np.abs(plain - expected).max() > 100 * TOL_ULPS * EPS32 * np.abs(expected).max()


def test_sdxl_controlnet_guess_mode_equals_diffusers(pipe, xl_control):
    expected = _reference(xl_control, scale=0.8, guess=True)
    got = _ours(pipe, xl_control, [(xl_control["net_dir"], xl_control["image"], 0.8)],
                control_mode="ControlNet is more important")
    assert_latents_close(got, expected)


def test_an_sd1_controlnet_on_sdxl_is_refused(pipe, tmp_path, tiny_diffusers_dir):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_diffusers_dir / "unet", local_files_only=True)
    sd1_net = write_controlnet_folder(tmp_path / "cn_sd1", build_tiny_controlnet(unet, seed=1))
    with pytest.raises(ModelError) as err:
        _ours(pipe, None, [(sd1_net, control_picture(), 1.0)])
    assert "sd1" in str(err.value) and "sdxl" in str(err.value)
