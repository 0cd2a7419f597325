"""Weighted long prompts through the whole pipeline equal diffusers run with the same prompt_embeds.

The conditioning comes from `prompt_chunks.encode_prompt_pair` on the pipeline's own text encoder;
until the pipeline calls it itself, the test hands it in by replacing `Pipeline.encode_prompt` on
the instance (the integration point the pipeline will call).
"""

import numpy as np
import pytest

from coreml_sd import Pipeline
from coreml_sd.prompt_chunks import encode_prompt_pair

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PROMPT = "(a red cat:1.3), " + ", ".join(["sitting on a wooden chair in a sunny garden"] * 18) + ", [blurry]"
NEGATIVE = "lowres, (bad anatomy:1.2)"


@pytest.fixture(scope="module")
def pipe(tiny_diffusers_dir):
    return Pipeline.load(tiny_diffusers_dir, backend="torch", device="cpu", precision="fp32")


def test_weighted_three_chunk_prompt_image_equals_diffusers(pipe, tiny_diffusers_dir, monkeypatch):
    cond, uncond = encode_prompt_pair(pipe.components.text_encoder.encode, pipe.tokenizer, PROMPT, NEGATIVE)
    assert cond.shape == uncond.shape == (1, 3 * 77, 32)  # the negative padded with empty chunks
    by_text = {PROMPT: cond, NEGATIVE: uncond}
    monkeypatch.setattr(pipe, "encode_prompt", lambda text: by_text[text])
    ours = pipe(PROMPT, negative_prompt=NEGATIVE, seed=11, sampler="euler_a", steps=6, guidance_scale=5.0)

    reference = diffusers.StableDiffusionPipeline.from_pretrained(
        tiny_diffusers_dir, safety_checker=None, requires_safety_checker=False, local_files_only=True)
    reference.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(reference.scheduler.config)
    expected = reference(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=6,
                         guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(11),
                         output_type="latent").images.numpy()
    np.testing.assert_allclose(ours[0].latents, expected, atol=1e-4, rtol=0)
    # And the conditioning matters: the plain 77-token prompt gives another image.
    monkeypatch.undo()
    plain = pipe(PROMPT, negative_prompt=NEGATIVE, seed=11, sampler="euler_a", steps=6, guidance_scale=5.0)
    assert np.abs(plain[0].latents - expected).max() > 1e-2
