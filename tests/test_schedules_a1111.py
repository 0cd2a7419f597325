"""AUTOMATIC1111's schedule types and plans against A1111's / k-diffusion's functions on the same inputs.

The reference (tests/helpers_a1111.py) calls k-diffusion's get_sigmas_karras / _exponential /
_polyexponential and its DiscreteSchedule (get_sigmas, sigma_to_t, t_to_sigma), and A1111's
formulas for the other types transcribed in torch, on k-diffusion's wrapper of the same
alphas_cumprod (or A1111's LCM wrapper). Ours is numpy only. Sigmas agree to float32 rounding:
the reference computes in float32 torch, ours in float64 numpy rounded to float32.
"""

from __future__ import annotations

import numpy as np
import pytest

from coreml_sd.config import SchedulerConfig
from coreml_sd.samplers import SAMPLERS
from coreml_sd.schedules import SCHEDULES, make_plan, training_sigmas
from coreml_sd.sigma_schedules import (AYS_SD1, AYS_SDXL, SCHEDULE_TYPES, DiscreteSigmas, beta_ppf, lcm_sigmas)
from helpers_a1111 import SD15

LINEAR = SchedulerConfig(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
TYPES = [k for k, v in SCHEDULE_TYPES.items() if v.function is not None]


def _reference_model(config, lcm: bool):
    from helpers_a1111 import kd_model, lcm_model

    return lcm_model(config) if lcm else kd_model(config)


def _ours_model(config, lcm: bool):
    table = training_sigmas(config)
    return lcm_sigmas(table) if lcm else DiscreteSigmas(table)


# k-diffusion's wrapper on two training schedules; A1111's LCM wrapper on SD's (LCMs are distilled from SD).
@pytest.mark.parametrize("config,lcm", [(SD15, False), (LINEAR, False), (SD15, True)], ids=["sd15", "linear", "lcm"])
@pytest.mark.parametrize("name", TYPES)
def test_schedule_types_equal_a1111(name, lcm, config):
    from helpers_a1111 import a1111_schedule

    ours_model, ref_model = _ours_model(config, lcm), _reference_model(config, lcm)
    for n in (1, 2, 3, 7, 10, 11, 20, 33, 60):
        ours = SCHEDULE_TYPES[name].function(n, ours_model)
        ref = a1111_schedule(name, n, ref_model).numpy()
        # A1111's DDIM type takes every (len // n)-th training sigma: more than n steps when n does not divide len.
        assert ours.dtype == np.float32 and ours.shape == ref.shape, f"{name} n={n}"
        assert len(ours) == n + 1 or name == "ddim"
        np.testing.assert_allclose(ours, ref, rtol=3e-6, atol=0, err_msg=f"{name} n={n}")
        if name != "kl_optimal":  # KL optimal ends on sigma_min, as A1111's does
            assert ours[-1] == 0.0


def test_align_your_steps_sdxl_table():
    from helpers_a1111 import a1111_schedule, kd_model

    model = DiscreteSigmas(training_sigmas(SD15))
    for n in (10, 11, 25):
        ours = SCHEDULE_TYPES["align_your_steps"].function(n, model, True)
        np.testing.assert_allclose(ours, a1111_schedule("align_your_steps", n, kd_model(), sdxl=True).numpy(), rtol=1e-6)
    sdxl = make_plan(SD15, "euler", 11, "align_your_steps", family="sdxl")
    sd1 = make_plan(SD15, "euler", 11, "align_your_steps", family="sd1")
    np.testing.assert_array_equal(sdxl.sigmas, np.float32(AYS_SDXL + (0.0,)))  # 11 steps: the table as is
    np.testing.assert_array_equal(sd1.sigmas, np.float32(AYS_SD1 + (0.0,)))


def test_discrete_sigmas_maps_equal_kdiffusion():
    import torch

    from helpers_a1111 import kd_model

    ours, ref = DiscreteSigmas(training_sigmas(SD15)), kd_model()
    sigmas = np.float32(np.exp(np.random.default_rng(0).uniform(np.log(0.02), np.log(20.0), 200)))
    np.testing.assert_allclose(ours.sigma_to_t(sigmas), ref.sigma_to_t(torch.from_numpy(sigmas)).numpy(), rtol=0, atol=2e-4)
    ts = np.float32(np.random.default_rng(1).uniform(0, 999, 200))
    np.testing.assert_allclose(ours.t_to_sigma(ts), ref.t_to_sigma(torch.from_numpy(ts)).numpy(), rtol=1e-6)


@pytest.mark.parametrize("a,b", [(0.6, 0.6), (0.5, 0.7), (2.0, 5.0), (1.0, 1.0), (0.3, 3.0)])
def test_beta_quantiles_equal_scipy(a, b):
    from scipy import stats

    qs = np.concatenate([[0.0, 1e-9, 1e-4], np.linspace(0.01, 0.99, 37), [1 - 1e-4, 1.0]])
    np.testing.assert_allclose([beta_ppf(q, a, b) for q in qs], stats.beta.ppf(qs, a, b), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("schedule", ["automatic", "karras", "exponential", "uniform", "sgm_uniform", "kl_optimal",
                                      "simple", "normal", "ddim", "beta", "align_your_steps", "polyexponential"])
@pytest.mark.parametrize("sampler", [k for k, v in SAMPLERS.items() if v.a1111_kind in ("kdiffusion", "lcm")])
def test_plans_are_a1111_get_sigmas(sampler, schedule):
    """KDiffusionSampler.get_sigmas: the sampler's default for Automatic, one more step computed and the
    next-to-last sigma dropped for DPM2 / DPM2 a / DPM++ 3M SDE; timesteps from the wrapper's sigma_to_t."""
    from helpers_a1111 import a1111_sigmas

    lcm = SAMPLERS[sampler].a1111_kind == "lcm"
    ref_model = _reference_model(SD15, lcm)
    for steps in (4, 15):
        plan = make_plan(SD15, sampler, steps, schedule, a1111=True)
        if lcm and schedule == "automatic":
            ref = ref_model.get_sigmas(steps)  # LCM has no default type: its wrapper's own sigmas
        else:
            ref = a1111_sigmas(sampler, schedule, steps, ref_model)
        assert plan.convention == "a1111" and plan.model_scale is False and plan.steps == len(ref) - 1
        np.testing.assert_allclose(plan.sigmas, ref.numpy(), rtol=3e-6, err_msg=f"{sampler}/{schedule}/{steps}")
        ref_t = ref_model.sigma_to_t(ref[:-1]).numpy()
        if lcm:
            _check_lcm_timesteps(plan, ref_t, ref_model)
        else:
            np.testing.assert_allclose(plan.timesteps, ref_t, rtol=0, atol=2e-3)
        assert plan.init_noise_sigma == plan.sigmas[0]  # A1111: x = noise * sigmas[0]


def _check_lcm_timesteps(plan, ref_t, ref_model):
    """LCM timesteps equal A1111's, except where a sigma lies halfway (in log) between two LCM
    timesteps: A1111's float32 rounding picks one neighbour, ours (float64) maybe the other."""
    log_table = ref_model.log_sigmas.numpy().astype(np.float64)
    for sigma, ours, theirs in zip(plan.sigmas, plan.timesteps, ref_t):
        if ours != theirs:
            i, j = (int(t - 19) // 20 for t in sorted((ours, theirs)))
            assert j == i + 1, f"timesteps {ours} and {theirs} for sigma {sigma} are not neighbours"
            assert abs(np.log(sigma) - 0.5 * (log_table[i] + log_table[j])) < 5e-7  # a few float32 ulps


def test_automatic_is_each_samplers_a1111_default():
    defaults = {k: v.a1111_schedule for k, v in SAMPLERS.items() if v.a1111_kind == "kdiffusion"}
    assert defaults == {
        "euler_a": None, "euler": None, "dpmpp_2m": "karras", "heun": None, "lms": None,
        "dpmpp_2m_sde": "exponential", "dpm2": "karras", "dpm2_a": "karras", "dpmpp_2s_a": "karras",
        "dpmpp_sde": "karras", "dpmpp_2m_sde_heun": "exponential", "dpmpp_3m_sde": "exponential", "restart": "karras",
    }
    assert [k for k, v in SAMPLERS.items() if v.discard_penultimate] == ["dpm2", "dpm2_a", "dpmpp_3m_sde"]
    assert [k for k, v in SAMPLERS.items() if v.brownian] == ["dpmpp_2m_sde", "dpmpp_sde", "dpmpp_2m_sde_heun",
                                                             "dpmpp_3m_sde"]


@pytest.mark.parametrize("steps", [2, 3, 7, 20, 50])
def test_dpm_solver_plans_use_the_whole_range(steps):
    import torch

    from helpers_a1111 import kd_model

    model = kd_model()
    fast = make_plan(SD15, "dpm_fast", steps, "karras")  # the schedule type does not matter, as in A1111
    assert fast == make_plan(SD15, "dpm_fast", steps, "automatic")
    # DPM-Solver-fast's grid: floor(nfe / 3) + 1 steps uniform in t = -log(sigma) over the model's range.
    m = steps // 3 + 1
    ts = torch.linspace(-np.log(model.sigmas[-1].item()), -np.log(model.sigmas[0].item()), m + 1)
    np.testing.assert_allclose(fast.sigmas, torch.exp(-ts).numpy(), rtol=2e-6)
    assert dict(fast.extras) == {"nfe": steps}
    adaptive = make_plan(SD15, "dpm_adaptive", steps)
    assert adaptive.sigmas == (model.sigmas[-1].item(), model.sigmas[0].item())


@pytest.mark.parametrize("steps", [2, 3, 7, 10, 20, 33, 999])
def test_timesteps_samplers_walk_a1111_timesteps_whatever_the_schedule(steps):
    from coreml_sd.schedules import alphas_cumprod
    from helpers_a1111 import a1111_timesteps

    timesteps = a1111_timesteps(steps).numpy()
    for sampler in ("ddim", "plms"):
        for schedule in ("automatic", "exponential", "beta"):
            plan = make_plan(SD15, sampler, steps, schedule)
            assert plan.timesteps == tuple(float(t) for t in timesteps[::-1][:-1])
            a = alphas_cumprod(SD15).astype(np.float64)[timesteps[::-1]]
            np.testing.assert_allclose(plan.sigmas, np.sqrt((1 - a) / a), rtol=1e-6)
            assert (plan.init_noise_sigma, plan.model_scale) == (1.0, True)
    assert make_plan(SD15, "unipc", steps, "karras").steps == len(timesteps)


def test_ddim_default_and_karras_stay_diffusers_and_a1111_needs_two_steps():
    from coreml_sd.errors import InputError

    assert make_plan(SD15, "ddim", 10).convention == "diffusers"
    assert make_plan(SD15, "ddim", 10, "karras").convention == "diffusers"
    assert make_plan(SD15, "ddim", 10, "automatic").convention == "a1111"
    for sampler in ("ddim", "plms", "unipc"):
        with pytest.raises(InputError, match="at least 2 steps"):
            make_plan(SD15, sampler, 1, "automatic")


def test_every_sampler_has_a_plan_for_every_schedule():
    for sampler in SAMPLERS:
        for schedule in SCHEDULES:
            plan = make_plan(SD15, sampler, 6, schedule)
            assert all(a >= b for a, b in zip(plan.sigmas, plan.sigmas[1:])), f"{sampler}/{schedule}"
            assert len(plan.timesteps) == len(plan.sigmas) - 1
