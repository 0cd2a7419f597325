"""Inpainting masks: what the UNet sees equals diffusers' inpaint pipeline; crops and blur follow A1111;
the paste-back leaves every pixel outside the mask unchanged."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from coreml_sd.errors import InputError
from coreml_sd.image_input import image_to_array, resize_image
from coreml_sd.masks import (blur_mask, crop_region, crop_to_region, fill_masked, latent_noise, latent_nothing,
                             load_mask, mask_to_array, mask_to_latent, masked_image, overlay_alpha,
                             parse_masked_content, paste_back)
from helpers_image_input import diffusers_inpaint, noise_image, smooth_image

DIFFUSERS_MODE = {"stretch": "default", "crop": "crop", "fill": "fill"}


def rect_mask(size, box, value=255):
    mask = Image.new("L", size, 0)
    mask.paste(value, box)
    return mask


def blob_mask(width, height, seed=0):
    """An irregular soft mask: thresholded, blurred noise (gray levels near the edges)."""
    from PIL import ImageFilter

    x = np.asarray(noise_image(width // 4, height // 4, "L", seed).resize((width, height), Image.Resampling.BICUBIC))
    return Image.fromarray(np.where(x > 150, 255, 0).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1))


# --- loading --------------------------------------------------------------------------------------

def test_grayscale_mask_keeps_its_levels(tmp_path):
    mask = blob_mask(16, 8)
    mask.save(tmp_path / "m.png")
    np.testing.assert_array_equal(np.asarray(load_mask(tmp_path / "m.png")), np.asarray(mask))


def test_alpha_mask_is_thresholded_at_128_as_a1111(tmp_path):
    x = np.zeros((1, 4, 4), np.uint8)
    x[0, :, 3] = [0, 128, 129, 255]
    Image.fromarray(x, "RGBA").save(tmp_path / "a.png")
    assert np.asarray(load_mask(tmp_path / "a.png"))[0].tolist() == [0, 0, 255, 255]


def test_opaque_rgba_mask_uses_its_gray_levels():
    x = np.full((2, 2, 4), 255, np.uint8)
    x[..., :3] = 0
    x[0, 0, :3] = 200
    assert np.asarray(load_mask(Image.fromarray(x, "RGBA"))).tolist() == [[200, 0], [0, 0]]


def test_la_and_sixteen_bit_masks(tmp_path):
    la = Image.merge("LA", [Image.new("L", (2, 1), 0), Image.new("L", (2, 1), 0)])
    la.putpixel((1, 0), (0, 255))
    assert np.asarray(load_mask(la)).tolist() == [[0, 255]]
    Image.fromarray(np.array([[0, 65535]], np.uint16)).save(tmp_path / "m16.png")
    assert np.asarray(load_mask(tmp_path / "m16.png")).tolist() == [[0, 255]]


def test_invert_is_inpaint_not_masked():
    mask = rect_mask((8, 8), (0, 0, 4, 8))
    assert np.asarray(load_mask(mask, invert=True))[:, 4:].min() == 255


def test_mask_of_another_size_is_resized_with_a_warning(caplog):
    mask = rect_mask((16, 16), (0, 0, 8, 16))
    with caplog.at_level(logging.WARNING, logger="coreml_sd.masks"):
        out = load_mask(mask, (32, 24))
    assert out.size == (32, 24)
    assert "16x16" in caplog.text and "32x24" in caplog.text
    np.testing.assert_array_equal(np.asarray(out), np.asarray(resize_image(mask, 32, 24, "stretch")))


@pytest.mark.parametrize("mask", [Image.new("L", (8, 8), 0), Image.new("RGBA", (8, 8), (255, 255, 255, 0))])
def test_all_black_mask_is_a_clear_error(mask):
    with pytest.raises(InputError, match="all black: nothing to repaint"):
        load_mask(mask)


def test_mask_that_is_not_an_image(tmp_path):
    (tmp_path / "m.png").write_text("hello")
    with pytest.raises(InputError, match="m.png is not an image"):
        load_mask(tmp_path / "m.png")


# --- blur -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("px", [1, 2, 4])  # tails of >= 1 level at the radius: no rounding luck
def test_blur_kernel_reaches_exactly_a1111s_radius(px):
    """A1111's kernel is 2 * int(2.5 * px + 0.5) + 1 wide: a step edge spreads exactly that radius."""
    cv2 = pytest.importorskip("cv2")
    radius = int(2.5 * px + 0.5)
    mask = rect_mask((64, 8), (0, 0, 32, 8))  # white left half, edge between columns 31 and 32
    row = np.asarray(blur_mask(mask, px)).astype(float)[4]
    assert row[32 + radius - 1] > 0 and (row[32 + radius:] == 0).all()
    # the profile is the Gaussian's tail sum with sigma = px (within the uint8 rounding)
    kernel = cv2.getGaussianKernel(2 * radius + 1, px)[:, 0]
    expected = [255 * kernel[radius + (x - 31):].sum() if x - 31 <= radius else 0 for x in range(32, 64)]
    np.testing.assert_allclose(row[32:], expected, atol=1.0)


def test_blur_x_and_y_separately():
    mask = rect_mask((32, 32), (0, 0, 32, 16))  # top half
    assert np.array_equal(np.asarray(blur_mask(mask, 4, 0)), np.asarray(mask))  # horizontal blur: no change
    assert np.asarray(blur_mask(mask, 0, 4))[16 + 9, 0] > 0
    assert np.array_equal(np.asarray(blur_mask(mask, 0)), np.asarray(mask))


def test_blur_rejects_negative():
    with pytest.raises(InputError, match=">= 0"):
        blur_mask(rect_mask((8, 8), (0, 0, 4, 4)), -1)


# --- what the UNet sees: equal to diffusers' StableDiffusionInpaintPipeline -----------------------

@pytest.mark.parametrize("mode", ["stretch", "crop", "fill"])
@pytest.mark.parametrize("size", [(40, 24), (32, 32)])
def test_mask_to_array_equals_diffusers_mask_processor(mode, size):
    mask = blob_mask(*size)
    ours = mask_to_array(mask, 32, 16, mode)
    theirs = diffusers_inpaint().mask_processor.preprocess(mask, height=16, width=32,
                                                         resize_mode=DIFFUSERS_MODE[mode]).numpy()
    assert ours.shape == (1, 1, 16, 32) and set(np.unique(ours)) <= {0.0, 1.0}
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("image_hw,latent_hw", [((64, 48), (8, 6)), ((37, 23), (8, 5)), ((8, 8), (16, 16)),
                                                ((10, 7), (30, 21)), ((16, 16), (16, 16))])
def test_mask_to_latent_equals_torch_interpolate(image_hw, latent_hw):
    """diffusers' prepare_mask_latents: F.interpolate(mask, size=latent_hw), default mode (nearest)."""
    import torch

    mask = mask_to_array(blob_mask(image_hw[1], image_hw[0], seed=3))
    theirs = torch.nn.functional.interpolate(torch.from_numpy(mask), size=latent_hw).numpy()
    np.testing.assert_array_equal(mask_to_latent(mask, latent_hw), theirs)


def test_mask_to_latent_takes_an_image():
    mask = blob_mask(32, 16)
    np.testing.assert_array_equal(mask_to_latent(mask, (2, 4)), mask_to_latent(mask_to_array(mask), (2, 4)))


def test_masked_image_equals_diffusers():
    """diffusers: masked_image = init_image * (mask_condition < 0.5), from its own preprocessors."""
    image, mask = smooth_image(40, 24), blob_mask(40, 24)
    init = diffusers_inpaint().image_processor.preprocess(image, height=16, width=32)
    condition = diffusers_inpaint().mask_processor.preprocess(mask, height=16, width=32)
    theirs = (init * (condition < 0.5)).numpy()
    ours = masked_image(image_to_array(resize_image(image, 32, 16)), mask_to_array(mask, 32, 16))
    np.testing.assert_array_equal(ours, theirs)


# --- "Only masked": crop region, crop, paste-back ---------------------------------------------------

def test_crop_region_a1111_documented_examples():
    # "if the user has painted the top-right part of a 512x512 image, the result may be (256, 0, 512, 256)"
    assert crop_region(rect_mask((512, 512), (256, 0, 512, 256)), 0, 512, 512) == (256, 0, 512, 256)
    # "if user drew mask in a 128x32 region, and the dimensions for processing are 512x512,
    #  the region will be expanded to 128x128"
    assert crop_region(rect_mask((256, 256), (64, 112, 192, 144)), 0, 512, 512) == (64, 64, 192, 192)


@pytest.mark.parametrize("box,pad,target", [
    ((10, 30, 20, 34), 0, (64, 64)),   # thin strip: grows in height
    ((2, 2, 60, 8), 4, (64, 64)),      # strip at the top: shifted down to stay inside
    ((40, 0, 48, 60), 3, (64, 32)),    # tall region, landscape target
    ((70, 50, 80, 60), 6, (32, 64)),   # near the bottom-right corner
    ((0, 0, 80, 64), 0, (64, 64)),     # everything
])
def test_crop_region_equals_diffusers(box, pad, target):
    """diffusers' get_crop_region is A1111's get_crop_region + expand_crop_region in one function."""
    mask = rect_mask((80, 64), box)
    theirs = diffusers_inpaint().mask_processor.get_crop_region(mask, target[0], target[1], pad=pad)
    assert crop_region(mask, pad, *target) == tuple(theirs)


def test_crop_region_equals_diffusers_on_random_boxes():
    rng = np.random.default_rng(7)
    for _ in range(60):
        x1, y1 = rng.integers(0, 70), rng.integers(0, 50)
        box = (x1, y1, x1 + rng.integers(1, 81 - x1), y1 + rng.integers(1, 65 - y1))
        target, pad = tuple(int(v) for v in rng.choice([24, 32, 48, 64], 2)), int(rng.integers(0, 12))
        mask = rect_mask((80, 64), box)
        theirs = diffusers_inpaint().mask_processor.get_crop_region(mask, *target, pad=pad)
        assert crop_region(mask, pad, *target) == tuple(theirs), (box, target, pad)


def test_crop_region_of_empty_mask():
    with pytest.raises(InputError, match="all black"):
        crop_region(Image.new("L", (8, 8)), 4, 8, 8)


def test_paste_back_keeps_every_pixel_outside_the_mask():
    original, generated = noise_image(48, 40, seed=1), noise_image(48, 40, seed=2)
    mask = rect_mask((48, 40), (10, 8, 34, 30))
    out = np.asarray(paste_back(original, generated, overlay_alpha(mask, blur_mask(mask, 4))))
    outside = np.asarray(mask) == 0
    np.testing.assert_array_equal(out[outside], np.asarray(original)[outside])
    # far enough inside (more than the blur radius from the edge) the generated pixels are kept
    np.testing.assert_array_equal(out[19:20, 21:23], np.asarray(generated)[19:20, 21:23])
    changed = (out != np.asarray(original)).any(axis=2)
    assert changed[~outside].mean() > 0.5


def test_overlay_alpha_feathers_inward():
    mask = rect_mask((64, 8), (0, 0, 32, 8))
    alpha = np.asarray(overlay_alpha(mask, blur_mask(mask, 4)))[4].astype(int)
    assert (alpha[32:] == 0).all() and alpha[0] == 255
    assert (np.diff(alpha[:32]) <= 0).all() and 0 < alpha[28] < 255  # a ramp just inside the edge
    np.testing.assert_array_equal(np.asarray(overlay_alpha(mask)), np.asarray(mask))  # no blur: the mask


def test_only_masked_touches_only_the_padded_box():
    original = smooth_image(96, 80, seed=4)
    mask = rect_mask((96, 80), (60, 10, 76, 22))
    blurred = blur_mask(mask, 2)
    box = crop_region(blurred, 8, 64, 64)
    x1, y1, x2, y2 = box
    assert x2 - x1 == y2 - y1  # widened to the 1:1 generation aspect
    model_input = crop_to_region(original, box, 64, 64)
    assert model_input.size == (64, 64) and crop_to_region(blurred, box, 64, 64).size == (64, 64)
    generated = noise_image(64, 64, seed=5)  # stands in for what the model made of the crop
    out = np.asarray(paste_back(original, generated, overlay_alpha(mask, blurred), box))
    orig = np.asarray(original)
    inside_box = np.zeros(orig.shape[:2], bool)
    inside_box[y1:y2, x1:x2] = True
    np.testing.assert_array_equal(out[~inside_box], orig[~inside_box])
    np.testing.assert_array_equal(out[np.asarray(mask) == 0], orig[np.asarray(mask) == 0])
    pasted = np.asarray(resize_image(generated, x2 - x1, y2 - y1, "crop"))
    np.testing.assert_array_equal(out[15:17, 67:69], pasted[15 - y1:17 - y1, 67 - x1:69 - x1])


def test_paste_back_size_errors():
    with pytest.raises(InputError, match="generated image"):
        paste_back(noise_image(8, 8), noise_image(16, 16), Image.new("L", (8, 8)))
    with pytest.raises(InputError, match="alpha"):
        paste_back(noise_image(8, 8), noise_image(8, 8), Image.new("L", (4, 4)))


# --- masked content -------------------------------------------------------------------------------

def test_fill_paints_the_hole_with_the_surrounding_colour():
    image = np.zeros((48, 48, 3), np.uint8)
    image[:] = (200, 50, 30)
    image[16:32, 16:32] = (0, 255, 0)  # the part to repaint
    mask = rect_mask((48, 48), (16, 16, 32, 32))
    out = np.asarray(fill_masked(Image.fromarray(image), mask)).astype(int)
    np.testing.assert_array_equal(out[np.asarray(mask) == 0], image[np.asarray(mask) == 0])
    # 8-bit premultiplied colour at the faint edges of the blurred layers costs a few levels
    assert np.abs(out[16:32, 16:32] - [200, 50, 30]).max() <= 6


@pytest.mark.parametrize("name,value", [("original", "original"), ("Latent noise", "latent-noise"),
                                        ("latent_nothing", "latent-nothing"), ("fill", "fill"), (2, "latent-noise")])
def test_masked_content_names(name, value):
    assert parse_masked_content(name) == value


def test_masked_content_unknown():
    with pytest.raises(InputError, match="original, fill, latent-noise, latent-nothing"):
        parse_masked_content("latent fog")


def test_latent_noise_and_nothing_replace_only_the_masked_latents():
    rng = np.random.default_rng(0)
    latents, noise = rng.standard_normal((1, 4, 6, 8), np.float32), rng.standard_normal((1, 4, 6, 8), np.float32)
    mask = mask_to_latent(rect_mask((64, 48), (16, 8, 48, 32)), (6, 8))
    inside = np.broadcast_to(mask == 1, latents.shape)
    noised, cleared = latent_noise(latents, mask, noise), latent_nothing(latents, mask)
    np.testing.assert_array_equal(noised[~inside], latents[~inside])
    np.testing.assert_array_equal(noised[inside], noise[inside])
    np.testing.assert_array_equal(cleared[~inside], latents[~inside])
    assert (cleared[inside] == 0).all() and inside.any()
