"""ControlNet preprocessors (A1111 extension names and defaults), the control image (equal to diffusers'
prepare_image) and `coreml-sd control preprocess`."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from coreml_sd.cli import main
from coreml_sd.control_preprocess import get_preprocessor, prepare_control_image, preprocess
from coreml_sd.errors import CoreMLSDError, InputError
from helpers_image_input import diffusers_controlnet, smooth_image


def step_image(size=64, low=100, high=140):
    """Left half `low`, right half `high`: one vertical edge of contrast high - low."""
    x = np.full((size, size, 3), low, np.uint8)
    x[:, size // 2:] = high
    return Image.fromarray(x)


def test_canny_default_thresholds_are_a1111s():
    """A step of d levels has a Sobel (L1) gradient of 4d. An edge needs a pixel above the high
    threshold: d = 40 (160) finds nothing with low 100 / high 200, d = 60 (240) does."""
    weak, strong = step_image(high=140), step_image(high=160)
    assert np.asarray(preprocess("canny", weak, resolution=None)).max() == 0
    edges = np.asarray(preprocess("canny", strong, resolution=None))
    columns = np.nonzero(edges[:, :, 0].any(axis=0))[0]
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    assert set(columns) <= {31, 32} and edges[:, :, 0].any(axis=1).all()
    assert np.asarray(preprocess("canny", weak, resolution=None, low=50, high=150)).max() == 255


def test_canny_runs_at_the_preprocessor_resolution():
    image = smooth_image(48, 32)
    assert preprocess("canny", image).size == (768, 512)           # short side -> 512, as A1111
    assert preprocess("canny", image, resolution=64).size == (96, 64)
    assert preprocess("canny", image, resolution=None).size == (48, 32)


def test_canny_bad_thresholds():
    with pytest.raises(InputError, match="low <= high"):
        preprocess("canny", smooth_image(16, 16), low=200, high=100)


def test_scribble_threshold_invert_none():
    x = np.full((16, 16, 3), 255, np.uint8)
    x[8, :] = 0            # a black line on white
    x[:, 3] = (200, 90, 200)  # a line whose darkest channel is 90
    image = Image.fromarray(x)
    scribble = np.asarray(preprocess("scribble", image, resolution=None))[..., 0]
    assert (scribble[8] == 255).all() and (scribble[:, 3] == 255).all() and scribble[0, 0] == 0
    thr = np.asarray(preprocess("threshold", image, resolution=None, threshold=100))[..., 0]
    assert thr[0, 0] == 255 and thr[8, 0] == 0 and thr[0, 3] == 0
    np.testing.assert_array_equal(np.asarray(preprocess("invert", image)), 255 - x)
    np.testing.assert_array_equal(np.asarray(preprocess("none", image)), x)


@pytest.mark.parametrize("name,canonical", [("invert (from white bg & black line)", "invert"),
                                            ("scribble_thr", "scribble"), ("Canny", "canny"),
                                            ("passthrough", "none")])
def test_a1111_names(name, canonical):
    assert get_preprocessor(name).name == canonical


@pytest.mark.parametrize("name", ["depth_midas", "openpose_full", "lineart_realistic", "softedge_hed"])
def test_model_based_preprocessors_say_what_to_do(name):
    with pytest.raises(InputError, match="downloaded model.*'none'.*canny, scribble, threshold, invert, none"):
        get_preprocessor(name)


def test_unknown_preprocessor_and_option():
    with pytest.raises(InputError, match="unknown preprocessor 'blur'; valid: canny"):
        get_preprocessor("blur")
    with pytest.raises(InputError, match="'invert' takes no options; got low"):
        preprocess("invert", smooth_image(8, 8), low=3)


def test_missing_opencv_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # makes `import cv2` raise ImportError
    with pytest.raises(CoreMLSDError, match="pip install opencv-python-headless"):
        preprocess("canny", smooth_image(8, 8))


# --- the control image the ControlNet sees ------------------------------------------------------------

@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_prepare_control_image_equals_diffusers_prepare_image(mode):
    image = smooth_image(40, 24).convert(mode)
    theirs = diffusers_controlnet().prepare_image(image, width=32, height=16, batch_size=1, num_images_per_prompt=1,
                                                device="cpu", dtype=None).numpy()
    ours = prepare_control_image(image, 32, 16)
    assert ours.dtype == np.float32 and ours.shape == (1, 3, 16, 32) and 0 <= ours.min() <= ours.max() <= 1
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("mode,theirs_mode", [("crop", "crop"), ("fill", "fill")])
def test_prepare_control_image_resize_modes_equal_diffusers(mode, theirs_mode):
    image = smooth_image(24, 40)
    theirs = diffusers_controlnet().control_image_processor.preprocess(image, height=16, width=32,
                                                                     resize_mode=theirs_mode).numpy()
    np.testing.assert_array_equal(prepare_control_image(image, 32, 16, mode), theirs)


def test_prepare_control_image_flattens_alpha_and_checks_size():
    x = np.zeros((8, 8, 4), np.uint8)  # fully transparent -> white, as the A1111 extension's HWC3
    assert (prepare_control_image(Image.fromarray(x, "RGBA"), 8, 8) == 1.0).all()
    with pytest.raises(InputError, match="multiples of 8"):
        prepare_control_image(smooth_image(8, 8), 12, 8)


# --- CLI ----------------------------------------------------------------------------------------------

def _run(*args):
    return CliRunner().invoke(main, ["control", "preprocess", *map(str, args)])


def test_cli_writes_the_map(tmp_path):
    src = tmp_path / "in.png"
    step_image(high=200).save(src)
    out = tmp_path / "edges.png"
    result = _run("canny", src, "-o", out, "--low", 50, "--high", 150, "--resolution", 0)
    assert result.exit_code == 0, result.output
    with Image.open(out) as written:
        np.testing.assert_array_equal(np.asarray(written),
                                      np.asarray(preprocess("canny", step_image(high=200), resolution=None,
                                                            low=50, high=150)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edges.png", "in.png"]  # no temporary left


def test_cli_json(tmp_path):
    src = tmp_path / "in.png"
    smooth_image(40, 24).save(src)
    result = _run("invert (from white bg & black line)", src, "-o", tmp_path / "o.webp", "--json")
    assert result.exit_code == 0, result.output
    assert '"preprocessor": "invert"' in result.output and '"size": [40, 24]' in result.output


@pytest.mark.parametrize("args,message", [
    (("depth", "{src}", "-o", "{out}"), "downloaded model"),
    (("blur", "{src}", "-o", "{out}"), "valid: canny, scribble, threshold, invert, none"),
    (("canny", "{txt}", "-o", "{out}"), "not an image"),
    (("canny", "{src}", "-o", "{tmp}/map.gif"), "must end in one of .png"),
    (("invert", "{src}", "-o", "{out}", "--low", "3"), "takes no options"),
    (("canny", "{src}", "-o", "{out}", "--high", "300"), "0<=x<=255"),
])
def test_cli_usage_errors_exit_2_and_write_nothing(tmp_path, args, message):
    src, txt = tmp_path / "in.png", tmp_path / "notes.png"
    smooth_image(16, 16).save(src)
    txt.write_text("not a picture")
    values = {"src": src, "txt": txt, "out": tmp_path / "out.png", "tmp": tmp_path}
    result = _run(*(a.format(**values) for a in args))
    assert result.exit_code == 2, result.output
    assert message in result.output.replace("\n", " ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "notes.png"]
