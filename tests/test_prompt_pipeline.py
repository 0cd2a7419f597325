"""AUTOMATIC1111's prompt semantics through the whole pipeline, equal to diffusers given the same
conditioning: weighted long prompts, clip skip, prompt editing.

The reference conditioning is computed outside the pipeline, with `prompt_chunks.encode_prompt_pair`
on the pipeline's own text encoder (written from A1111's algorithm; tests/test_prompt_chunks.py
checks it against a direct transcription), then handed to diffusers as prompt_embeds.
"""

import logging

import numpy as np
import pytest

from coreml_sd import Pipeline
from coreml_sd.prompt_chunks import encode_prompt_pair

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PROMPT = "(a red cat:1.3), " + ", ".join(["sitting on a wooden chair in a sunny garden"] * 18) + ", [blurry]"
NEGATIVE = "lowres, (bad anatomy:1.2)"
EPS32 = 2.0**-23


@pytest.fixture(scope="module")
def pipe(tiny_diffusers_dir):
    return Pipeline.load(tiny_diffusers_dir, backend="torch", device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def reference(tiny_diffusers_dir):
    ref = diffusers.StableDiffusionPipeline.from_pretrained(
        tiny_diffusers_dir, safety_checker=None, requires_safety_checker=False, local_files_only=True)
    ref.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref


def _diffusers(reference, cond, uncond, steps=6):
    return reference(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps,
                     guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(11),
                     output_type="latent").images.numpy()


def _close(ours, expected, ulps=40):
    tol = ulps * EPS32 * float(np.abs(expected).max())
    assert float(np.abs(ours - expected).max()) <= tol


def test_weighted_three_chunk_prompt_image_equals_diffusers(pipe, reference):
    cond, uncond = encode_prompt_pair(lambda ids: pipe.components.text_encoder.encode(ids).hidden, pipe.tokenizer,
                                      PROMPT, NEGATIVE)
    assert cond.shape == uncond.shape == (1, 3 * 77, 32)  # the negative padded with empty chunks
    ours = pipe(PROMPT, negative_prompt=NEGATIVE, seed=11, sampler="euler_a", steps=6, guidance_scale=5.0)
    expected = _diffusers(reference, cond, uncond)
    _close(ours[0].latents, expected)
    # And the conditioning matters: diffusers' own reading of the text (77 tokens, brackets as words) differs.
    plain = reference(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=5.0,
                      generator=torch.Generator("cpu").manual_seed(11), output_type="latent").images.numpy()
    assert np.abs(plain - expected).max() > 1e-2


def test_clip_skip_two_is_the_penultimate_layer_through_the_final_norm(pipe, reference):
    text_encoder = reference.text_encoder
    with torch.no_grad():
        def encode(text):
            out = text_encoder(torch.tensor([pipe.tokenizer(text)]), output_hidden_states=True)
            return text_encoder.final_layer_norm(out.hidden_states[-2])
        cond, uncond = encode("a red cat"), encode("")
    ours = pipe("a red cat", seed=11, sampler="euler_a", steps=6, guidance_scale=5.0, clip_skip=2)
    _close(ours[0].latents, _diffusers(reference, cond, uncond))
    assert ours[0].params.extras["Clip skip"] == "2"


def test_prompt_editing_switches_the_conditioning_at_its_step(pipe):
    seen = []
    unet = pipe.components["unet"]
    original = unet.predict
    unet.predict = lambda sample, t, cond: (seen.append(cond.context[1:].clone()), original(sample, t, cond))[1]
    try:
        pipe("[a red cat:a blue dog:3]", seed=1, sampler="euler", steps=6)
    finally:
        del unet.predict
    red, blue = (pipe.encode_prompt(t).hidden for t in ("a red cat", "a blue dog"))
    # Calls 1-4 (0..3 done) see the first text, as A1111's reconstruct_cond_batch; then the second.
    assert len(seen) == 6
    assert all(torch.equal(c, red) for c in seen[:4]) and all(torch.equal(c, blue) for c in seen[4:])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from helpers_runtime import shared_tiny_model

    return shared_tiny_model(tmp_path_factory)[1]


def test_long_prompt_on_a_77_token_package_warns_and_keeps_the_first_chunk(converted, caplog):
    caplog.set_level(logging.WARNING, logger="coreml_sd")
    mil = Pipeline.load(converted, backend="mil", device="cpu")
    long = mil(PROMPT, seed=3, steps=2)[0]
    assert "the prompt needs 3 chunks of 75 tokens" in caplog.text and "the rest is ignored" in caplog.text
    assert long.image.size == (16, 16)
    with pytest.raises(Exception, match="clip skip 2 cannot be applied"):
        mil("a red cat", seed=3, steps=2, clip_skip=2)


@pytest.fixture(scope="module")
def converted_long(tmp_path_factory):
    """The tiny model converted with 2-chunk prompts (UNet context 77 or 154) and clip skip 2 baked in."""
    from click.testing import CliRunner
    from helpers_runtime import shared_tiny_model

    from coreml_sd.cli import main

    source = shared_tiny_model(tmp_path_factory)[0]
    out = tmp_path_factory.mktemp("long") / "tiny-long"
    result = CliRunner().invoke(main, ["convert", str(source), "-o", str(out), "-q", "--max-prompt-chunks", "2",
                                       "--clip-skip", "2", "--json"])
    assert result.exit_code == 0, result.output
    return source, out


def test_converted_unet_takes_two_chunk_prompts_and_the_text_encoder_gives_clip_skip_2(converted_long):
    """convert --max-prompt-chunks 2 --clip-skip 2: the gate checked both context lengths, the UNet's
    text input takes 77 and 154 tokens, and a 2-chunk weighted prompt at the model's clip skip gives
    on mil the torch backend's image (clip skip 2 from the source) to fp16 precision."""
    from coreml_sd.model_description import describe_model
    from coreml_sd.metrics import psnr
    from coreml_sd.model_folder import Manifest

    source, folder = converted_long
    manifest = Manifest.read(folder)
    assert (manifest.prompt_chunks, manifest.clip_skip) == (2, 2)
    assert {"noise_pred", "noise_pred 154 tokens"} <= set(manifest.parity["components"]["unet"]["psnr_db"])
    unet = describe_model(folder / "Unet.mlpackage")
    assert unet.shapes["encoder_hidden_states"] == ((2, 32, 1, 77), (2, 32, 1, 154))
    prompt = "(a red cat:1.3), " + ", ".join(["sitting on a wooden chair"] * 10)  # 2 chunks
    mil = Pipeline.load(folder, backend="mil", device="cpu", precision="fp32")
    assert mil.info.max_prompt_tokens == 154 and mil.info.clip_skip == 2
    torch_pipe = Pipeline.load(source, backend="torch", device="cpu", precision="fp32")
    kwargs = dict(negative_prompt=NEGATIVE, seed=4, sampler="euler_a", steps=4, guidance_scale=5.0)
    got = mil(prompt, **kwargs)[0]  # clip skip: the model's (2)
    want = torch_pipe(prompt, clip_skip=2, **kwargs)[0]
    assert got.params.extras["Clip skip"] == "2"
    assert psnr(want.latents, got.latents) >= 30
    # The conditioning mattered: clip skip 1 on torch is another image.
    other = torch_pipe(prompt, clip_skip=1, **kwargs)[0]
    assert psnr(want.latents, other.latents) < psnr(want.latents, got.latents)
    with pytest.raises(Exception, match=r"converted with clip skip 2, so clip skip 1 cannot be applied.*valid: 2"):
        mil("a red cat", seed=3, steps=2, clip_skip=1)


def test_prompt_chunks_refused_where_core_ml_cannot_take_them(tmp_path, converted_long):
    from click.testing import CliRunner

    from coreml_sd.cli import main

    source = converted_long[0]
    result = CliRunner().invoke(main, ["convert", str(source), "-o", str(tmp_path / "x"), "--max-prompt-chunks", "2",
                                       "--sizes", "16x16,24x24"])
    assert result.exit_code != 0 and "--max-prompt-chunks with several --sizes is not supported" in result.output
    result = CliRunner().invoke(main, ["convert", str(source), "-o", str(tmp_path / "y"), "--max-prompt-chunks", "13"])
    assert result.exit_code == 2 and "13" in result.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
