"""A whole inpainting request's image side against diffusers' StableDiffusionInpaintPipeline steps 5-7
(whole picture, and "Only masked" = its padding_mask_crop path), and the final paste-back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from coreml_sd.errors import InputError
from coreml_sd.inpaint_inputs import InpaintSettings, finish_inpaint, img2img_input, prepare_inpaint
from coreml_sd.masks import blur_mask
from helpers_image_input import diffusers_img2img, diffusers_inpaint, noise_image, smooth_image


def rect_mask(size, box):
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def diffusers_inputs(image, mask, width, height, padding_mask_crop=None):
    """The tensors StableDiffusionInpaintPipeline.__call__ builds (steps 5 and 7), by its own processors."""
    pipe = diffusers_inpaint()
    crops = None
    resize_mode = "default"
    if padding_mask_crop is not None:
        crops = pipe.mask_processor.get_crop_region(mask, width, height, pad=padding_mask_crop)
        resize_mode = "fill"
    init = pipe.image_processor.preprocess(image, height=height, width=width, crops_coords=crops,
                                           resize_mode=resize_mode)
    condition = pipe.mask_processor.preprocess(mask, height=height, width=width, resize_mode=resize_mode,
                                               crops_coords=crops)
    latent_mask = torch.nn.functional.interpolate(condition, size=(height // 8, width // 8))
    return init.numpy(), condition.numpy(), (init * (condition < 0.5)).numpy(), latent_mask.numpy(), crops


@pytest.mark.parametrize("blur", [0, 4])
def test_whole_picture_equals_diffusers(blur):
    """A diffusers user blurs the mask first (mask_processor.blur); we blur with A1111's kernel."""
    image, mask = smooth_image(56, 40), rect_mask((56, 40), (12, 8, 40, 30))
    ours = prepare_inpaint(image, mask, 32, 24, InpaintSettings(mask_blur=blur))
    expected = diffusers_inputs(image, blur_mask(mask, blur), 32, 24)
    for got, want in zip((ours.image, ours.mask, ours.masked_image, ours.latent_mask), expected):
        np.testing.assert_array_equal(got, want)
    assert ours.box is None and ours.original.size == (32, 24)


@pytest.mark.parametrize("padding", [0, 6])
def test_only_masked_equals_diffusers_padding_mask_crop(padding):
    image, mask = smooth_image(96, 64, seed=2), rect_mask((96, 64), (50, 10, 70, 20))
    ours = prepare_inpaint(image, mask, 32, 32, InpaintSettings(mask_blur=0, only_masked=True, padding=padding))
    *expected, crops = diffusers_inputs(image, mask, 32, 32, padding_mask_crop=padding)
    assert ours.box == tuple(crops)
    for got, want in zip((ours.image, ours.mask, ours.masked_image, ours.latent_mask), expected):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("only_masked", [False, True])
def test_finished_image_keeps_every_pixel_outside_the_mask(only_masked):
    image, mask = smooth_image(64, 48, seed=3), rect_mask((64, 48), (20, 12, 44, 36))
    inputs = prepare_inpaint(image, mask, 64, 48, InpaintSettings(only_masked=only_masked, padding=4))
    result = np.asarray(finish_inpaint(noise_image(64, 48, seed=9), inputs))
    outside = np.asarray(mask) == 0
    np.testing.assert_array_equal(result[outside], np.asarray(image)[outside])
    assert (result[~outside] != np.asarray(image)[~outside]).any()


def test_fill_content_is_in_the_model_input_only():
    image = np.zeros((32, 32, 3), np.uint8)
    image[:] = (10, 200, 10)
    image[8:24, 8:24] = (255, 0, 0)
    mask = rect_mask((32, 32), (8, 8, 24, 24))
    inputs = prepare_inpaint(Image.fromarray(image), mask, 32, 32, InpaintSettings(mask_blur=0, masked_content="fill"))
    red = inputs.image[0, 0, 12:20, 12:20]  # the red square is gone from the model's input
    assert inputs.masked_content == "fill" and red.max() < -0.8
    assert np.asarray(inputs.original)[16, 16].tolist() == [255, 0, 0]


def test_a1111_infotext_keys():
    settings = InpaintSettings(mask_blur=4, only_masked=True, padding=32, masked_content="latent-noise", invert=True)
    assert settings.a1111_params() == {"Mask blur": "4", "Mask mode": "Inpaint not masked", "Inpaint area": "Only masked",
                                       "Masked area padding": "32", "Masked content": "latent noise"}
    assert InpaintSettings(mask_blur=0).a1111_params() == {}


def test_bad_requests():
    image = smooth_image(16, 16)
    with pytest.raises(InputError, match="multiples of 8"):
        prepare_inpaint(image, rect_mask((16, 16), (0, 0, 8, 8)), 20, 16)
    with pytest.raises(InputError, match="all black"):
        prepare_inpaint(image, Image.new("L", (16, 16)), 16, 16)
    with pytest.raises(InputError, match="masked content"):
        prepare_inpaint(image, rect_mask((16, 16), (0, 0, 8, 8)), 16, 16, InpaintSettings(masked_content="blur"))


@pytest.mark.parametrize("mode,theirs", [("stretch", "default"), ("crop", "crop"), ("fill", "fill")])
def test_img2img_input_equals_diffusers(mode, theirs):
    image = smooth_image(40, 24).convert("RGBA")  # loading flattens the alpha first
    want = diffusers_img2img().image_processor.preprocess(image.convert("RGB"), height=16, width=32, resize_mode=theirs)
    np.testing.assert_array_equal(img2img_input(image, 32, 16, mode), want.numpy())


def test_without_blur_the_paste_back_alpha_is_the_mask():
    mask = Image.fromarray(np.tile(np.linspace(0, 255, 32).astype(np.uint8), (16, 1)))  # a soft ramp
    inputs = prepare_inpaint(smooth_image(32, 16), mask, 32, 16, InpaintSettings(mask_blur=0))
    np.testing.assert_array_equal(np.asarray(inputs.alpha), np.asarray(mask))
