"""The whole runtime pipeline (tokenizer, text encoder, sampler, VAE) against diffusers' own."""

import numpy as np
import pytest

from coreml_sd import Pipeline
from coreml_sd.errors import InputError
from coreml_sd.pipeline import GeneratedImage, Progress

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SCHEDULERS = {
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}


@pytest.fixture(scope="module")
def pipe(tiny_diffusers_dir):
    return Pipeline.load(tiny_diffusers_dir, backend="torch", device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def reference(tiny_diffusers_dir):
    return diffusers.StableDiffusionPipeline.from_pretrained(
        tiny_diffusers_dir, safety_checker=None, requires_safety_checker=False, local_files_only=True)


@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_images_equal_diffusers_pipeline(pipe, reference, sampler, batch_size):
    name, extra = SCHEDULERS[sampler]
    reference.scheduler = getattr(diffusers, name).from_config(reference.scheduler.config, **extra)
    kwargs = dict(negative_prompt="blurry", num_inference_steps=6, guidance_scale=5.0)
    gens = [torch.Generator("cpu").manual_seed(s) for s in (11, 12)]
    expected = reference(["a red cat"] * 2, generator=gens, output_type="latent",
                         **{**kwargs, "negative_prompt": ["blurry"] * 2}).images.numpy()
    ours = pipe("a red cat", seed=11, num_images=2, sampler=sampler, steps=6, guidance_scale=5.0,
                negative_prompt="blurry", batch_size=batch_size)
    got = np.concatenate([r.latents for r in ours])
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    # Decoded images too (diffusers' image processor rounding is the same as ours).
    with torch.no_grad():
        decoded = reference.vae.decode(torch.from_numpy(expected) / reference.vae.config.scaling_factor).sample
    ref_pixels = ((decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round()
    our_pixels = np.stack([np.asarray(r.image, dtype=np.float64) for r in ours])
    assert np.abs(our_pixels - ref_pixels).max() <= 1


def test_image_i_of_a_batch_equals_seed_plus_i_alone(pipe):
    batch = pipe("a dog", seed=100, num_images=3, steps=4)
    alone = pipe("a dog", seed=102, num_images=1, steps=4)
    assert [r.seed for r in batch] == [100, 101, 102]
    np.testing.assert_array_equal(batch[2].latents, alone[0].latents)
    assert not np.allclose(batch[0].latents, batch[1].latents)


def test_same_seed_same_image(pipe):
    a = pipe("a house", seed=5, steps=3)[0]
    b = pipe("a house", seed=5, steps=3)[0]
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_generate_yields_progress_then_images(pipe):
    events = list(pipe.generate("x", seed=1, num_images=2, steps=3))
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["Progress"] * 3 + ["GeneratedImage"] + ["Progress"] * 3 + ["GeneratedImage"]
    assert [e.step for e in events if isinstance(e, Progress)] == [1, 2, 3, 1, 2, 3]
    image = events[-1]
    assert isinstance(image, GeneratedImage) and image.image.size == (16, 16)
    assert image.params.sampler == "Euler a" and image.params.extras["Backend"] == "torch cpu fp32"


def test_a_prompt_per_image_in_one_batch_equals_each_alone(pipe):
    prompts, negatives = ["a dog", "a cat", "a dog"], ["", "blurry", "blurry"]
    events = list(pipe.generate(prompts, negative_prompt=negatives, seed=40, batch_size=3, steps=4,
                                sampler="euler_a"))
    progress = [e for e in events if isinstance(e, Progress)]
    assert [(e.image_index, e.batch, e.step) for e in progress] == [(0, 3, 1), (0, 3, 2), (0, 3, 3), (0, 3, 4)]
    batched = [e for e in events if isinstance(e, GeneratedImage)]
    assert [(r.index, r.seed, r.params.prompt, r.params.negative_prompt) for r in batched] == [
        (0, 40, "a dog", ""), (1, 41, "a cat", "blurry"), (2, 42, "a dog", "blurry")]
    for r in batched:
        (alone,) = pipe(r.params.prompt, negative_prompt=r.params.negative_prompt, seed=r.seed, steps=4,
                        sampler="euler_a")
        # Equal to the rounding a batch of 3 may change in the UNet's kernels.
        np.testing.assert_allclose(r.latents, alone.latents, atol=1e-4, rtol=0)
    assert not np.allclose(batched[0].latents, batched[2].latents)  # same prompt, other seed and negative


@pytest.mark.parametrize("kwargs, needle", [
    ({"batch_size": 0}, "batch_size"),
    ({"prompt": ["a", "b"], "num_images": 3}, "list of 3 texts"),
    ({"negative_prompt": ["a", "b"], "num_images": 3}, "negative_prompt must be one text or a list of 3"),
    ({"prompt": ["a", "b"], "negative_prompt": ["a", "b", "c"]}, "negative_prompt must be one text or a list of 2"),
    ({"sampler": "DPM++ 4M"}, "valid samplers"),
    ({"schedule": "cosine"}, "valid schedules"),
    ({"width": 20}, "multiple of 8"),
    ({"steps": 0}, "steps"),
    ({"num_images": 0}, "num_images"),
    ({"seed": -1}, "seed"),
])
def test_bad_requests_raise_input_error(pipe, kwargs, needle):
    kwargs = {"prompt": "x", **kwargs}
    with pytest.raises(InputError, match=needle):
        next(iter(pipe.generate(kwargs.pop("prompt"), **kwargs)))
