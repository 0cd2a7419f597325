"""Names users type, and the sample() options A1111 recipes carry (eta, ENSD, per-image noise)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from coreml_sd.errors import InputError
from coreml_sd.rng import NoiseSource
from coreml_sd.sampler_names import resolve_sampler, resolve_sampler_and_schedule, resolve_schedule
from coreml_sd.samplers import SAMPLERS, noise_from_sources, sample
from coreml_sd.schedules import SCHEDULES, make_plan
from helpers_a1111 import SD15, SHAPE, ours_denoiser

# AUTOMATIC1111 v1.10's sampler list, display names as its UI shows them.
A1111_NAMES = ["Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ 2M", "DPM++ SDE",
               "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE", "DPM fast", "DPM adaptive", "Restart",
               "DDIM", "PLMS", "UniPC", "LCM"]
A1111_SCHEDULES = ["Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
                   "Align Your Steps", "Simple", "Normal", "DDIM", "Beta"]


def test_every_a1111_sampler_and_schedule_type_is_here():
    assert sorted(info.display_name for info in SAMPLERS.values()) == sorted(A1111_NAMES)
    assert [resolve_schedule(label) for label in A1111_SCHEDULES] == list(SCHEDULES[1:])


@pytest.mark.parametrize("name", A1111_NAMES)
def test_display_names_resolve_in_any_case(name):
    key, schedule = resolve_sampler(name)
    assert SAMPLERS[key].display_name == name and schedule is None
    assert resolve_sampler(name.upper()) == resolve_sampler(f"  {name.lower()} ") == (key, None)
    assert resolve_sampler(key) == (key, None)


@pytest.mark.parametrize("text,expected", [
    ("DPM++ 2M Karras", ("dpmpp_2m", "karras")),
    ("DPM++ SDE Karras", ("dpmpp_sde", "karras")),
    ("DPM++ 2M SDE Exponential", ("dpmpp_2m_sde", "exponential")),
    ("DPM++ 2M SDE Karras", ("dpmpp_2m_sde", "karras")),
    ("DPM++ 2M SDE Heun Exponential", ("dpmpp_2m_sde_heun", "exponential")),
    ("DPM++ 3M SDE Karras", ("dpmpp_3m_sde", "karras")),
    ("LMS Karras", ("lms", "karras")),
    ("DPM2 a Karras", ("dpm2_a", "karras")),
    ("Euler a SGM Uniform", ("euler_a", "sgm_uniform")),
    ("Euler SGMUniform", ("euler", "sgm_uniform")),
    ("dpmpp_2m_karras", ("dpmpp_2m", "karras")),
    ("k_dpmpp_2m_ka", ("dpmpp_2m", "karras")),
    ("k_euler_a", ("euler_a", None)),
    ("k_dpm_ad", ("dpm_adaptive", None)),
])
def test_combined_and_old_names(text, expected):
    assert resolve_sampler(text) == expected


@pytest.mark.parametrize("text,expected", [("Karras", "karras"), ("SGM Uniform", "sgm_uniform"),
                                           ("sgm_uniform", "sgm_uniform"), ("SGMUniform", "sgm_uniform"),
                                           ("kl-optimal", "kl_optimal"), ("Align Your Steps", "align_your_steps"),
                                           ("default", "default"), ("AUTOMATIC", "automatic")])
def test_schedule_names(text, expected):
    assert resolve_schedule(text) == expected


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(InputError, match=r"unknown sampler 'DPM\+\+ 4M'; valid samplers: euler_a, .*lcm .*DPM\+\+ 2M SDE"):
        resolve_sampler("DPM++ 4M")
    with pytest.raises(InputError, match=r"unknown schedule 'Cosine'; valid schedules: default, automatic.*SGM Uniform"):
        resolve_schedule("Cosine")
    with pytest.raises(InputError, match="unknown sampler"):
        resolve_sampler("Euler Cosine")


def test_a_schedule_in_the_name_wins_as_in_a1111():
    assert resolve_sampler_and_schedule("DPM++ 2M Karras", "exponential") == ("dpmpp_2m", "karras")
    assert resolve_sampler_and_schedule("DPM++ 2M", "Exponential") == ("dpmpp_2m", "exponential")
    assert resolve_sampler_and_schedule("euler_a") == ("euler_a", "default")


# --- sample(): eta, ENSD, noise sources ------------------------------------------------------------


def _run(sampler, noise, *, schedule="automatic", steps=6, **kwargs):
    plan = make_plan(SD15, sampler, steps, schedule)
    x = noise((len(noise.sources),) + SHAPE[1:]) * np.float32(plan.init_noise_sigma)
    for x in sample(sampler, ours_denoiser(plan, "numpy"), x, plan, noise, **kwargs):
        pass
    return x


def _noise(seed, rows=1):
    return noise_from_sources([NoiseSource(seed + i, engine="numpy") for i in range(rows)], np.asarray)


def test_ensd_reseeds_the_step_noise_like_a1111():
    """A1111: initial latents from the seed, then (ENSD != 0) sampler noise from a generator seeded seed + ENSD."""
    seed, ensd = 5, 31337
    plain = _run("euler_a", _noise(seed))
    with_ensd = _run("euler_a", _noise(seed), ensd=ensd)
    assert np.abs(plain - with_ensd).max() > 0.1
    # The same by hand: x_T from NoiseSource(seed), every step's noise from NoiseSource(seed + ENSD).
    plan = make_plan(SD15, "euler_a", 6, "automatic")
    step_source = NoiseSource(seed + ensd, engine="numpy")
    x = NoiseSource(seed, engine="numpy").randn(SHAPE) * np.float32(plan.init_noise_sigma)
    for x in sample("euler_a", ours_denoiser(plan, "numpy"), x, plan,
                    noise_sampler=lambda s, sn: step_source.randn(SHAPE)):
        pass
    np.testing.assert_array_equal(with_ensd, x)
    # Deterministic samplers draw nothing, so ENSD changes nothing.
    np.testing.assert_array_equal(_run("dpmpp_2m", _noise(seed)), _run("dpmpp_2m", _noise(seed), ensd=ensd))


def test_ensd_does_not_touch_the_brownian_noise():
    np.testing.assert_array_equal(_run("dpmpp_2m_sde", _noise(3)), _run("dpmpp_2m_sde", _noise(3), ensd=7))


def test_default_eta_and_ensd_keep_todays_images():
    for sampler in ("euler_a", "dpmpp_2m_sde", "ddim"):
        today = _run(sampler, _noise(1), schedule="default")
        np.testing.assert_array_equal(today, _run(sampler, _noise(1), schedule="default", eta=SAMPLERS[sampler].eta,
                                                  ensd=0))


def test_eta_zero_makes_an_ancestral_sampler_deterministic():
    # Euler a at eta 0 steps straight to sigma_next: it is Euler (same A1111 plan: both uniform).
    np.testing.assert_allclose(_run("euler_a", _noise(1), eta=0.0), _run("euler", _noise(1)), rtol=0, atol=1e-6)
    np.testing.assert_allclose(_run("dpm2_a", _noise(1), eta=0.0), _run("dpm2", _noise(1)), rtol=0, atol=1e-6)
    with pytest.raises(InputError, match="draws noise every step"):
        plan = make_plan(SD15, "euler_a", 3)
        sample("euler_a", ours_denoiser(plan, "numpy"), np.zeros(SHAPE, np.float32), plan)
    plan = make_plan(SD15, "euler_a", 3)
    steps = list(sample("euler_a", ours_denoiser(plan, "numpy"), np.ones(SHAPE, np.float32), plan, eta=0.0))
    assert len(steps) == 3  # at eta 0 no noise is needed


def test_bad_eta_and_samplers_without_eta():
    plan = make_plan(SD15, "euler", 3)
    denoiser, x = ours_denoiser(plan, "numpy"), np.zeros(SHAPE, np.float32)
    with pytest.raises(InputError, match="has no eta; samplers with one: euler_a, ddim, dpmpp_2m_sde"):
        sample("euler", denoiser, x, plan, eta=0.5)
    for bad in (-1.0, float("nan"), "1"):
        with pytest.raises(InputError, match="eta must be a number >= 0"):
            sample("euler_a", denoiser, x, plan, _noise(0), eta=bad)
    with pytest.raises(InputError, match="ENSD"):
        sample("euler_a", denoiser, x, plan, lambda shape: np.zeros(shape, np.float32), ensd=3)
    with pytest.raises(InputError, match=r"made for another sampler \(it sets 'nfe'\), not for 'euler'"):
        sample("euler", denoiser, x, make_plan(SD15, "dpm_fast", 6))


@pytest.mark.parametrize("sampler", [s for s, v in SAMPLERS.items() if v.ancestral and s != "dpm_adaptive"])
def test_each_image_of_a_batch_is_the_image_made_alone(sampler):
    """One noise source per image row (and one Brownian tree per image seed): batches change nothing."""
    batch = _run(sampler, _noise(10, rows=3))
    alone = _run(sampler, _noise(11))
    np.testing.assert_allclose(batch[1:2], alone, rtol=0, atol=1e-5)
    assert np.abs(batch[0] - batch[1]).max() > 0.01


def test_every_sampler_runs_on_numpy_without_torch():
    code = ("import sys, numpy as np\n"
            "from coreml_sd.config import SchedulerConfig\n"
            "from coreml_sd.denoiser import Denoiser\n"
            "from coreml_sd.rng import NoiseSource\n"
            "from coreml_sd.samplers import SAMPLERS, noise_from_sources, sample\n"
            "from coreml_sd.schedules import make_plan\n"
            "class UNet:\n"
            "    batch_size = None\n"
            "    def predict(self, x, t, e): return (x * 0.9 + t.reshape(-1, 1, 1, 1) * 1e-4).astype(np.float32)\n"
            "for name in SAMPLERS:\n"
            "    plan = make_plan(SchedulerConfig(), name, 5, 'automatic')\n"
            "    d = Denoiser(UNet(), plan, prediction_type='epsilon', cond=np.zeros((1, 77, 8), np.float32), guidance_scale=1)\n"
            "    noise = noise_from_sources([NoiseSource(0)], np.asarray)\n"
            "    out = list(sample(name, d, noise((1, 4, 8, 8)) * plan.init_noise_sigma, plan, noise))\n"
            "    assert out and np.isfinite(out[-1]).all(), name\n"
            "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)
