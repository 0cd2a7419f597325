"""The digits training script (training/train_digits.py): its data, its determinism, its output.

The shipped weights are only as trustworthy as the claim that the script reproduces them; a short
run (a few steps of each stage) twice must give byte-identical files, and they must load through
the runtime's checkpoint path with their config.
"""

from __future__ import annotations

import hashlib
import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

SCRIPT = Path(__file__).resolve().parents[1] / "training" / "train_digits.py"


@pytest.fixture(scope="module")
def train():
    mp = pytest.MonkeyPatch()
    mp.setenv("OMP_WAIT_POLICY", "PASSIVE")  # the script sets it at import; keep it from leaking
    spec = importlib.util.spec_from_file_location("train_digits", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    mp.undo()


def test_captions_name_the_digit_and_the_look(train):
    rng = random.Random(0)
    texts = [(d, s, train.caption(d, s, rng)) for d in range(10) for s in train.STYLE_NAMES for _ in range(40)]
    empty = sum(t == "" for _, _, t in texts) / len(texts)
    assert 0.1 < empty < 0.2  # the unconditional share for classifier-free guidance
    for digit, _, text in texts:
        if text:
            assert train.WORDS[digit] in text or str(digit) in text, text
    red = [t for _, s, t in texts if s == "red" and t]
    assert np.mean(["red" in t for t in red]) > 0.8
    black = [t for _, s, t in texts if s == "black" and t]
    assert not any(c in t for t in black for c in ("red", "green", "blue", "white on black"))


def test_render_draws_each_look(train):
    ink8 = torch.zeros(5, 8, 8)
    ink8[:, 1:7, 3:5] = 1.0  # a bar: ink in the middle, paper at the border
    styles = torch.arange(5)
    images = train.render(ink8, styles, torch.Generator().manual_seed(0))
    assert images.shape == (5, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    rgb = (images + 1) / 2
    centre, corner = rgb[:, :, 16, 16], rgb[:, :, 0, 0]
    for i, name in enumerate(train.STYLE_NAMES):
        ink, paper = train.STYLES[name][:2]
        assert torch.allclose(corner[i], torch.tensor(paper), atol=1e-4), name
        assert torch.allclose(centre[i], torch.tensor(ink), atol=0.05), name


def test_short_runs_are_byte_identical_and_load_through_the_runtime(train, tmp_path):
    from coreml_sd.checkpoint.config import CheckpointConfig
    from coreml_sd.sources import open_model

    args = ["--limit", "64", "--variants", "1", "--vae-steps", "2", "--unet-steps", "2", "--vae-batch", "8", "--unet-batch", "8"]
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        for name in ("a", "b"):
            assert train.main(["--out", str(tmp_path / name), *args]) == 0
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)

    def digest(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    for file in ("digits.safetensors", "digits.coreml-sd.json"):
        assert digest(tmp_path / "a" / file) == digest(tmp_path / "b" / file), file
    config = CheckpointConfig.from_json(tmp_path / "a" / "digits.coreml-sd.json")
    source = open_model(tmp_path / "a" / "digits.safetensors")
    assert source.info.sample_size == 32 and source.info.vae_scale_factor == 4
    assert source.info.scaling_factor == pytest.approx(config.scaling_factor)
    assert source.info.text_hidden_size == 32
