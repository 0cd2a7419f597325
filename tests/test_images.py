"""Embedded generation parameters read back equal, by us and by the tools AUTOMATIC1111 uses."""

import os

import numpy as np
import pytest
from PIL import Image

from coreml_sd.images import FORMATS, GenerationParams, read_parameters, save_image, slugify

PARAMS = GenerationParams(
    prompt='a "quoted" cat, sitting\non two lines: ünïcödé 東京 😀',
    negative_prompt="blurry, lowres",
    steps=30,
    sampler="DPM++ 2M",
    schedule="karras",
    guidance_scale=6.5,
    seed=1234567890123,
    width=640,
    height=448,
    model="cyberrealistic_v32",
    model_hash="0123456789",
    extras={"Lora hashes": "detail: 1a2b3c, style: 4d5e6f", "Backend": "torch cpu bf16"},
)


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_parameters_round_trip(tmp_path, image, fmt):
    path = save_image(image, tmp_path, "x", fmt, PARAMS)
    assert path.suffix == FORMATS[fmt]
    text = read_parameters(path)
    assert text == PARAMS.to_a1111()
    assert GenerationParams.from_a1111(text) == PARAMS
    with Image.open(path) as im:
        assert im.size == (40, 24)


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_exif_user_comment_readable_by_piexif(tmp_path, image, fmt):
    """AUTOMATIC1111 reads JPEG/WebP parameters with piexif's UserComment helper."""
    piexif = pytest.importorskip("piexif")
    import piexif.helper

    path = save_image(image, tmp_path, "x", fmt, PARAMS)
    with Image.open(path) as im:
        exif = piexif.load(im.info["exif"])
    comment = exif["Exif"][piexif.ExifIFD.UserComment]
    assert piexif.helper.UserComment.load(comment) == PARAMS.to_a1111()


def test_a1111_text_format():
    text = GenerationParams(prompt="cat", seed=5, width=512, height=768, model="m").to_a1111()
    assert text == "cat\nSteps: 25, Sampler: Euler a, CFG scale: 7.5, Seed: 5, Size: 512x768, Model: m"


def test_parses_a1111_written_text():
    text = ("masterpiece, 1girl\nNegative prompt: lowres, bad anatomy\n"
            "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3658449498, "
            "Size: 512x768, Model hash: 7f96a1a9ca, Model: anything-v5, Clip skip: 2, "
            'Lora hashes: "add_detail: 7c6bad76eb54", Version: v1.10.1')
    p = GenerationParams.from_a1111(text)
    assert (p.prompt, p.negative_prompt, p.steps, p.sampler, p.schedule) == (
        "masterpiece, 1girl", "lowres, bad anatomy", 20, "DPM++ 2M", "karras")
    assert (p.guidance_scale, p.seed, p.width, p.height, p.model_hash) == (7.0, 3658449498, 512, 768, "7f96a1a9ca")
    assert p.extras == {"Clip skip": "2", "Lora hashes": "add_detail: 7c6bad76eb54", "Version": "v1.10.1"}


@pytest.mark.parametrize("prompt", ["../../etc/passwd", "a/b\\c", "nul\x00byte", "..", "", "   ", "東京",
                                    "x" * 10_000, "CON", "a:b*c?d\"e<f>g|h"])
def test_slug_is_a_safe_file_name(prompt):
    slug = slugify(prompt)
    assert slug and len(slug) <= 60
    assert all(c.isascii() and (c.isalnum() or c == "-") for c in slug)
    assert slug not in (".", "..") and os.sep not in slug


def test_never_overwrites_and_leaves_no_partial_files(tmp_path, image):
    first = save_image(image, tmp_path, "same", "png", PARAMS)
    second = save_image(image, tmp_path, "same", "png", PARAMS)
    assert first != second and first.exists() and second.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same-2.png", "same.png"]


def test_very_long_prompt_is_embedded_within_jpeg_limits(tmp_path, image):
    params = GenerationParams(prompt="x" * 40_000)
    path = save_image(image, tmp_path, "long", "jpeg", params)
    text = read_parameters(path)
    assert text.startswith("x" * 1000) and len(text) < 40_000  # truncated to fit the 64 KiB APP1 segment
