"""End-to-end quality of the built-in digits model, through the runtime's own Pipeline.

The shipped single-file checkpoint goes through the same import path as a community checkpoint
(original key layout + config), the runtime's samplers, the torch backend and the VAE; a digit
classifier trained here on scikit-learn's digits (training/digits_classifier.py) labels what comes out.
Everything is seeded, so the numbers are fixed on a given platform; the thresholds leave room for
a few images to change with floating-point differences between machines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.digits_classifier import WORDS, accuracy, digit_classifier, look, user_prompt

torch = pytest.importorskip("torch")

BUILTIN_DIR = Path(__file__).resolve().parents[1] / "coreml_sd" / "data" / "builtin"
CHECKPOINT = BUILTIN_DIR / "digits.safetensors"
CONFIG = BUILTIN_DIR / "digits.coreml-sd.json"
SAMPLERS = ("euler_a", "euler", "ddim", "dpmpp_2m")
SEEDS = range(50)  # seed s prompts digit s % 10, in one of five prompt forms (digits_classifier.USER_FORMS)
# The rest of AUTOMATIC1111's list (coreml_sd.samplers.SAMPLERS), each with its "default" plan
# (A1111's automatic one for the samplers diffusers lacks), on fewer seeds to keep the run short.
OTHER_SAMPLERS = ("heun", "lms", "dpmpp_2m_sde", "dpm2", "dpm2_a", "dpmpp_2s_a", "dpmpp_sde", "dpmpp_2m_sde_heun",
                  "dpmpp_3m_sde", "dpm_fast", "dpm_adaptive", "restart", "plms", "unipc", "lcm")
OTHER_SEEDS = range(20)
STEPS = 25
GUIDANCE = 7.5


class Runs:
    """Images generated on first use and kept per (prompt, seed, settings): tests share them."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.cache: dict[tuple, object] = {}

    def images(self, prompts_and_seeds, *, sampler="euler_a", guidance=GUIDANCE, negatives=None):
        negatives = negatives or [""] * len(prompts_and_seeds)
        keys = [(prompt, seed, sampler, guidance, negative)
                for (prompt, seed), negative in zip(prompts_and_seeds, negatives)]
        missing = [k for k in dict.fromkeys(keys) if k not in self.cache]
        # Consecutive seeds go through the UNet as one batch (image i of a request uses seed + i,
        # with its own prompt and negative prompt): the same images as one at a time, to rounding.
        runs: list[list[tuple]] = []
        for key in missing:
            if runs and key[1] == runs[-1][-1][1] + 1:
                runs[-1].append(key)
            else:
                runs.append([key])
        for run in runs:
            results = self.pipe([k[0] for k in run], negative_prompt=[k[4] for k in run], seed=run[0][1],
                                batch_size=len(run), sampler=sampler, steps=STEPS, guidance_scale=guidance)
            for key, result in zip(run, results):
                assert result.seed == key[1]
                self.cache[key] = result.image
        return [self.cache[k] for k in keys]

    def user_prompts(self, **kwargs):
        pairs = [(user_prompt(s)[0], s) for s in SEEDS]
        return self.images(pairs, **kwargs), [user_prompt(s)[1] for s in SEEDS]


@pytest.fixture(scope="module")
def runs():
    from coreml_sd.pipeline import Pipeline

    # One thread: at batch 2 on an 8x8 latent the UNet is all small ops, which a second thread
    # only slows down (and on a shared machine, much more so).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    digit_classifier()  # fit once, outside the timed generation
    try:
        # model=None: the runtime's own default, as `coreml-sd generate PROMPT` without --model.
        yield Runs(Pipeline.load(None, backend="torch", device="cpu", precision="fp32"))
    finally:
        torch.set_num_threads(threads)


def test_builtin_model_is_one_small_original_layout_file_with_its_config():
    from safetensors import safe_open

    from coreml_sd.checkpoint.config import CheckpointConfig

    assert CHECKPOINT.stat().st_size < 10 * 2**20
    with safe_open(str(CHECKPOINT), "pt") as f:
        keys = set(f.keys())
    for key in ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.weight",
                "first_stage_model.decoder.conv_out.weight", "first_stage_model.quant_conv.weight",
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"):
        assert key in keys
    config = CheckpointConfig.from_json(CONFIG)
    assert (config.family, config.sample_size, config.scheduler.beta_schedule) == ("sd1", 32, "scaled_linear")
    # The scaling factor was measured from the latents (1 / their std), not SD's 0.18215.
    assert config.scaling_factor != pytest.approx(0.18215, abs=1e-3)


def test_model_none_loads_the_builtin_model():
    from coreml_sd.sources import open_model

    for spec in (None, "builtin"):
        source = open_model(spec)
        assert Path(source.info.path).resolve() == CHECKPOINT.resolve()
        assert source.info.sample_size == 32 and source.info.kind == "checkpoint"


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_each_sampler_draws_the_prompted_digit(runs, sampler):
    images, digits = runs.user_prompts(sampler=sampler)
    acc = accuracy(images, digits)
    print(f"{sampler}: {acc:.0%} of seeds 0-49 recognised as the prompted digit")
    assert acc >= 0.9, f"{sampler}: {acc:.0%} recognised (need >= 90%)"


def test_the_other_samplers_are_all_of_a1111s():
    from coreml_sd.samplers import SAMPLERS as ALL

    assert sorted(SAMPLERS + OTHER_SAMPLERS) == sorted(ALL)


@pytest.mark.parametrize("sampler", OTHER_SAMPLERS)
def test_every_other_sampler_draws_the_prompted_digit(runs, sampler):
    pairs = [(user_prompt(s)[0], s) for s in OTHER_SEEDS]
    acc = accuracy(runs.images(pairs, sampler=sampler), [user_prompt(s)[1] for s in OTHER_SEEDS])
    print(f"{sampler}: {acc:.0%} of seeds 0-19 recognised as the prompted digit")
    assert acc >= 0.9, f"{sampler}: {acc:.0%} recognised (need >= 90%)"


def test_default_look_is_black_ink_on_white_paper(runs):
    images, _ = runs.user_prompts()
    share = np.mean([look(im).light_paper and look(im).ink.max() < 0.35 for im in images])
    assert share >= 0.9, f"only {share:.0%} of plain prompts gave dark ink on light paper"


def test_guidance_matters(runs):
    seeds = SEEDS[:30]
    pairs = [(user_prompt(s)[0], s) for s in seeds]
    digits = [user_prompt(s)[1] for s in seeds]
    guided = accuracy(runs.images(pairs), digits)
    unguided = accuracy(runs.images(pairs, guidance=1.0), digits)
    print(f"seeds 0-29: guidance 7.5 {guided:.0%}, guidance 1.0 {unguided:.0%}")
    assert guided - unguided >= 0.1, f"guidance 7.5 gave {guided:.0%}, guidance 1.0 gave {unguided:.0%}"


def test_negative_prompt_of_the_prompted_digit_lowers_accuracy(runs):
    seeds = SEEDS[:20]
    pairs = [(user_prompt(s)[0], s) for s in seeds]
    digits = [user_prompt(s)[1] for s in seeds]
    plain = accuracy(runs.images(pairs), digits)
    negated = accuracy(runs.images(pairs, negatives=[str(d) for d in digits]), digits)
    print(f"seeds 0-19: negative prompt = the digit {negated:.0%}, without {plain:.0%}")
    assert negated <= plain - 0.1, f"with the digit as negative prompt {negated:.0%}, without {plain:.0%}"


def test_red_ink_from_the_prompt(runs):
    pairs = [(f"a red handwritten digit {WORDS[s % 10]}", s) for s in range(10)]
    images = runs.images(pairs)
    red = np.mean([look(im).redness > 0.4 and look(im).light_paper for im in images])
    acc = accuracy(images, [s % 10 for s in range(10)])
    print(f"red prompts: {red:.0%} red ink, {acc:.0%} right digit")
    assert red >= 0.9 and acc >= 0.8, f"red ink in {red:.0%}, right digit in {acc:.0%}"


def test_white_on_black_from_the_prompt(runs):
    pairs = [(f"a handwritten digit {WORDS[s % 10]}, white on black", s) for s in range(10)]
    images = runs.images(pairs)
    dark = np.mean([look(im).dark_paper and look(im).ink.min() > 0.65 for im in images])
    acc = accuracy(images, [s % 10 for s in range(10)])
    print(f"white-on-black prompts: {dark:.0%} white ink on dark paper, {acc:.0%} right digit")
    assert dark >= 0.9 and acc >= 0.7, f"white on black in {dark:.0%}, right digit in {acc:.0%}"
