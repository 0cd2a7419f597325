"""Outpainting: the option string, and a canvas whose new area is exactly the mask."""

from __future__ import annotations

import numpy as np
import pytest

from coreml_sd.errors import InputError
from coreml_sd.outpaint import Outpaint, outpaint_canvas, parse_outpaint
from helpers_image_input import smooth_image


@pytest.mark.parametrize("text,expected", [
    ("left=128,right=128,up=0,down=64", Outpaint(128, 128, 0, 64)),
    ("down=64", Outpaint(down=64)),
    (" Left = 8 , top=16,bottom=24 ", Outpaint(left=8, up=16, down=24)),
    ("right:32", Outpaint(right=32)),
])
def test_parse(text, expected):
    assert parse_outpaint(text) == expected


@pytest.mark.parametrize("text,message", [
    ("sideways=8", "unknown outpaint side 'sideways'; valid: left, right, up, down"),
    ("left=-8", "expected SIDE=PIXELS"),
    ("left", "expected SIDE=PIXELS"),
    ("left=8,left=16", "given twice"),
    ("left=0,up=0", "adds no pixels"),
    ("", "adds no pixels"),
])
def test_parse_errors(text, message):
    with pytest.raises(InputError, match=message):
        parse_outpaint(text)


@pytest.mark.parametrize("fill", ["edge", "noise"])
def test_canvas_holds_the_image_and_the_mask_is_the_new_area(fill):
    image = smooth_image(40, 24)
    canvas, mask = outpaint_canvas(image, left=16, right=8, up=0, down=8, fill=fill, seed=1)
    assert canvas.size == mask.size == (64, 32) and canvas.mode == "RGB" and mask.mode == "L"
    c, m = np.asarray(canvas), np.asarray(mask)
    np.testing.assert_array_equal(c[0:24, 16:56], np.asarray(image))
    assert (m[0:24, 16:56] == 0).all()
    new = np.ones(m.shape, bool)
    new[0:24, 16:56] = False
    assert (m[new] == 255).all()


def test_edge_fill_repeats_the_border_pixels():
    image = smooth_image(16, 8)
    c = np.asarray(outpaint_canvas(image, left=8, up=8, fill="edge")[0])
    x = np.asarray(image)
    np.testing.assert_array_equal(c[8:, 0], x[:, 0])      # left strip = the first column
    np.testing.assert_array_equal(c[0, 8:], x[0])         # top strip = the first row
    assert (c[:8, :8] == x[0, 0]).all()                   # the corner = the corner pixel


def test_noise_fill_follows_the_seed_and_the_image_colours():
    image = smooth_image(16, 8)
    a = np.asarray(outpaint_canvas(image, right=16, fill="noise", seed=3)[0])
    b = np.asarray(outpaint_canvas(image, right=16, fill="noise", seed=3)[0])
    c = np.asarray(outpaint_canvas(image, right=16, fill="noise", seed=4)[0])
    np.testing.assert_array_equal(a, b)
    assert (a[:, 16:] != c[:, 16:]).any()
    means = np.asarray(image).reshape(-1, 3).mean(0)
    assert np.abs(a[:, 16:].reshape(-1, 3).mean(0) - means).max() < 20


def test_overlap_reaches_into_the_original():
    image = smooth_image(16, 16)
    mask = np.asarray(outpaint_canvas(image, left=8, right=8, overlap=4)[1])
    assert (mask[:, :12] == 255).all() and (mask[:, 12:20] == 0).all() and (mask[:, 20:] == 255).all()


def test_canvas_must_fit_the_latent_grid():
    with pytest.raises(InputError, match="outpainted width 36 is not a multiple of 8: add 4 px to left/right"):
        outpaint_canvas(smooth_image(20, 16), left=8, right=8)


def test_bad_fill():
    with pytest.raises(InputError, match="valid: edge, noise"):
        outpaint_canvas(smooth_image(16, 16), left=8, fill="mirror")
