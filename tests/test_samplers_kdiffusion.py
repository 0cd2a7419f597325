"""Every sampler against the reference AUTOMATIC1111 runs, on the same denoiser, sigmas and noise.

The reference (tests/helpers_a1111.py): k-diffusion's `sample_*` functions (installed, imported by
tests/kdiffusion_ref.py) for Euler, Euler a, Heun, LMS, DPM2, DPM2 a, DPM++ 2S a, 2M, SDE, 2M SDE,
2M SDE Heun, 3M SDE, DPM fast and DPM adaptive, over k-diffusion's own model wrapper
(`DiscreteEpsDDPMDenoiser`, so its sigma -> timestep map too); for the samplers k-diffusion lacks,
A1111's published code transcribed in torch (DDIM, PLMS, LCM with its denoiser, Restart) and
diffusers' UniPCMultistepScheduler (the port of the official UniPC that A1111 ships) on A1111's
UniPC points. Ours runs the same ToyUNet through our Denoiser, on numpy arrays and on torch tensors.

Deterministic samplers agree within 1e-4 relative to the latent scale (max |ours - ref| <=
1e-4 * max(1, max |ref|)) in float32; stochastic ones too, fed the very noise arrays ours drew
(recorded, then handed to the reference's noise sampler or randn in the same order). The golden
values at the end come from the reference with A1111's own noise (torch's CPU generator stream;
torchsde's Brownian tree for the SDE samplers) and are re-derived live from it.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from coreml_sd.rng import NoiseSource
from coreml_sd.samplers import SAMPLERS, noise_from_sources, sample
from coreml_sd.schedules import make_plan
from helpers_a1111 import SD15, SHAPE, ours_denoiser

REL_TOL = 1e-4
KDIFFUSION = {
    "euler": "sample_euler", "euler_a": "sample_euler_ancestral", "heun": "sample_heun", "lms": "sample_lms",
    "dpm2": "sample_dpm_2", "dpm2_a": "sample_dpm_2_ancestral", "dpmpp_2s_a": "sample_dpmpp_2s_ancestral",
    "dpmpp_2m": "sample_dpmpp_2m", "dpmpp_sde": "sample_dpmpp_sde", "dpmpp_2m_sde": "sample_dpmpp_2m_sde",
    "dpmpp_2m_sde_heun": "sample_dpmpp_2m_sde", "dpmpp_3m_sde": "sample_dpmpp_3m_sde",
    "dpm_fast": "sample_dpm_fast", "dpm_adaptive": "sample_dpm_adaptive",
}
OTHERS = ("ddim", "plms", "unipc", "lcm", "restart")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _assert_close(ours, ref, what: str, rel: float = REL_TOL) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, what
    scale = max(1.0, float(np.abs(ref).max()))
    diff = float(np.abs(ours - ref).max())
    assert diff <= rel * scale, f"{what}: max |ours - reference| = {diff:.3g} > {rel:g} * {scale:.3g}"
    return diff


def _to_kind(a: np.ndarray, kind: str):
    if kind == "torch":
        import torch

        return torch.from_numpy(np.ascontiguousarray(a))
    return a


def run_ours(sampler: str, schedule: str, steps: int, kind: str, *, eta=None, seed: int = 0):
    """(final latent, initial latent, the noise draws in order, plan) for our sampler on A1111's plan
    (a1111=True: "karras" too is A1111's for the seven diffusers samplers), with recorded noise."""
    from coreml_sd.arrays import to_numpy

    plan = make_plan(SD15, sampler, steps, schedule, a1111=True)
    source = NoiseSource(seed, engine="numpy")
    x0 = source.randn(SHAPE) * np.float32(plan.init_noise_sigma)
    draws = []

    def noise_sampler(sigma, sigma_next):
        draws.append(source.randn(SHAPE))
        return _to_kind(draws[-1], kind)

    x = _to_kind(x0, kind)
    for x in sample(sampler, ours_denoiser(plan, kind), x, plan, eta=eta, noise_sampler=noise_sampler):
        pass
    out = to_numpy(x)
    assert out.dtype == np.float32 and (kind != "torch" or type(x).__module__.startswith("torch"))
    return out, x0, draws, plan


def _queue(draws):
    import torch

    queue = [torch.from_numpy(d) for d in draws]

    def noise_sampler(*_):
        return queue.pop(0)

    return noise_sampler, queue


def run_kdiffusion(sampler: str, plan, x0, draws, *, eta=None):
    """k-diffusion's sampler as A1111 calls it, over its own model wrapper, given our noise draws."""
    import torch

    from helpers_a1111 import kd_model
    from kdiffusion_ref import load

    sampling, _ = load()
    model = kd_model()
    function = getattr(sampling, KDIFFUSION[sampler])
    params = inspect.signature(function).parameters
    noise_sampler, queue = _queue(draws)
    kwargs = {"disable": True}
    if "eta" in params:
        kwargs["eta"] = SAMPLERS[sampler].eta if eta is None else eta  # A1111 always passes its eta
    if "noise_sampler" in params:
        kwargs["noise_sampler"] = noise_sampler
    if sampler == "dpmpp_2m_sde_heun":
        kwargs["solver_type"] = "heun"
    x = torch.from_numpy(x0)
    if sampler in ("dpm_fast", "dpm_adaptive"):
        # A1111 passes the model's whole range (and n = steps to DPM fast), whatever the schedule type.
        sigma_min, sigma_max = model.sigmas[0].item(), model.sigmas[-1].item()
        if sampler == "dpm_fast":
            kwargs["n"] = dict(plan.extras)["nfe"]
        out = function(model, x, sigma_min, sigma_max, **kwargs)
    else:
        # float64 sigmas: k-diffusion's scalar arithmetic in double, as ours (Python floats), latents
        # float32. With float32 sigma tensors its sigma_next**2 - sigma_up**2 cancels badly on a
        # step spanning most of the range (1% off in sigma_down at 2 steps): its rounding, not an
        # algorithm difference (the golden values below use A1111's float32 sigmas at 10 steps).
        out = function(model, x, torch.tensor(plan.sigmas, dtype=torch.float64), **kwargs)
    assert not queue, f"{sampler}: the reference drew {len(draws) - len(queue)} of our {len(draws)} noise arrays"
    return out.numpy()


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("schedule,steps", [("automatic", 2), ("automatic", 10), ("karras", 7),
                                            ("exponential", 5), ("sgm_uniform", 12)])
@pytest.mark.parametrize("sampler", sorted(KDIFFUSION))
def test_equals_kdiffusion(sampler, schedule, steps, kind):
    ours, x0, draws, plan = run_ours(sampler, schedule, steps, kind)
    ref = run_kdiffusion(sampler, plan, x0, draws)
    _assert_close(ours, ref, f"{sampler}/{schedule}/{steps} steps on {kind}")
    assert SAMPLERS[sampler].ancestral == bool(draws)  # stochastic samplers drew noise, the others none


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("sampler", sorted(k for k in KDIFFUSION if SAMPLERS[k].eta is not None))
def test_eta_equals_kdiffusion(sampler, eta):
    ours, x0, draws, plan = run_ours(sampler, "automatic", 8, "numpy", eta=eta)
    _assert_close(ours, run_kdiffusion(sampler, plan, x0, draws, eta=eta), f"{sampler} eta={eta}")


# --- the samplers k-diffusion lacks: A1111's code transcribed, or diffusers' UniPC -----------------


def _eps_reference():
    from helpers_a1111 import toy_eps_torch

    return lambda x, t: toy_eps_torch(x, t)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("steps", [3, 10, 25])
@pytest.mark.parametrize("sampler", ["ddim", "plms"])
def test_timesteps_samplers_equal_a1111(sampler, steps, kind):
    import torch

    from coreml_sd.schedules import alphas_cumprod
    from helpers_a1111 import a1111_ddim, a1111_plms, a1111_timesteps

    ours, x0, draws, plan = run_ours(sampler, "automatic", steps, kind)
    timesteps = a1111_timesteps(steps)
    assert plan.steps == len(timesteps) - 1 and plan.init_noise_sigma == 1.0  # A1111 runs one step fewer
    ac = torch.from_numpy(alphas_cumprod(SD15).copy())
    run = a1111_ddim if sampler == "ddim" else a1111_plms
    ref = run(_eps_reference(), torch.from_numpy(x0), timesteps, ac)
    _assert_close(ours, ref.numpy(), f"A1111 {sampler} {steps} steps on {kind}")


def test_ddim_eta_equals_a1111():
    import torch

    from coreml_sd.schedules import alphas_cumprod
    from helpers_a1111 import a1111_ddim, a1111_timesteps

    ours, x0, draws, _ = run_ours("ddim", "automatic", 10, "numpy", eta=0.5)
    assert len(draws) == 9
    noise_sampler, queue = _queue(draws)
    ac = torch.from_numpy(alphas_cumprod(SD15).copy())
    ref = a1111_ddim(_eps_reference(), torch.from_numpy(x0), a1111_timesteps(10), ac, eta=0.5,
                     randn_like=lambda x: noise_sampler())
    assert not queue
    _assert_close(ours, ref.numpy(), "A1111 DDIM eta 0.5")


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("steps", [3, 10, 20])
def test_unipc_equals_diffusers_on_a1111_points(steps, kind):
    """A1111's UniPC (bh1, order 3, time-uniform) = diffusers' UniPC walking the points the official
    NoiseScheduleVP gives; the plan's points equal that transcription."""
    import torch

    from coreml_sd.schedules import alphas_cumprod
    from helpers_a1111 import a1111_timesteps, diffusers_unipc, unipc_continuous_sigmas

    pytest.importorskip("diffusers")
    ours, x0, _, plan = run_ours("unipc", "automatic", steps, kind)
    sigmas, times = unipc_continuous_sigmas(len(a1111_timesteps(steps)), torch.from_numpy(alphas_cumprod(SD15).copy()))
    np.testing.assert_allclose(plan.sigmas, sigmas.numpy(), rtol=2e-6)
    np.testing.assert_allclose(plan.timesteps, times.numpy()[:-1], rtol=0, atol=1e-3)
    ref = diffusers_unipc(_eps_reference(), torch.from_numpy(x0), sigmas, times[:-1], variant="bh1")
    _assert_close(ours, ref.numpy(), f"UniPC {steps} steps on {kind}")


def test_unipc_bh2_variant_equals_diffusers():
    import torch

    from coreml_sd.samplers_timesteps import unipc
    from helpers_a1111 import diffusers_unipc

    pytest.importorskip("diffusers")
    plan = make_plan(SD15, "unipc", 12, "automatic")
    x0 = NoiseSource(3, engine="numpy").randn(SHAPE)
    for x in unipc(ours_denoiser(plan, "numpy"), x0, plan.sigmas, variant="bh2"):
        pass
    ref = diffusers_unipc(_eps_reference(), torch.from_numpy(x0), plan.sigmas, plan.timesteps, variant="bh2")
    _assert_close(x, ref.numpy(), "UniPC bh2")


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_lcm_equals_a1111(steps, kind):
    import torch

    from helpers_a1111 import a1111_lcm, lcm_model

    ours, x0, draws, plan = run_ours("lcm", "automatic", steps, kind)
    model = lcm_model()
    sigmas = model.get_sigmas(steps)
    np.testing.assert_allclose(plan.sigmas, sigmas.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(plan.timesteps, model.sigma_to_t(sigmas[:-1]).numpy())
    noise_sampler, queue = _queue(draws)
    ref = a1111_lcm(model, torch.from_numpy(x0), sigmas, noise_sampler)
    assert not queue
    _assert_close(ours, ref.numpy(), f"LCM {steps} steps on {kind}")


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("steps", [10, 20, 36])  # no restart; one restart segment; two
def test_restart_equals_a1111(steps, kind):
    import torch

    from helpers_a1111 import a1111_restart, kd_model

    ours, x0, draws, plan = run_ours("restart", "automatic", steps, kind)
    assert bool(draws) == (steps >= 20)
    noise_sampler, queue = _queue(draws)
    ref = a1111_restart(kd_model(), torch.from_numpy(x0), torch.tensor(plan.sigmas, dtype=torch.float32),
                        randn_like=lambda x: noise_sampler())
    assert not queue
    _assert_close(ours, ref.numpy(), f"Restart {steps} steps on {kind}")


# --- golden latents: full loops with A1111's own noise ------------------------------------------------

GOLDEN_STEPS = 10
# sampler -> (sum of |x|, mean of x, x[0, 0, 0, :3]) after GOLDEN_STEPS steps of the automatic
# schedule from seed 0 on ToyUNet, produced by `reference_golden` (k-diffusion / A1111's code with
# torch's generator and torchsde's Brownian tree), which test_golden_values_are_the_reference re-derives.
GOLDEN: dict[str, tuple[float, float, list[float]]] = {
    'euler_a': (111.98170456383377, -0.03936723244623863, [-0.9606949090957642, -0.2720755934715271, -0.02409633807837963]),
    'euler': (209.13666974846274, -0.07996293748146854, [-1.4246928691864014, -1.4654850959777832, -0.258735328912735]),
    'ddim': (168.5399166275747, -0.04750278455867374, [-1.1127768754959106, -1.1448519229888916, -0.2123141884803772]),
    'dpmpp_2m': (173.24327054060996, -0.04156793850415852, [-1.1419144868850708, -1.174854040145874, -0.20832599699497223]),
    'heun': (180.390432550892, -0.04855163549416375, [-1.1953386068344116, -1.2298513650894165, -0.21984809637069702]),
    'lms': (201.72056015743874, -0.0666735151253306, [-1.3555022478103638, -1.394289255142212, -0.25029969215393066]),
    'dpmpp_2m_sde': (103.16096896248928, 0.04241848053283093, [-0.32138803601264954, 0.2914246618747711, -0.03371328487992287]),
    'dpm2': (182.40807214775123, -0.05080519523562543, [-1.2112890481948853, -1.246260166168213, -0.2229044884443283]),
    'dpm2_a': (102.16233038017526, -0.009501738584731356, [-0.8225427269935608, -0.013493265025317669, -0.08208979666233063]),
    'dpmpp_2s_a': (102.96008614767925, -0.011410732183890104, [-0.8089800477027893, -0.08379176259040833, -0.10145867615938187]),
    'dpmpp_sde': (105.35075126914307, 0.006019723225108464, [-0.3799493610858917, 0.21570011973381042, -0.1741662621498108]),
    'dpmpp_2m_sde_heun': (110.82343726977706, 0.061241258794325404, [-0.2878589928150177, 0.24375736713409424, -0.02426108717918396]),
    'dpmpp_3m_sde': (114.1231816415675, 0.0166309188653031, [-0.571849524974823, 0.45321327447891235, 0.03828100487589836]),
    'dpm_fast': (180.23568619851721, -0.05413564285595385, [-0.9588097333908081, -1.529750108718872, -0.5728943347930908]),
    'dpm_adaptive': (108.80279759792029, -0.04967544286012071, [-0.7590686082839966, 0.005540370475500822, -0.2142796516418457]),
    'restart': (180.2466159708565, -0.0471897984084535, [-1.1921205520629883, -1.2264517545700073, -0.2198946624994278]),
    'plms': (156.39786387886852, -0.03165324586734641, [-1.0122339725494385, -1.0413424968719482, -0.19469891488552094]),
    'unipc': (188.17715085530654, -0.056454908752129995, [-1.2574979066848755, -1.293770670890808, -0.22965750098228455]),
    'lcm': (62.8134841452993, -0.03699019929433689, [-0.28078773617744446, 0.04553254321217537, 0.014569130726158619]),
}
# The SDE samplers' Brownian tree rounds its query points to 1e-6, which is float32's resolution
# for sigmas above ~8: sigmas one ulp apart (ours from numpy, A1111's from torch's float32
# linspace/exp/pow) then query neighbouring points, and the noise differs by ~1e-3 of its size.
# The tree itself equals torchsde's for the same points (tests/test_brownian.py).
BROWNIAN_REL_TOL = 2e-3


def reference_golden(sampler: str, seed: int = 0):
    """The reference's final latent with A1111's noise: x_T and step noise from one torch generator
    per image (its ImageRNG), the SDE samplers' noise from k-diffusion's BrownianTreeNoiseSampler(seed=[seed])."""
    import torch

    from coreml_sd.schedules import alphas_cumprod
    from helpers_a1111 import (a1111_ddim, a1111_lcm, a1111_plms, a1111_restart, a1111_sigmas, a1111_timesteps,
                               diffusers_unipc, kd_model, lcm_model, unipc_continuous_sigmas)
    from kdiffusion_ref import load

    sampling, _ = load()
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(SHAPE, generator=generator)

    def randn_like(*_):
        return torch.randn(SHAPE, generator=generator)

    ac = torch.from_numpy(alphas_cumprod(SD15).copy())
    if sampler in ("ddim", "plms"):
        return (a1111_ddim if sampler == "ddim" else a1111_plms)(_eps_reference(), noise, a1111_timesteps(GOLDEN_STEPS), ac)
    if sampler == "unipc":
        sigmas, times = unipc_continuous_sigmas(len(a1111_timesteps(GOLDEN_STEPS)), ac)
        return diffusers_unipc(_eps_reference(), noise, sigmas, times[:-1])
    model = lcm_model() if sampler == "lcm" else kd_model()
    sigmas = model.get_sigmas(GOLDEN_STEPS) if sampler == "lcm" else a1111_sigmas(sampler, "automatic", GOLDEN_STEPS, model)
    x = noise * sigmas[0]
    if sampler == "lcm":
        return a1111_lcm(model, x, sigmas, randn_like)
    if sampler == "restart":
        return a1111_restart(model, x, sigmas, randn_like)
    function = getattr(sampling, KDIFFUSION[sampler])
    params = inspect.signature(function).parameters
    kwargs = {"disable": True}
    if "eta" in params:
        kwargs["eta"] = 1.0
    if SAMPLERS[sampler].brownian:
        kwargs["noise_sampler"] = sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=[seed])
    elif "noise_sampler" in params:
        kwargs["noise_sampler"] = randn_like
    if sampler == "dpmpp_2m_sde_heun":
        kwargs["solver_type"] = "heun"
    if sampler in ("dpm_fast", "dpm_adaptive"):
        x = noise * model.sigmas[-1]
        if sampler == "dpm_fast":
            kwargs["n"] = GOLDEN_STEPS
        return function(model, x, model.sigmas[0].item(), model.sigmas[-1].item(), **kwargs)
    return function(model, x, sigmas, **kwargs)


def ours_golden(sampler: str, seed: int = 0) -> np.ndarray:
    """Ours, numpy only, with the noise the pipeline gives: the image seed's stream / Brownian tree."""
    plan = make_plan(SD15, sampler, GOLDEN_STEPS, "automatic")
    noise = noise_from_sources([NoiseSource(seed, engine="numpy")], np.asarray)
    x = noise(SHAPE) * np.float32(plan.init_noise_sigma)
    for x in sample(sampler, ours_denoiser(plan, "numpy"), x, plan, noise):
        assert isinstance(x, np.ndarray) and x.dtype == np.float32
    return x


def golden_summary(x) -> tuple[float, float, list[float]]:
    x = np.asarray(x, dtype=np.float64)
    return float(np.abs(x).sum()), float(x.mean()), [float(v) for v in x[0, 0, 0, :3]]


def _check_golden(got, want, rel: float):
    got_sum, got_mean, got_first = got
    want_sum, want_mean, want_first = want
    scale = max(1.0, max(abs(v) for v in want_first))
    assert got_sum == pytest.approx(want_sum, rel=rel)
    assert got_mean == pytest.approx(want_mean, rel=rel * 10, abs=rel)
    np.testing.assert_allclose(got_first, want_first, rtol=0, atol=rel * scale)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_golden_values(sampler):
    assert set(GOLDEN) == set(SAMPLERS)
    rel = BROWNIAN_REL_TOL if SAMPLERS[sampler].brownian else REL_TOL
    _check_golden(golden_summary(ours_golden(sampler)), GOLDEN[sampler], rel=rel)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_golden_values_are_the_reference(sampler):
    import warnings

    import torch

    with torch.no_grad(), warnings.catch_warnings():
        # torchsde warns when k-diffusion queries sigma_min itself, just below the tree's rounded t0.
        warnings.filterwarnings("ignore", "Should have", UserWarning)
        ref = reference_golden(sampler)
    _check_golden(golden_summary(ref.numpy()), GOLDEN[sampler], rel=1e-5)
