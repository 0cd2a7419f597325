"""Init-image loading and resizing: every image mode loads; resizes equal A1111's / diffusers' pixels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from coreml_sd.errors import InputError
from coreml_sd.image_input import image_to_array, load_image, parse_resize_mode, resize_image
from helpers_image_input import diffusers_img2img, noise_image, smooth_image

# diffusers' VaeImageProcessor.resize names for A1111's modes 0, 1, 2 (its code is A1111's).
DIFFUSERS_MODE = {"stretch": "default", "crop": "crop", "fill": "fill"}
SIZES = [((40, 24), (32, 32)), ((24, 40), (32, 32)), ((30, 30), (48, 24)), ((17, 33), (24, 40)), ((32, 32), (32, 32))]


@pytest.mark.parametrize("mode", ["stretch", "crop", "fill"])
@pytest.mark.parametrize("src,dst", SIZES)
@pytest.mark.parametrize("pil_mode", ["RGB", "L"])
def test_resize_equals_diffusers(mode, src, dst, pil_mode):
    """Same Pillow calls on uint8 pixels, so the pixels are identical."""
    image = smooth_image(*src).convert(pil_mode)
    ours = resize_image(image, *dst, mode)
    theirs = diffusers_img2img().image_processor.resize(image, height=dst[1], width=dst[0],
                                                      resize_mode=DIFFUSERS_MODE[mode])
    assert ours.size == dst
    np.testing.assert_array_equal(np.asarray(ours.convert(theirs.mode)), np.asarray(theirs))


def test_crop_mode_cuts_the_overflow_evenly():
    """A1111 "Crop and resize": a 32x16 image into 16x16 keeps its middle 16 columns, unscaled."""
    x = np.zeros((16, 32, 3), np.uint8)
    x[:, 8:24] = 255
    out = np.asarray(resize_image(Image.fromarray(x), 16, 16, "crop"))
    assert (out == 255).all()


def test_fill_mode_stretches_the_edge_rows_into_the_bars():
    """A1111 "Resize and fill": a 32x16 image into 16x16 is 16x8 in the middle, bars of its edge rows."""
    x = np.zeros((16, 32, 3), np.uint8)
    x[:8] = (0, 200, 0)
    x[8:] = (0, 0, 200)
    out = np.asarray(resize_image(Image.fromarray(x), 16, 16, "fill")).astype(int)
    assert np.abs(out[:4] - out[4]).max() <= 2        # top bar = the first row of the picture
    assert np.abs(out[12:] - out[11]).max() <= 2      # bottom bar = its last row
    assert out[0, :, 1].min() > 190 and out[15, :, 2].min() > 190


def test_stretch_changes_aspect():
    assert resize_image(noise_image(40, 10), 16, 32, "stretch").size == (16, 32)


@pytest.mark.parametrize("name,mode", [("Just resize", "stretch"), ("Crop and resize", "crop"),
                                       ("Resize and fill", "fill"), ("crop-and-resize", "crop"),
                                       ("FILL", "fill"), (0, "stretch"), ("2", "fill")])
def test_a1111_resize_names(name, mode):
    assert parse_resize_mode(name) == mode


@pytest.mark.parametrize("name", ["Just resize (latent upscale)", "zoom", ""])
def test_unknown_resize_mode_names_choices(name):
    with pytest.raises(InputError, match="stretch, crop, fill"):
        parse_resize_mode(name)


@pytest.mark.parametrize("mode", ["stretch", "crop", "fill"])
def test_image_to_array_equals_diffusers_preprocess(mode):
    """Same float32 operations (/255, *2, -1) in the same order, so equal to the bit."""
    image = smooth_image(40, 24)
    ours = image_to_array(resize_image(image, 32, 16, mode))
    theirs = diffusers_img2img().image_processor.preprocess(image, height=16, width=32,
                                                          resize_mode=DIFFUSERS_MODE[mode]).numpy()
    assert ours.dtype == np.float32 and ours.shape == (1, 3, 16, 32)
    np.testing.assert_array_equal(ours, theirs)


def test_pipeline_to_pil_inverts_image_to_array():
    from coreml_sd.pipeline import to_pil

    image = noise_image(24, 16)
    assert np.array_equal(np.asarray(to_pil(image_to_array(image))), np.asarray(image))


def test_image_to_array_needs_rgb():
    with pytest.raises(InputError, match="RGB"):
        image_to_array(noise_image(8, 8, "L"))


# --- loading every mode ------------------------------------------------------------------------

def _saved(tmp_path, image, name, **kw):
    path = tmp_path / name
    image.save(path, **kw)
    return path


def test_rgba_is_composited_on_white_as_a1111(tmp_path):
    x = np.zeros((2, 3, 4), np.uint8)
    x[0, 0] = (255, 0, 0, 255)   # opaque red stays red
    x[0, 1] = (255, 0, 0, 0)     # fully transparent -> the white background
    x[0, 2] = (0, 0, 255, 128)   # half blue over white
    out = np.asarray(load_image(_saved(tmp_path, Image.fromarray(x, "RGBA"), "a.png"))).astype(int)
    assert out.shape == (2, 3, 3)
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert np.abs(out[0, 2] - [127, 127, 255]).max() <= 1


def test_palette_with_and_without_transparency(tmp_path):
    rgb = noise_image(6, 4)
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    out = load_image(_saved(tmp_path, pal, "p.png"))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(pal.convert("RGB")))
    index = pal.getpixel((0, 0))
    out = np.asarray(load_image(_saved(tmp_path, pal, "pt.png", transparency=index)))
    transparent = np.asarray(pal) == index
    assert (out[transparent] == 255).all()  # the transparent index is flattened onto white


def test_la_grayscale_with_alpha(tmp_path):
    la = Image.merge("LA", [Image.new("L", (4, 2), 40), Image.new("L", (4, 2), 0)])
    la.putpixel((0, 0), (40, 255))
    out = np.asarray(load_image(_saved(tmp_path, la, "la.png")))
    assert out[0, 0].tolist() == [40, 40, 40] and out[1, 3].tolist() == [255, 255, 255]


def test_sixteen_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    x = np.array([[0, 257, 32896, 65535]], np.uint16)
    path = _saved(tmp_path, Image.fromarray(x), "g16.png")
    with Image.open(path) as stored:
        assert stored.mode == "I;16"
    out = np.asarray(load_image(path))
    assert out[0, :, 0].tolist() == [0, 1, 128, 255] and (out[..., 0] == out[..., 2]).all()


def test_sixteen_bit_rgb_png(tmp_path):
    cv2 = pytest.importorskip("cv2")
    x = np.random.default_rng(0).integers(0, 65536, (4, 5, 3), dtype=np.uint16)
    path = tmp_path / "rgb16.png"
    cv2.imwrite(str(path), x[..., ::-1])  # cv2 writes BGR
    out = np.asarray(load_image(path)).astype(int)
    assert np.abs(out - x / 257).max() <= 1


def test_cmyk_and_grayscale_and_bilevel(tmp_path):
    cmyk = Image.new("CMYK", (2, 1), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (255, 0, 0, 0))
    out = np.asarray(load_image(_saved(tmp_path, cmyk, "c.jpg", quality=100))).astype(int)
    assert np.abs(out[0, 0] - [255, 255, 255]).max() <= 3 and np.abs(out[0, 1] - [0, 255, 255]).max() <= 3
    gray = noise_image(5, 3, "L")
    out = np.asarray(load_image(_saved(tmp_path, gray, "g.png")))
    assert (out == np.asarray(gray)[..., None]).all()
    bilevel = gray.convert("1")
    out = np.asarray(load_image(_saved(tmp_path, bilevel, "b.png")))
    assert set(np.unique(out)) <= {0, 255}


def test_exif_orientation_is_applied(tmp_path):
    x = np.zeros((2, 4, 3), np.uint8)  # stored 4 wide, 2 tall, red marker at the stored top-left
    x[0, 0] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = np.asarray(load_image(_saved(tmp_path, Image.fromarray(x), "r.png", exif=exif)))
    assert out.shape == (4, 2, 3)
    assert out[0, 1].tolist() == [255, 0, 0]  # the top-left corner turned to the top-right


def test_pil_input_is_not_modified():
    image = noise_image(4, 4, "RGBA")
    before = np.asarray(image).copy()
    assert load_image(image).mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), before)


# --- bad files --------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found: .*nope.png"):
        load_image(tmp_path / "nope.png")


def test_directory(tmp_path):
    with pytest.raises(InputError, match="found a directory"):
        load_image(tmp_path)


@pytest.mark.parametrize("content,found", [(b"prompt: a cat\n", "text"), (b"", "an empty file"),
                                           (b"PK\x03\x04" + bytes(40), "zip")])
def test_not_an_image(tmp_path, content, found):
    path = tmp_path / "x.png"
    path.write_bytes(content)
    with pytest.raises(InputError, match=f"{path}.*not an image.*{found}"):
        load_image(path)


def test_truncated_file(tmp_path):
    path = _saved(tmp_path, noise_image(64, 64), "t.png")
    path.write_bytes(path.read_bytes()[:400])
    with pytest.raises(InputError, match=f"{path} is a damaged or truncated image"):
        load_image(path)
