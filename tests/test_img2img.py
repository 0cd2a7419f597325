"""Starting from a picture: img2img and inpainting equal diffusers' pipelines on the same model, seed
and strength; the paste-back keeps every pixel outside the mask; bad input is refused clearly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from coreml_sd.errors import InputError
from coreml_sd.pipeline import Pipeline

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PROMPT = "a red apple on a wooden table"
EPS32 = 2.0**-23
SCHEDULERS = {"euler_a": "EulerAncestralDiscreteScheduler", "ddim": "DDIMScheduler",
              "dpmpp_2m": "DPMSolverMultistepScheduler"}


def _close(ours, expected, ulps=64):
    """Final latents agree to float32 rounding, in ulps of their scale (the VAE draw adds a few)."""
    tol = ulps * EPS32 * float(np.abs(expected).max())
    diff = float(np.abs(ours - expected).max())
    assert diff <= tol, f"max |difference| {diff:.3g} > {tol:.3g}"


def _init_image(size=16, seed=0):
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, size, dtype=np.float32)[None, :, None] * np.ones((size, 1, 3))
    return Image.fromarray(np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8))


def _mask(size=16):
    mask = np.zeros((size, size), np.uint8)
    mask[4:12, 6:14] = 255
    return Image.fromarray(mask, "L")


def _reference(cls, folder, sampler):
    pipe = getattr(diffusers, cls).from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(tiny_diffusers_dir):
    return Pipeline.load(tiny_diffusers_dir, backend="torch", device="cpu", precision="fp32")


@pytest.mark.parametrize("sampler", ["euler_a", "ddim"])
@pytest.mark.parametrize("strength", [0.3, 0.6, 1.0])
def test_img2img_equals_diffusers(pipe, tiny_diffusers_dir, sampler, strength):
    init = _init_image()
    ours = pipe(PROMPT, seed=5, steps=10, sampler=sampler, init_image=init, strength=strength)[0]
    ref = _reference("StableDiffusionImg2ImgPipeline", tiny_diffusers_dir, sampler)
    expected = ref(PROMPT, image=init, strength=strength, num_inference_steps=10, guidance_scale=7.5,
                   generator=torch.Generator("cpu").manual_seed(5), output_type="latent").images.numpy()
    _close(ours.latents, expected)
    assert ours.params.extras["Denoising strength"] == f"{strength:g}"


@pytest.mark.parametrize("sampler,strength", [("euler_a", 1.0), ("euler_a", 0.6), ("dpmpp_2m", 0.8)])
def test_inpainting_with_a_4_channel_unet_equals_diffusers(pipe, tiny_diffusers_dir, sampler, strength):
    init, mask = _init_image(), _mask()
    ours = pipe(PROMPT, seed=7, steps=8, sampler=sampler, init_image=init, mask=mask, strength=strength,
                mask_blur=0, num_images=2)
    ref = _reference("StableDiffusionInpaintPipeline", tiny_diffusers_dir, sampler)
    # Image i of a request is seed + i's image alone: diffusers' pipeline called once per seed. (Given
    # several generators in one call, diffusers' inpaint encodes the image with the first only.)
    expected = [ref(PROMPT, image=init, mask_image=mask, strength=strength, num_inference_steps=8, guidance_scale=7.5,
                    generator=torch.Generator("cpu").manual_seed(s), output_type="latent").images.numpy()
                for s in (7, 8)]
    _close(np.concatenate([o.latents for o in ours]), np.concatenate(expected))
    # The paste-back: every pixel outside the mask is the input's.
    outside = np.asarray(mask) == 0
    for out in ours:
        assert np.array_equal(np.asarray(out.image)[outside], np.asarray(init)[outside])


@pytest.fixture(scope="module")
def inpainting_dir(tmp_path_factory):
    """A tiny 9-channel inpainting model (SD 1.x layout) as a diffusers folder."""
    from tiny_models import UNET_CONFIG, write_tiny_diffusers_folder

    return write_tiny_diffusers_folder(tmp_path_factory.mktemp("models") / "tiny-inpaint", seed=4,
                                       unet_config=dict(UNET_CONFIG, in_channels=9))


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting_with_a_9_channel_unet_equals_diffusers(inpainting_dir, strength):
    pipe = Pipeline.load(inpainting_dir, backend="torch", device="cpu", precision="fp32")
    assert pipe.info.family == "sd1-inpainting"
    init, mask = _init_image(seed=1), _mask()
    ours = pipe(PROMPT, seed=3, steps=8, sampler="euler_a", init_image=init, mask=mask, strength=strength,
                mask_blur=0)[0]
    ref = _reference("StableDiffusionInpaintPipeline", inpainting_dir, "euler_a")
    expected = ref(PROMPT, image=init, mask_image=mask, strength=strength, num_inference_steps=8, guidance_scale=7.5,
                   generator=torch.Generator("cpu").manual_seed(3), output_type="latent").images.numpy()
    _close(ours.latents, expected)
    with pytest.raises(InputError, match="inpainting model: it needs an init image and a mask"):
        pipe(PROMPT, seed=3, steps=2)


def test_blurred_mask_and_only_masked_touch_nothing_outside(pipe):
    init = _init_image(32, seed=2)
    mask = np.zeros((32, 32), np.uint8)
    mask[10:18, 12:20] = 255
    mask = Image.fromarray(mask, "L")
    outside = np.asarray(mask) == 0
    # The whole picture at its own size, and "Only masked" generating the padded box at 16x16 and
    # pasting it back into the 32x32 picture.
    for only_masked, size in ((False, 32), (True, 16)):
        out = pipe(PROMPT, seed=1, steps=3, init_image=init, mask=mask, mask_blur=4, inpaint_full_res=only_masked,
                   inpaint_padding=4, width=size, height=size)[0]
        assert out.image.size == (32, 32)
        assert np.array_equal(np.asarray(out.image)[outside], np.asarray(init)[outside])
        assert out.params.extras["Mask blur"] == "4"
    assert out.params.extras["Inpaint area"] == "Only masked" and out.params.extras["Masked area padding"] == "4"


def test_bad_image_requests_are_clear(pipe, tmp_path, caplog):
    init = _init_image()
    for strength in (0.0, 1.5, float("nan")):
        with pytest.raises(InputError, match=r"strength .* must be a number in \(0, 1\]"):
            pipe(PROMPT, steps=2, init_image=init, strength=strength)
    with pytest.raises(InputError, match="leaves no step to run"):
        pipe(PROMPT, steps=2, init_image=init, strength=0.3)
    with pytest.raises(InputError, match="needs an init image"):
        pipe(PROMPT, steps=2, mask=_mask())
    text = tmp_path / "not-an-image.png"
    text.write_text("hello")
    with pytest.raises(InputError, match="not-an-image.png"):
        pipe(PROMPT, steps=2, init_image=text)
    with pytest.raises(InputError, match="nothing to repaint|all black|no white"):
        pipe(PROMPT, steps=2, init_image=init, mask=Image.new("L", (16, 16), 0))
    caplog.set_level("WARNING")
    out = pipe(PROMPT, seed=1, steps=2, init_image=init, mask=_mask().resize((32, 32)))
    assert out[0].image.size == (16, 16) and "mask" in caplog.text.lower()


def test_a_converted_folder_without_a_vae_encoder_says_how_to_add_one(tmp_path_factory):
    from helpers_runtime import shared_tiny_model

    folder = shared_tiny_model(tmp_path_factory)[1]
    manifest = json.loads((folder / "manifest.json").read_text())
    if "vae_encoder" in manifest["components"]:
        copy = tmp_path_factory.mktemp("no-encoder") / "m"
        shutil.copytree(folder, copy)
        del manifest["components"]["vae_encoder"]
        (copy / "manifest.json").write_text(json.dumps(manifest))
        folder = copy
    pipe = Pipeline.load(folder, backend="mil", device="cpu")
    with pytest.raises(InputError, match="needs a VAE encoder.*--components text_encoder,unet,vae_decoder,vae_encoder"):
        pipe(PROMPT, steps=2, init_image=_init_image())


def test_the_digits_model_turns_a_three_into_an_eight():
    from training.digits_classifier import classify

    pipe = Pipeline.load(None, backend="torch", device="cpu", precision="fp32")
    threes = [r.image for r in pipe("a handwritten digit three", seed=0, num_images=10, steps=20)]
    assert (classify(threes) == 3).mean() >= 0.8
    eights = [pipe("a handwritten digit eight", seed=100 + i, steps=20, init_image=three, strength=0.8)[0].image
              for i, three in enumerate(threes)]
    kept = [pipe("a handwritten digit eight", seed=100 + i, steps=20, init_image=three, strength=0.2)[0].image
            for i, three in enumerate(threes)]
    assert (classify(eights) == 8).mean() >= 0.6
    assert (classify(kept) == 3).mean() >= 0.8


def test_hires_fix_is_generation_then_img2img_at_the_larger_size(pipe):
    base = pipe(PROMPT, seed=9, steps=6)[0]
    hires = pipe(PROMPT, seed=9, steps=6, hires_scale=2, hires_steps=5, hires_denoise=0.6, hires_upscaler="lanczos")
    assert hires[0].image.size == (32, 32)
    # The same as A1111's two passes done by hand: the base image, Lanczos-upscaled, through img2img.
    upscaled = base.image.resize((32, 32), Image.LANCZOS)
    by_hand = pipe(PROMPT, seed=9, steps=5, init_image=upscaled, strength=0.6)[0]
    _close(hires[0].latents, by_hand.latents)
    extras = hires[0].params.extras
    assert (extras["Hires upscale"], extras["Hires steps"], extras["Hires upscaler"]) == ("2", "5", "Lanczos")
    latent = pipe(PROMPT, seed=9, steps=6, hires_scale=1.5, hires_denoise=0.5)[0]
    assert latent.image.size == (24, 24) and latent.params.extras["Hires upscaler"] == "Latent"
    with pytest.raises(InputError, match="hires scale must be a number above 1"):
        pipe(PROMPT, steps=2, hires_scale=0.5)


def test_outpainting_grows_the_canvas_and_keeps_the_picture(pipe):
    init = _init_image(16, seed=3)
    out = pipe(PROMPT, seed=2, steps=4, init_image=init, outpaint="left=8,down=8", mask_blur=0)[0]
    assert out.image.size == (24, 24)
    assert np.array_equal(np.asarray(out.image)[:16, 8:], np.asarray(init))
    assert out.params.extras["Outpaint"] == "left=8,down=8"
    with pytest.raises(InputError, match="multiple of 8"):
        pipe(PROMPT, steps=2, init_image=init, outpaint="left=4")


@pytest.mark.parametrize("model", ["plain", "inpainting"])
def test_converted_models_start_from_pictures_on_mil(model, tiny_diffusers_dir, inpainting_dir, tmp_path):
    """Converted with --img2img (the VAE encoder too; an inpainting UNet with its 9 channels), the
    packages on mil give the torch backend's images (fp16 packages: >= 30 dB)."""
    from click.testing import CliRunner

    from coreml_sd.cli import main
    from coreml_sd.metrics import image_psnr

    source = tiny_diffusers_dir if model == "plain" else inpainting_dir
    out = tmp_path / "converted"
    result = CliRunner().invoke(main, ["convert", str(source), "-o", str(out), "--img2img", "-q"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert "vae_encoder" in manifest["components"]
    sample = next(s for s in manifest["components"]["unet"]["inputs"] if s["name"] == "sample")
    assert sample["shape"][1] == (4 if model == "plain" else 9)
    kwargs = dict(seed=4, steps=6, sampler="euler", init_image=_init_image(seed=5), strength=0.7)
    if model == "inpainting":
        kwargs["mask"] = _mask()
    torch_image = Pipeline.load(source, backend="torch", device="cpu", precision="fp32")(PROMPT, **kwargs)[0].image
    mil_image = Pipeline.load(out, backend="mil", device="cpu")(PROMPT, **kwargs)[0].image
    assert image_psnr(mil_image, torch_image) >= 30
