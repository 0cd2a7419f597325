"""Few-step generation: LCM (LCMScheduler's plan and step) with an LCM-LoRA merged into a tiny
model equals diffusers' LCMScheduler + load_lora_weights; SD-Turbo-style trailing timesteps at
guidance 0 equal diffusers' Euler a with trailing spacing."""

from __future__ import annotations

import numpy as np
import pytest

from coreml_sd import Pipeline
from coreml_sd.config import SchedulerConfig
from coreml_sd.errors import InputError
from coreml_sd.schedules import alphas_cumprod, lcm_plan, make_plan

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")  # diffusers' load_lora_weights needs it

SD15 = SchedulerConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False)


@pytest.mark.parametrize("steps", [1, 2, 4, 6, 8, 25, 50])
def test_lcm_plan_is_lcm_schedulers(steps):
    reference = diffusers.LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    reference.set_timesteps(steps)
    plan = make_plan(SD15, "lcm", steps)
    assert plan == lcm_plan(SD15, steps) and plan.init_noise_sigma == reference.init_noise_sigma == 1.0
    assert list(plan.timesteps) == reference.timesteps.tolist()
    a = alphas_cumprod(SD15)
    expected = [float(np.float32(np.sqrt((1 - a[t]) / a[t]))) for t in reference.timesteps.tolist()] + [0.0]
    np.testing.assert_allclose(plan.sigmas, expected, rtol=1e-6)
    if steps == 4:
        assert plan.timesteps == (999.0, 759.0, 499.0, 259.0)


def test_lcm_plan_limits_and_a1111_plans_keep_a1111s_lcm():
    with pytest.raises(InputError, match="LCM samples at most 50 steps"):
        make_plan(SD15, "lcm", 51)
    a1111 = make_plan(SD15, "lcm", 4, a1111=True)
    assert a1111.convention == "a1111" and make_plan(SD15, "lcm", 4, "karras").convention == "a1111"


def _write_lora(path, text_encoder, unet, layout: str):
    """A LoRA over every attention Linear and resnet/attention conv (LCM-LoRA's coverage) in
    kohya's layout (with alpha) or diffusers' PEFT layout (unet./text_encoder. lora_A/lora_B)."""
    from helpers_checkpoint import kohya_lora
    from safetensors.torch import save_file

    sd = kohya_lora(text_encoder, unet, seed=7, rank=4, alpha=2.0 if layout == "kohya" else None)
    if layout == "diffusers":
        names = {"lora_unet_" + n.replace(".", "_"): "unet." + n for n, _ in unet.named_modules() if n}
        names.update({"lora_te_" + ("text_model." + n).replace(".", "_"): "text_encoder.text_model." + n
                      for n, _ in text_encoder.named_modules() if n})
        renamed = {}
        for key, value in sd.items():
            base, suffix = key.split(".", 1)
            renamed[names[base] + {"lora_down.weight": ".lora_A.weight", "lora_up.weight": ".lora_B.weight"}[suffix]] = value
        sd = renamed
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def _diffusers_pipe(folder):
    return diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                              local_files_only=True)


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_lcm_lora_equals_diffusers_lcm_scheduler_with_load_lora_weights(tiny_diffusers_dir, tmp_path, layout):
    reference = _diffusers_pipe(tiny_diffusers_dir)
    lora = _write_lora(tmp_path / f"lcm-{layout}.safetensors", reference.text_encoder, reference.unet, layout)
    reference.load_lora_weights(str(lora))
    reference.scheduler = diffusers.LCMScheduler.from_config(reference.scheduler.config)
    gens = [torch.Generator("cpu").manual_seed(s) for s in (21, 22)]
    kwargs = dict(num_inference_steps=4, guidance_scale=1.5)
    expected = reference(["a red cat"] * 2, negative_prompt=["blurry"] * 2, generator=gens, output_type="latent",
                         **kwargs).images.numpy()

    pipe = Pipeline.load(tiny_diffusers_dir, backend="torch", device="cpu", precision="fp32", loras=[(lora, 1.0)])
    got = np.concatenate([r.latents for r in pipe("a red cat", negative_prompt="blurry", seed=21, num_images=2,
                                                  sampler="lcm", steps=4, guidance_scale=1.5)])
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    plain = Pipeline.load(tiny_diffusers_dir, backend="torch", device="cpu", precision="fp32")
    without = plain("a red cat", negative_prompt="blurry", seed=21, sampler="lcm", steps=4, guidance_scale=1.5)[0]
    assert np.abs(without.latents - expected[:1]).max() > 1e-2, "the LoRA changed the image"


@pytest.mark.parametrize("steps", [1, 4])
def test_turbo_style_trailing_steps_without_guidance_equal_diffusers(tiny_diffusers_dir, steps):
    """SD-Turbo's recipe: Euler a over trailing timesteps (the first step at t = 999), guidance 0."""
    reference = _diffusers_pipe(tiny_diffusers_dir)
    reference.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(reference.scheduler.config,
                                                                               timestep_spacing="trailing")
    expected = reference("a red cat", generator=torch.Generator("cpu").manual_seed(5), output_type="latent",
                         num_inference_steps=steps, guidance_scale=0.0).images.numpy()
    pipe = Pipeline.load(tiny_diffusers_dir, backend="torch", device="cpu", precision="fp32")
    got = pipe("a red cat", seed=5, sampler="euler_a", steps=steps, guidance_scale=0.0,
               timestep_spacing="trailing")[0]
    np.testing.assert_allclose(got.latents, expected, atol=1e-4, rtol=0)
    assert got.params.extras["Timestep spacing"] == "trailing"
    leading = pipe("a red cat", seed=5, sampler="euler_a", steps=steps, guidance_scale=0.0)[0]
    assert np.abs(leading.latents - expected).max() > 1e-3, "the spacing changed the plan"


@pytest.mark.parametrize("recipe", ["lcm", "turbo"])
def test_few_step_recipes_run_on_converted_packages(tmp_path_factory, recipe):
    """On the mil backend (a converted batch-2 UNet, one image without guidance: the batch is filled
    up) the few-step recipes give the torch backend's image to fp16 precision."""
    from helpers_runtime import shared_tiny_model

    from coreml_sd.metrics import psnr

    source, converted = shared_tiny_model(tmp_path_factory)
    kwargs = (dict(sampler="lcm", steps=4, guidance_scale=1.0) if recipe == "lcm" else
              dict(sampler="euler_a", steps=2, guidance_scale=0.0, timestep_spacing="trailing"))
    torch_image = Pipeline.load(source, backend="torch", device="cpu", precision="fp32")("a red cat", seed=9, **kwargs)[0]
    mil = Pipeline.load(converted, backend="mil", device="cpu", precision="fp32")
    assert set(mil.components.backends.values()) == {"mil"}
    mil_image = mil("a red cat", seed=9, **kwargs)[0]
    assert psnr(torch_image.latents, mil_image.latents) >= 40
