"""Samplers, schedules and the guided denoiser against diffusers' schedulers on the same model.

Parity tests run the tiny SD1-architecture model twice with the same text embeddings: through
diffusers' StableDiffusionPipeline with the matching scheduler (torch.Generator noise) and through
our plan + sampler + denoiser (NoiseSource noise), and compare the final latents in fp32.

Tolerance, in float32 ulps of the latents' scale (max |latents|), so it holds on any CPU whatever
its rounding (AVX-512 and AVX2 kernels sum in other orders): the final latents agree within
TOL_ULPS = 40 ulps (measured worst 18 on an AVX-512 Xeon, 25 with oneDNN limited to AVX2:
DPM++ 2M Karras in 2 steps). The tiny model's random weights make latents of magnitude ~40-60 and
amplify input rounding, and part of the budget is NoiseSource, which equals torch's noise only to
one float32 ulp (in ~18% of elements): the same runs fed torch's own noise differ by float32
arithmetic order alone, a few ulps per step (test_parity_with_torch_noise_is_tighter: 6 per step).
"""

from __future__ import annotations

import inspect
import math
import subprocess
import sys

import numpy as np
import pytest

from coreml_sd.conditioning import Conditioning
from coreml_sd.config import SchedulerConfig
from coreml_sd.denoiser import Denoiser
from coreml_sd.errors import InputError
from coreml_sd.rng import NoiseSource
from coreml_sd.samplers import SAMPLERS, noise_from_sources, sample
from coreml_sd.schedules import DIFFUSERS_SCHEDULES, SCHEDULES, make_plan, spaced_timesteps

EPS32 = 2.0**-23  # float32 machine epsilon (relative spacing of floats)
TOL_ULPS = 40
# The schedule the golden values and fixed-grid tests were written for (spacing set explicitly).
LEADING = dict(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)

REQUIRED = ("euler_a", "euler", "ddim", "dpmpp_2m")
EXTRA = ("heun", "lms", "dpmpp_2m_sde")
# DPM++ 2M SDE's diffusers coefficients (1 - exp(-2h) in float32) lose precision in proportion to
# 1/h; with this model's latents of up to ~70 that alone reaches 8.4e-5 (torch's own noise too).
EXTRA_ULPS = {"heun": TOL_ULPS, "lms": TOL_ULPS, "dpmpp_2m_sde": 2 * TOL_ULPS}
# Every (sampler, schedule) diffusers can run: "default" and "karras" keep diffusers' meaning for
# these samplers (the other schedules are A1111's: tests/test_samplers_kdiffusion.py). DDIMScheduler
# has no Karras option: DDIM with Karras sigmas is checked against a direct computation instead
# (test_ddim_karras_*).
WITH_DIFFUSERS = [(s, k) for s in REQUIRED for k in DIFFUSERS_SCHEDULES if (s, k) != ("ddim", "karras")]


# --- plans: sigmas, timesteps and initial noise scale equal diffusers' set_timesteps -------------

# Every key given: where a key is absent diffusers' scheduler classes differ in their defaults.
PLAN_CONFIGS = [
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, set_alpha_to_one=False),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=0, set_alpha_to_one=False),
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, steps_offset=1, set_alpha_to_one=True),
]


@pytest.mark.parametrize("sampler,schedule", WITH_DIFFUSERS)
def test_plan_matches_diffusers_set_timesteps(sampler, schedule):
    pytest.importorskip("diffusers")
    from helpers_samplers import diffusers_scheduler

    for base in PLAN_CONFIGS:
        for spacing in ("leading", "linspace", "trailing"):
            cfg = dict(base, timestep_spacing=spacing, num_train_timesteps=1000, prediction_type="epsilon")
            for steps in (1, 2, 3, 7, 10, 25, 50, 200):
                ref = diffusers_scheduler(sampler, schedule, cfg)
                ref.set_timesteps(steps)
                plan = make_plan(SchedulerConfig.from_dict(cfg), sampler, steps, schedule)
                where = f"{sampler}/{schedule} {cfg} steps={steps}"
                assert plan.steps == steps == len(ref.timesteps), where
                # Timesteps: exact, but for interpolated Karras ones (one float32 ulp at ~1000).
                np.testing.assert_allclose(plan.timesteps, ref.timesteps.numpy(), rtol=0, atol=1.3e-4, err_msg=where)
                if sampler == "ddim":
                    _check_ddim_plan(plan, ref, where)
                    continue
                np.testing.assert_allclose(plan.sigmas, ref.sigmas.numpy(), rtol=3e-7, atol=0, err_msg=where)
                assert plan.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=3e-7), where
                assert plan.targets is None


def _check_ddim_plan(plan, ref, where):
    """DDIM keeps alphas, not sigmas: each step's alpha and the alpha it lands on (prev_timestep)."""
    a = ref.alphas_cumprod.numpy().astype(np.float64)
    t = ref.timesteps.numpy()
    prev = t - ref.config.num_train_timesteps // ref.num_inference_steps
    a_to = np.where(prev >= 0, a[np.maximum(prev, 0)], float(ref.final_alpha_cumprod))
    np.testing.assert_allclose(1 / (np.square(plan.sigmas[:-1]) + 1), a[t], rtol=3e-7, err_msg=where)
    targets = plan.targets if plan.targets is not None else plan.sigmas[1:]
    np.testing.assert_allclose(1 / (np.square(targets) + 1), a_to, rtol=3e-7, err_msg=where)
    assert plan.init_noise_sigma == ref.init_noise_sigma == 1.0
    # Landing targets exist exactly where diffusers lands between two of its timesteps.
    lands_between = bool(np.any(prev[:-1] != t[1:]))
    assert (plan.targets is not None) == lands_between, where


def _published_sd15():
    """SD 1.5's scheduler_config.json as published: it has no timestep_spacing key."""
    from tiny_models import SD15_SCHEDULER

    assert "timestep_spacing" not in SD15_SCHEDULER
    return dict(SD15_SCHEDULER)


def _diffusers_timesteps_for_published_sd15(sampler, steps):
    from diffusers import PNDMScheduler

    from helpers_samplers import diffusers_scheduler

    # What users write: SomeScheduler.from_config(pipe.scheduler.config) on the PNDM original.
    ref = diffusers_scheduler(sampler, "default", PNDMScheduler.from_config(_published_sd15()).config)
    ref.set_timesteps(steps)
    return ref.timesteps.numpy().tolist()


@pytest.mark.parametrize("sampler", REQUIRED)
def test_unset_keys_take_each_diffusers_schedulers_default(sampler):
    pytest.importorskip("diffusers")
    config = SchedulerConfig.from_dict(_published_sd15())
    object.__setattr__(config, "timestep_spacing", None)  # "absent", as config.py should keep it
    plan = make_plan(config, sampler, 25)
    assert list(plan.timesteps) == _diffusers_timesteps_for_published_sd15(sampler, 25)
    assert plan.config.timestep_spacing == ("leading" if sampler == "ddim" else "linspace")


@pytest.mark.parametrize("sampler", ["euler_a", "euler", "dpmpp_2m"])
def test_published_sd15_config_gives_diffusers_timesteps(sampler):
    pytest.importorskip("diffusers")
    plan = make_plan(SchedulerConfig.from_dict(_published_sd15()), sampler, 25)
    assert list(plan.timesteps) == _diffusers_timesteps_for_published_sd15(sampler, 25)


def test_ddim_landing_targets_appear_only_off_the_leading_grid():
    cfg = SchedulerConfig(**LEADING)  # leading spacing, offset 1
    assert make_plan(cfg, "ddim", 25).targets is None
    assert make_plan(cfg, "ddim", 7).targets is None
    trailing = make_plan(SchedulerConfig(timestep_spacing="trailing"), "ddim", 7)
    assert trailing.targets is not None and trailing.targets != trailing.sigmas[1:]


def test_trailing_spacing_gives_exactly_the_requested_steps():
    # np.arange(1000, 0, -1000 / 61) has 62 entries (the last rounds to timestep -1) in diffusers.
    cfg = SchedulerConfig(timestep_spacing="trailing")
    for steps in (61, 103, 121):
        for style in ("euler", "ddim", "dpm"):
            t = spaced_timesteps(cfg, steps, style)
            assert len(t) == steps and t.min() >= 0 and t.max() == 999


# --- full generations: final latents equal diffusers' ------------------------------------------------

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sd(tiny_diffusers_dir):
    pytest.importorskip("diffusers")
    from helpers_samplers import load_tiny_sd

    return load_tiny_sd(tiny_diffusers_dir)


@pytest.fixture(scope="module")
def sd_v(tiny_vpred_dir):
    pytest.importorskip("diffusers")
    from helpers_samplers import load_tiny_sd

    return load_tiny_sd(tiny_vpred_dir)


def _assert_close(ours, ref, tol=None, what="", ulps=TOL_ULPS):
    """Within `tol`, or by default `ulps` float32 ulps of the reference's scale."""
    diff = float(np.abs(np.asarray(ours) - np.asarray(ref)).max())
    tol = tol if tol is not None else ulps * EPS32 * float(np.abs(np.asarray(ref)).max())
    assert ours.shape == ref.shape, what
    assert diff <= tol, f"{what}: max |difference| = {diff:.3g} > {tol:g} (|latents| up to {np.abs(ref).max():.3g})"
    return diff


@pytest.mark.parametrize("steps", [1, 2, 7, 25])
@pytest.mark.parametrize("sampler,schedule", WITH_DIFFUSERS)
def test_parity_with_diffusers(sd, sampler, schedule, steps):
    from helpers_samplers import diffusers_scheduler, run_diffusers, run_ours

    ref = run_diffusers(sd, diffusers_scheduler(sampler, schedule, sd.config_dict), steps)
    ours = run_ours(sd, sampler, steps, schedule)
    _assert_close(ours, ref, what=f"{sampler}/{schedule}/{steps} steps")


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("sampler,schedule", WITH_DIFFUSERS)
def test_parity_other_timestep_spacings(sd, sampler, schedule, spacing):
    from helpers_samplers import diffusers_scheduler, run_diffusers, run_ours

    steps = 7  # does not divide 1000: DDIM lands between timesteps, Euler interpolates sigmas
    config_dict = dict(sd.config_dict, timestep_spacing=spacing)
    ref = run_diffusers(sd, diffusers_scheduler(sampler, schedule, config_dict), steps)
    ours = run_ours(sd, sampler, steps, schedule, config=sd.config(timestep_spacing=spacing))
    _assert_close(ours, ref, what=f"{sampler}/{schedule}/{spacing}")


@pytest.mark.parametrize("sampler,schedule,spacing,steps", [
    (sampler, schedule, spacing, 7) for sampler in EXTRA for schedule in DIFFUSERS_SCHEDULES for spacing in ("leading", "trailing")
] + [(sampler, "default", "leading", 25) for sampler in EXTRA])
def test_parity_extra_samplers(sd, sampler, schedule, spacing, steps):
    from helpers_samplers import diffusers_scheduler, run_diffusers, run_ours

    config_dict = dict(sd.config_dict, timestep_spacing=spacing)
    ref = run_diffusers(sd, diffusers_scheduler(sampler, schedule, config_dict), steps)
    ours = run_ours(sd, sampler, steps, schedule, config=sd.config(timestep_spacing=spacing))
    _assert_close(ours, ref, ulps=EXTRA_ULPS[sampler], what=f"{sampler}/{schedule}/{spacing}/{steps}")


@pytest.mark.parametrize("sampler,schedule", WITH_DIFFUSERS + [(s, "default") for s in EXTRA])
def test_parity_v_prediction(sd_v, sampler, schedule):
    from helpers_samplers import diffusers_scheduler, run_diffusers, run_ours

    assert sd_v.config().prediction_type == "v_prediction"
    ref = run_diffusers(sd_v, diffusers_scheduler(sampler, schedule, sd_v.config_dict), 7)
    ours = run_ours(sd_v, sampler, 7, schedule)
    _assert_close(ours, ref, ulps=EXTRA_ULPS.get(sampler, TOL_ULPS), what=f"v-prediction {sampler}/{schedule}")


@pytest.mark.parametrize("sampler", REQUIRED)
def test_guidance_one_runs_the_conditional_pass_only(sd, sampler):
    from helpers_samplers import TorchUNet, diffusers_scheduler, run_diffusers, run_ours

    unet = TorchUNet(sd.pipe.unet)
    ref = run_diffusers(sd, diffusers_scheduler(sampler, "default", sd.config_dict), 7, guidance_scale=1.0)
    ours = run_ours(sd, sampler, 7, guidance_scale=1.0, unet=unet)  # no unconditional embeddings given
    _assert_close(ours, ref, what=f"{sampler} guidance 1")
    assert unet.batches == [1] * 7


@pytest.mark.parametrize("sampler,schedule", [("euler_a", "default"), ("dpmpp_2m", "karras"), ("ddim", "default")])
def test_unet_of_batch_one_gives_the_same_latents(sd, sampler, schedule):
    from helpers_samplers import FixedBatchRunner, diffusers_scheduler, run_diffusers, run_ours

    from coreml_sd.backends.packages import PackageUNet

    # A package of batch 1 behind the adapters, which split the guidance pair at that boundary.
    runner = FixedBatchRunner(sd.pipe.unet, 1, sd.latent_shape[1:], tuple(sd.cond.shape[1:]))
    ours_single = run_ours(sd, sampler, 7, schedule, unet=PackageUNet(runner))
    assert runner.batches == [1] * 14  # unconditional and conditional: two calls per step
    ours_pair = run_ours(sd, sampler, 7, schedule)
    # Convolutions round differently at another batch size; the sampler amplifies that a little.
    _assert_close(ours_single, ours_pair, what="batch 1 vs batch 2")
    ref = run_diffusers(sd, diffusers_scheduler(sampler, schedule, sd.config_dict), 7)
    _assert_close(ours_single, ref, what=f"{sampler} batch-1 UNet")


@pytest.mark.parametrize("sampler,schedule", [("euler_a", "default"), ("euler", "karras"),
                                              ("dpmpp_2m", "karras"), ("ddim", "default")])
def test_numpy_and_torch_arrays_give_the_same_latents(sd, sampler, schedule):
    from helpers_samplers import run_ours

    config = sd.config(timestep_spacing="trailing")  # DDIM with landing targets
    with_numpy = run_ours(sd, sampler, 7, schedule, kind="numpy", config=config)
    with_torch = run_ours(sd, sampler, 7, schedule, kind="torch", config=config)
    assert isinstance(with_numpy, np.ndarray) and with_numpy.dtype == np.float32
    _assert_close(with_numpy, with_torch, tol=2e-5, what="numpy vs torch")


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m", "dpmpp_2m_sde"])
def test_several_images_each_equal_diffusers_and_reproducible_alone(sd, sampler):
    from helpers_samplers import diffusers_scheduler, run_diffusers, run_ours

    ref = run_diffusers(sd, diffusers_scheduler(sampler, "default", sd.config_dict), 7, seed=42, num_images=3)
    ours = run_ours(sd, sampler, 7, seed=42, num_images=3)
    for i in range(3):
        _assert_close(ours[i], ref[i], ulps=EXTRA_ULPS.get(sampler, TOL_ULPS), what=f"image {i}")
    alone = run_ours(sd, sampler, 7, seed=43)  # image 1 of the batch, generated by itself
    # The UNet's convolutions round differently at batch 2 and 6: equal within the same budget.
    _assert_close(alone[0], ours[1], what="image 1 alone vs in a batch")
    assert np.abs(ours[0] - ours[1]).max() > 1.0  # different seeds, different images


def test_parity_with_torch_noise_is_tighter(sd):
    """Fed torch's own noise, the samplers' remaining difference is float32 arithmetic order only."""
    import torch

    from helpers_samplers import diffusers_scheduler, run_diffusers, run_ours

    # A few float32 ulps of the latents' scale per step: measured worst 2.4 per step (euler_a,
    # 7 steps, oneDNN limited to AVX2), against the 40 ulps the seeded-noise runs need.
    for spacing, sampler, schedule, steps in [
        ("trailing", "euler", "default", 1), ("trailing", "euler_a", "default", 2),
        ("trailing", "ddim", "default", 1), ("linspace", "dpmpp_2m", "karras", 1),
        ("leading", "euler_a", "karras", 7), ("leading", "dpmpp_2m", "default", 25),
    ]:
        generator = torch.Generator("cpu").manual_seed(42)
        ref = run_diffusers(sd, diffusers_scheduler(sampler, schedule, dict(sd.config_dict, timestep_spacing=spacing)),
                            steps)
        ours = run_ours(sd, sampler, steps, schedule, config=sd.config(timestep_spacing=spacing),
                        noise_fn=lambda shape, g=generator: torch.randn(tuple(shape), generator=g))
        _assert_close(ours, ref, ulps=6 * steps, what=f"torch noise {spacing} {sampler}/{schedule}/{steps}")


# --- DDIM with Karras sigmas: no diffusers scheduler, so a direct computation ---------------------

@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_karras_equals_direct_ddim_formula(sd, spacing):
    """DDIMScheduler's own update (eps straight from the model) over alphas = 1 / (sigma**2 + 1)."""
    import torch

    from helpers_samplers import run_ours

    config = sd.config(timestep_spacing=spacing)
    plan = make_plan(config, "ddim", 7, "karras")
    assert plan.init_noise_sigma == 1.0 and plan.targets is None and plan.sigmas[-1] == 0.0
    x = torch.from_numpy(NoiseSource(42).randn(sd.latent_shape))
    embeddings = torch.cat([sd.uncond, sd.cond])
    alphas = [1.0 / (s * s + 1.0) for s in plan.sigmas]
    with torch.no_grad():
        for i, t in enumerate(plan.timesteps):
            out = sd.pipe.unet(torch.cat([x, x]), torch.tensor([t, t]), encoder_hidden_states=embeddings).sample
            uncond, cond = out.chunk(2)
            eps = uncond + 7.5 * (cond - uncond)
            x0 = (x - (1 - alphas[i]) ** 0.5 * eps) / alphas[i] ** 0.5
            x = alphas[i + 1] ** 0.5 * x0 + (1 - alphas[i + 1]) ** 0.5 * eps
    _assert_close(run_ours(sd, "ddim", 7, "karras", config=config), x.numpy(), what=f"DDIM Karras {spacing}")


def test_ddim_karras_is_euler_karras_in_sigma_space(sd):
    """DDIM (eta=0) is Euler in sigma space: with leading spacing both start from unit noise in
    model scale, so DDIM over Karras sigmas must equal diffusers' EulerDiscreteScheduler Karras."""
    from helpers_samplers import diffusers_scheduler, run_diffusers, run_ours

    euler = diffusers_scheduler("euler", "karras", sd.config_dict)
    ref = run_diffusers(sd, euler, 7)
    ddim_plan = make_plan(sd.config(), "ddim", 7, "karras")
    np.testing.assert_allclose(ddim_plan.sigmas, euler.sigmas.numpy(), rtol=3e-7)
    _assert_close(run_ours(sd, "ddim", 7, "karras"), ref, what="DDIM Karras vs Euler Karras")


# --- golden values: full loops with a dummy model, numpy only (no torch needed) ---------------------

class DummyUNet:
    """A deterministic stand-in for the UNet contract: depends on sample, timestep and text, numpy only."""

    batch_size = None

    def predict(self, sample, timestep, cond):
        t = np.asarray(timestep, dtype=np.float32).reshape(-1, 1, 1, 1) / np.float32(1000)
        text = np.asarray(cond.context).mean(axis=(1, 2)).reshape(-1, 1, 1, 1)
        out = np.asarray(sample) * (np.float32(0.9) - np.float32(0.3) * t) + np.float32(0.1) * text
        return out.astype(np.float32)


GOLDEN_SHAPE = (1, 4, 8, 8)
GOLDEN_COND = np.full((1, 77, 8), 0.5, np.float32)
GOLDEN_UNCOND = np.zeros((1, 77, 8), np.float32)
# (sampler, schedule, prediction_type) -> (sum of |x|, mean of x, x[0, 0, 0, :3]) after 10 steps
# from seed 0 at guidance 7.5 on SD 1.5's schedule: diffusers 0.42.1's scheduler loops with
# DummyUNet, as `_golden_from_diffusers` recomputes them (test_golden_values_are_diffusers').
GOLDEN = {
    ('euler_a', 'default', 'epsilon'): (224.1130711, -0.8003496952, [-1.85519087, -1.16958082, -0.880025148]),
    ('euler_a', 'karras', 'epsilon'): (220.6380523, -0.8001513309, [-1.82171977, -1.17378223, -0.974487662]),
    ('euler', 'default', 'epsilon'): (282.6621596, -0.9042566652, [-2.15987659, -2.18879294, -1.20554149]),
    ('euler', 'karras', 'epsilon'): (291.5747448, -0.9350812027, [-2.22674727, -2.25649476, -1.2450155]),
    ('ddim', 'default', 'epsilon'): (288.3821737, -0.9171307532, [-2.2063942, -2.23608494, -1.22648835]),
    ('dpmpp_2m', 'default', 'epsilon'): (253.0680432, -0.7944556431, [-1.9404341, -1.96682501, -1.06943202]),
    ('dpmpp_2m', 'karras', 'epsilon'): (291.0287269, -0.9066829717, [-2.23417163, -2.26474285, -1.22521293]),
    ('euler_a', 'default', 'v_prediction'): (94.62289222, -0.328019472, [-0.689932525, -0.256352007, -0.260053515]),
    ('euler', 'default', 'v_prediction'): (83.09642399, -0.3009925786, [-0.592644155, -0.599360883, -0.370974094]),
    ('ddim', 'default', 'v_prediction'): (82.99707564, -0.2980763277, [-0.597914577, -0.604819655, -0.370022178]),
    ('dpmpp_2m', 'default', 'v_prediction'): (85.31808831, -0.2974731111, [-0.629907966, -0.637563705, -0.377240539]),
    ('dpmpp_2m', 'karras', 'v_prediction'): (94.28883011, -0.3079453332, [-0.716656446, -0.726068795, -0.406015188]),
    ('heun', 'default', 'epsilon'): (251.1924679, -0.7740710317, [-1.93145001, -1.95810378, -1.05178368]),
    ('lms', 'default', 'epsilon'): (268.7061642, -0.8374759966, [-2.06267548, -2.09089112, -1.13146138]),
    ('dpmpp_2m_sde', 'default', 'epsilon'): (203.2861439, -0.6873967105, [-1.58703351, -0.824307084, -0.780682981]),
    ('dpmpp_2m_sde', 'karras', 'epsilon'): (169.7954752, -0.4936575172, [-1.45033503, -0.209897146, -0.566021025]),
}


def _ours_golden(sampler, schedule, prediction_type):
    config = SchedulerConfig(**LEADING, prediction_type=prediction_type)
    plan = make_plan(config, sampler, 10, schedule)
    denoiser = Denoiser(DummyUNet(), plan, prediction_type=prediction_type, cond=GOLDEN_COND,
                        uncond=GOLDEN_UNCOND, guidance_scale=7.5)
    source = NoiseSource(0)
    x = source.randn(GOLDEN_SHAPE) * plan.init_noise_sigma
    for x in sample(sampler, denoiser, x, plan, source.randn):
        assert isinstance(x, np.ndarray) and x.dtype == np.float32
    return x


def _golden_summary(x):
    x = np.asarray(x, dtype=np.float64)
    return (float(np.abs(x).sum()), float(x.mean()), [float(v) for v in x[0, 0, 0, :3]])


@pytest.mark.parametrize("key", sorted(GOLDEN))
def test_golden_values(key):
    got_sum, got_mean, got_first = _golden_summary(_ours_golden(*key))
    want_sum, want_mean, want_first = GOLDEN[key]
    assert got_sum == pytest.approx(want_sum, rel=1e-5)
    assert got_mean == pytest.approx(want_mean, rel=1e-4, abs=1e-6)
    np.testing.assert_allclose(got_first, want_first, rtol=1e-5, atol=1e-6)


def _golden_from_diffusers(sampler, schedule, prediction_type):
    """The same loop through diffusers' scheduler, as StableDiffusionPipeline drives it."""
    import torch

    from helpers_samplers import diffusers_scheduler
    from tiny_models import SD15_SCHEDULER

    config = {k: v for k, v in SD15_SCHEDULER.items() if k != "_class_name"}
    config.update(prediction_type=prediction_type, timestep_spacing="leading")
    scheduler = diffusers_scheduler(sampler, schedule, config)
    scheduler.set_timesteps(10)
    generator = torch.Generator("cpu").manual_seed(0)
    x = torch.randn(GOLDEN_SHAPE, generator=generator) * scheduler.init_noise_sigma
    embeddings = np.concatenate([GOLDEN_UNCOND, GOLDEN_COND])
    # As the pipeline: the generator goes to step() only where the scheduler takes one.
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([x, x]), t)
        out = DummyUNet().predict(model_in.numpy(), np.full(2, float(t), np.float32), Conditioning(embeddings))
        uncond, cond = torch.from_numpy(out).chunk(2)
        x = scheduler.step(uncond + 7.5 * (cond - uncond), t, x, **extra).prev_sample
    return x.numpy()


@pytest.mark.parametrize("key", sorted(GOLDEN))
def test_golden_values_are_diffusers(key):
    pytest.importorskip("diffusers")
    got_sum, got_mean, got_first = _golden_summary(_golden_from_diffusers(*key))
    want_sum, want_mean, want_first = GOLDEN[key]
    assert got_sum == pytest.approx(want_sum, rel=1e-5)
    assert got_mean == pytest.approx(want_mean, rel=1e-4, abs=1e-6)
    np.testing.assert_allclose(got_first, want_first, rtol=1e-5, atol=1e-6)


# --- the contract: names, errors, laziness ----------------------------------------------------------

def test_registry_names_and_display_names():
    assert set(REQUIRED) <= set(SAMPLERS)
    assert {n: SAMPLERS[n].display_name for n in REQUIRED} == {
        "euler_a": "Euler a", "euler": "Euler", "ddim": "DDIM", "dpmpp_2m": "DPM++ 2M"}
    # The seven with a diffusers scheduler come first; AUTOMATIC1111's others after them.
    assert list(SAMPLERS)[:7] == list(REQUIRED + EXTRA)
    assert [n for n in SAMPLERS if SAMPLERS[n].plan_style] == list(REQUIRED + EXTRA) + ["lcm"]
    assert [n for n in REQUIRED + EXTRA if SAMPLERS[n].ancestral] == ["euler_a", "dpmpp_2m_sde"]
    assert DIFFUSERS_SCHEDULES == ("default", "karras") == SCHEDULES[:1] + SCHEDULES[3:4]


def test_bad_inputs_raise_errors_that_name_the_choices():
    cfg = SchedulerConfig(**LEADING)
    with pytest.raises(InputError, match="valid samplers: euler_a, euler, ddim, dpmpp_2m, heun, lms, dpmpp_2m_sde, "):
        make_plan(cfg, "k_lms", 10)
    with pytest.raises(InputError, match="valid schedules: default, automatic, uniform, karras, exponential"):
        make_plan(cfg, "euler", 10, "Exponential")
    for steps in (0, 1001, 2.5, True):
        with pytest.raises(InputError, match="steps must be an integer from 1 to 1000"):
            make_plan(cfg, "euler", steps)
    plan = make_plan(cfg, "euler_a", 3)
    denoiser = Denoiser(DummyUNet(), plan, prediction_type="epsilon", cond=GOLDEN_COND, uncond=GOLDEN_UNCOND)
    with pytest.raises(InputError, match="draws noise every step"):
        sample("euler_a", denoiser, np.zeros(GOLDEN_SHAPE, np.float32), plan)
    with pytest.raises(InputError, match="valid samplers"):
        sample("k_lms", denoiser, np.zeros(GOLDEN_SHAPE, np.float32), plan)
    ddim_plan = make_plan(SchedulerConfig(timestep_spacing="trailing"), "ddim", 7)
    with pytest.raises(InputError, match="made for DDIM"):
        sample("euler", denoiser, np.zeros(GOLDEN_SHAPE, np.float32), ddim_plan)
    with pytest.raises(InputError, match="needs the unconditional"):
        Denoiser(DummyUNet(), plan, prediction_type="epsilon", cond=GOLDEN_COND, guidance_scale=7.5)
    with pytest.raises(InputError, match="supported: epsilon, v_prediction"):
        Denoiser(DummyUNet(), plan, prediction_type="sample", cond=GOLDEN_COND, uncond=GOLDEN_UNCOND)
    with pytest.raises(InputError, match="2 noise sources"):
        noise_from_sources([NoiseSource(0), NoiseSource(1)], np.asarray)((3, 4, 8, 8))


class _Batch4Runner:
    """A batch-4 package runner over DummyUNet's arithmetic, recording the batches it is called with."""

    def __init__(self):
        from coreml_sd.components import TensorSpec

        self.name, self.batch_size, self.batches = "Unet-batch4", 4, []
        self.inputs = (TensorSpec("sample", (4, *GOLDEN_SHAPE[1:]), "fp32"), TensorSpec("timestep", (4,), "fp32"),
                       TensorSpec("encoder_hidden_states", (4, *GOLDEN_COND.shape[1:]), "fp32"))
        self.outputs = (TensorSpec("noise_pred", (4, *GOLDEN_SHAPE[1:]), "fp32"),)

    def native(self, value, dtype):
        return np.asarray(value, dtype=np.float32)

    def run(self, feeds):
        from coreml_sd.conditioning import Conditioning

        self.batches.append(len(feeds["sample"]))
        return {"noise_pred": DummyUNet().predict(feeds["sample"], feeds["timestep"],
                                                  Conditioning(feeds["encoder_hidden_states"]))}

    def describe(self):
        return "test runner"


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_fixed_batch_unet_fills_up_a_smaller_batch(guidance):
    """Two rows (guided) or one (guidance 1: LCM-LoRA, Turbo) on a batch-4 package: one call, filled
    up with copies of the last row, whose outputs are dropped; the same as the rows alone."""
    from coreml_sd.backends.packages import PackageUNet

    runner = _Batch4Runner()
    plan = make_plan(SchedulerConfig(**LEADING), "euler", 2)
    x = np.random.default_rng(0).standard_normal(GOLDEN_SHAPE).astype(np.float32)
    got, want = (Denoiser(unet, plan, prediction_type="epsilon", cond=GOLDEN_COND, uncond=GOLDEN_UNCOND,
                          guidance_scale=guidance)(x, plan.sigmas[0]) for unet in (PackageUNet(runner), DummyUNet()))
    np.testing.assert_array_equal(np.asarray(got), want)
    assert runner.batches == [4]


def test_off_plan_sigma_gets_an_interpolated_timestep():
    plan = make_plan(SchedulerConfig(**LEADING), "euler", 10)
    assert plan.timestep(plan.sigmas[3]) == plan.timesteps[3]
    between = math.sqrt(plan.sigmas[3] * plan.sigmas[4])
    assert plan.timesteps[4] < plan.timestep(between) < plan.timesteps[3]


def test_sampling_modules_do_not_import_torch():
    code = ("import sys, coreml_sd.samplers, coreml_sd.schedules, coreml_sd.denoiser; "
            "assert not {'torch', 'diffusers', 'coremltools'} & set(sys.modules), 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True)
