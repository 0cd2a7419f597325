"""AUTOMATIC1111's sampling, as the reference our samplers and plans are tested against.

Where A1111 calls k-diffusion (most samplers, Karras/Exponential/Polyexponential, the model
wrapper `DiscreteEpsDDPMDenoiser`, the Brownian-tree noise sampler) this calls the installed
k-diffusion (tests/kdiffusion_ref.py). The rest is transcribed here in torch from A1111 v1.10's
published code, line for line in meaning: the schedule types of `modules/sd_schedulers.py`, the
sigma choice of `KDiffusionSampler.get_sigmas`, the DDIM and PLMS loops and timesteps of
`sd_samplers_timesteps(_impl).py`, the LCM denoiser and sampler of `sd_samplers_lcm.py`, and
`restart_sampler` of `sd_samplers_extra.py`. UniPC is diffusers' UniPCMultistepScheduler (a port
of the same official algorithm A1111 ships) walking A1111's continuous-time points.

`ToyUNet` is a small deterministic non-linear stand-in for a UNet (epsilon prediction) that works
on numpy arrays and torch tensors alike, so our samplers run on both and the reference on torch.
"""

from __future__ import annotations

import math

import numpy as np

from coreml_sd.config import SchedulerConfig
from coreml_sd.schedules import alphas_cumprod

SD15 = SchedulerConfig(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
SHAPE = (1, 4, 8, 8)


class ToyUNet:
    """eps(sample, t): smooth, non-linear in the sample, depending on the timestep; numpy or torch."""

    batch_size = None

    def predict(self, sample, timestep, cond):
        t = timestep.reshape(-1, 1, 1, 1) * (1.0 / 1000.0)
        text = getattr(cond, "context", cond).mean() * 0.01
        return sample * (0.9 - t * 0.3) + sample / (sample * sample + 1.0) * 0.2 + t * 0.05 + text


def toy_eps_torch(x, t):
    """The same function on torch tensors with the timestep as k-diffusion's wrappers pass it."""
    import torch

    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
    return ToyUNet().predict(x, t.expand(x.shape[0]).clone(), torch.zeros(1, 77, 8))


def ours_denoiser(plan, kind: str):
    """Our Denoiser (guidance 1: the conditional pass only) over ToyUNet, with numpy or torch arrays."""
    from coreml_sd.denoiser import Denoiser

    cond = np.zeros((1, 77, 8), np.float32)
    if kind == "torch":
        import torch

        cond = torch.from_numpy(cond)
    return Denoiser(ToyUNet(), plan, prediction_type="epsilon", cond=cond, guidance_scale=1.0)


# --- the model wrappers A1111 samples through ------------------------------------------------------


def kd_model(config: SchedulerConfig = SD15):
    """k-diffusion's DiscreteEpsDDPMDenoiser over ToyUNet (A1111's CompVisDenoiser, quantize off)."""
    import torch

    from kdiffusion_ref import load

    _, external = load()
    return external.DiscreteEpsDDPMDenoiser(toy_eps_torch, torch.from_numpy(alphas_cumprod(config).copy()), quantize=False)


def lcm_model(config: SchedulerConfig = SD15):
    """A1111's LCMCompVisDenoiser over ToyUNet: LCM's 50 timesteps, quantized, with its boundary condition."""
    import torch

    from kdiffusion_ref import load

    sampling, external = load()
    ac = torch.from_numpy(alphas_cumprod(config).copy())

    class LCMDenoiser(external.DiscreteEpsDDPMDenoiser):
        def __init__(self):
            timesteps, original = 1000, 50
            self.skip_steps = timesteps // original
            valid = torch.zeros(original, dtype=torch.float32)
            for x in range(original):
                valid[original - 1 - x] = ac[timesteps - 1 - x * self.skip_steps]
            super().__init__(toy_eps_torch, valid, quantize=None)

        def get_sigmas(self, n=None):
            start, end = self.sigma_to_t(self.sigma_max), self.sigma_to_t(self.sigma_min)
            return sampling.append_zero(self.t_to_sigma(torch.linspace(start, end, n)))

        def sigma_to_t(self, sigma, quantize=None):
            dists = sigma.log() - self.log_sigmas[:, None]
            return dists.abs().argmin(dim=0).view(sigma.shape) * self.skip_steps + (self.skip_steps - 1)

        def t_to_sigma(self, timestep):
            t = torch.clamp(((timestep - (self.skip_steps - 1)) / self.skip_steps).float(), min=0,
                            max=(len(self.sigmas) - 1))
            return super().t_to_sigma(t)

        def forward(self, input, sigma, **kwargs):
            c_out, c_in = [x.reshape(-1, 1, 1, 1) for x in self.get_scalings(sigma)]
            eps = self.get_eps(input * c_in, self.sigma_to_t(sigma), **kwargs)
            output = input + eps * c_out
            scaled_t = self.sigma_to_t(sigma).reshape(-1, 1, 1, 1) * 10.0
            c_skip = 0.25 / (scaled_t**2 + 0.25)
            c_out = scaled_t / (scaled_t**2 + 0.25) ** 0.5
            return c_out * output + c_skip * input

    return LCMDenoiser()


# --- schedule types (modules/sd_schedulers.py) -----------------------------------------------------


def _uniform(n, sigma_min, sigma_max, inner_model):
    return inner_model.get_sigmas(n)


def _sgm_uniform(n, sigma_min, sigma_max, inner_model):
    import torch

    start = inner_model.sigma_to_t(torch.tensor(sigma_max))
    end = inner_model.sigma_to_t(torch.tensor(sigma_min))
    sigs = [inner_model.t_to_sigma(ts) for ts in torch.linspace(start, end, n + 1)[:-1]]
    return torch.FloatTensor(sigs + [0.0])


def _normal(n, sigma_min, sigma_max, inner_model):
    import torch

    start = inner_model.sigma_to_t(torch.tensor(sigma_max))
    end = inner_model.sigma_to_t(torch.tensor(sigma_min))
    sigs = [inner_model.t_to_sigma(ts) for ts in torch.linspace(start, end, n)]
    return torch.FloatTensor(sigs + [0.0])


def _kl_optimal(n, sigma_min, sigma_max):
    import torch

    alpha_min, alpha_max = torch.arctan(torch.tensor(sigma_min)), torch.arctan(torch.tensor(sigma_max))
    step_indices = torch.arange(n + 1)
    return torch.tan(step_indices / n * alpha_min + (1.0 - step_indices / n) * alpha_max)


def _align_your_steps(n, sdxl):
    import torch

    if sdxl:
        sigmas = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]
    else:
        sigmas = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
    if n != len(sigmas):
        xs = np.linspace(0, 1, len(sigmas))
        ys = np.log(sigmas[::-1])
        new_ys = np.interp(np.linspace(0, 1, n), xs, ys)
        sigmas = np.append(np.exp(new_ys)[::-1].copy(), [0.0])
    else:
        sigmas.append(0.0)
    return torch.FloatTensor(sigmas)


def _simple(n, sigma_min, sigma_max, inner_model):
    import torch

    ss = len(inner_model.sigmas) / n
    sigs = [float(inner_model.sigmas[-(1 + int(x * ss))]) for x in range(n)]
    return torch.FloatTensor(sigs + [0.0])


def _ddim(n, sigma_min, sigma_max, inner_model):
    import torch

    sigs, ss, x = [], max(len(inner_model.sigmas) // n, 1), 1
    while x < len(inner_model.sigmas):
        sigs += [float(inner_model.sigmas[x])]
        x += ss
    return torch.FloatTensor(sigs[::-1] + [0.0])


def _beta(n, sigma_min, sigma_max, alpha=0.6, beta=0.6):
    import torch
    from scipy import stats

    timesteps = [stats.beta.ppf(x, alpha, beta) for x in 1 - np.linspace(0, 1, n)]
    return torch.FloatTensor([sigma_min + x * (sigma_max - sigma_min) for x in timesteps] + [0.0])


def a1111_schedule(name: str, n: int, inner_model, sdxl: bool = False):
    """A1111's schedule function `name` called as KDiffusionSampler.get_sigmas calls it."""
    from kdiffusion_ref import load

    sampling, _ = load()
    sigma_min, sigma_max = inner_model.sigmas[0].item(), inner_model.sigmas[-1].item()
    if name == "uniform":
        return _uniform(n, sigma_min, sigma_max, inner_model)
    if name in ("karras", "exponential", "polyexponential"):
        return getattr(sampling, f"get_sigmas_{name}")(n=n, sigma_min=sigma_min, sigma_max=sigma_max)
    if name == "align_your_steps":
        return _align_your_steps(n, sdxl)
    if name in ("kl_optimal", "beta"):
        return {"kl_optimal": _kl_optimal, "beta": _beta}[name](n, sigma_min, sigma_max)
    return {"sgm_uniform": _sgm_uniform, "normal": _normal, "simple": _simple, "ddim": _ddim}[name](
        n, sigma_min, sigma_max, inner_model)


def a1111_sigmas(sampler: str, schedule: str, steps: int, inner_model, sdxl: bool = False):
    """KDiffusionSampler.get_sigmas: the sampler's default schedule for "automatic", its discard option."""
    import torch

    from coreml_sd.samplers import SAMPLERS

    info = SAMPLERS[sampler]  # the options table: A1111's scheduler / discard_next_to_last_sigma per sampler
    steps += 1 if info.discard_penultimate else 0
    name = info.a1111_schedule if schedule == "automatic" else schedule
    sigmas = inner_model.get_sigmas(steps) if name is None else a1111_schedule(name, steps, inner_model, sdxl)
    if info.discard_penultimate:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas.float()


# --- samplers A1111 has outside k-diffusion ---------------------------------------------------------


def a1111_timesteps(steps: int):
    import torch

    return torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)


def a1111_ddim(eps_model, x, timesteps, ac, eta=0.0, randn_like=None):
    """sd_samplers_timesteps_impl.ddim."""
    import torch

    alphas = ac[timesteps]
    alphas_prev = ac[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    a, a_prev = alphas.numpy().astype(np.float64), alphas_prev.numpy()
    sigmas = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = eps_model(x, timesteps[index].item())
        a_t, a_prev = alphas[index].item(), alphas_prev[index].item()
        sigma_t, sqrt_one_minus_at = sigmas[index].item(), sqrt_one_minus_alphas[index].item()
        pred_x0 = (x - sqrt_one_minus_at * e_t) / math.sqrt(a_t)
        dir_xt = math.sqrt(1.0 - a_prev - sigma_t**2) * e_t
        noise = sigma_t * randn_like(x) if randn_like is not None else 0.0
        x = math.sqrt(a_prev) * pred_x0 + dir_xt + noise
    return x


def a1111_plms(eps_model, x, timesteps, ac):
    """sd_samplers_timesteps_impl.plms."""
    import torch

    alphas = ac[timesteps]
    alphas_prev = ac[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    old_eps = []

    def get_x_prev_and_pred_x0(x, e_t, index):
        a_t, a_prev = alphas[index].item(), alphas_prev[index].item()
        pred_x0 = (x - sqrt_one_minus_alphas[index].item() * e_t) / math.sqrt(a_t)
        return math.sqrt(a_prev) * pred_x0 + math.sqrt(1.0 - a_prev) * e_t

    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = eps_model(x, timesteps[index].item())
        if len(old_eps) == 0:
            x_prev = get_x_prev_and_pred_x0(x, e_t, index)
            e_t_next = eps_model(x_prev, timesteps[max(index - 1, 0)].item())
            e_t_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x_prev = get_x_prev_and_pred_x0(x, e_t_prime, index)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
        x = x_prev
    return x


def a1111_lcm(model, x, sigmas, noise_sampler):
    """sd_samplers_lcm.sample_lcm."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones([x.shape[0]]))
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise_sampler(sigmas[i], sigmas[i + 1])
    return x


def a1111_restart(model, x, sigmas, randn_like, s_noise=1.0):
    """sd_samplers_extra.restart_sampler with its automatic restart list."""
    import torch

    from kdiffusion_ref import load

    sampling, _ = load()
    s_in = x.new_ones([x.shape[0]])

    def heun_step(x, old_sigma, new_sigma):
        denoised = model(x, old_sigma * s_in)
        d = sampling.to_d(x, old_sigma, denoised)
        dt = new_sigma - old_sigma
        if new_sigma == 0:
            return x + d * dt
        x_2 = x + d * dt
        d_2 = sampling.to_d(x_2, new_sigma, model(x_2, new_sigma * s_in))
        return x + (d + d_2) / 2 * dt

    steps = sigmas.shape[0] - 1
    restart_list = {}
    if steps >= 20:
        restart_steps, restart_times = 9, 1
        if steps >= 36:
            restart_steps, restart_times = steps // 4, 2
        sigmas = sampling.get_sigmas_karras(steps - restart_steps * restart_times, sigmas[-2].item(), sigmas[0].item())
        restart_list = {0.1: [restart_steps + 1, restart_times, 2]}
    restart_list = {int(torch.argmin(abs(sigmas - key), dim=0)): value for key, value in restart_list.items()}
    step_list = []
    for i in range(len(sigmas) - 1):
        step_list.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in restart_list:
            restart_steps, restart_times, restart_max = restart_list[i + 1]
            min_idx, max_idx = i + 1, int(torch.argmin(abs(sigmas - restart_max), dim=0))
            if max_idx < min_idx:
                sigma_restart = sampling.get_sigmas_karras(restart_steps, sigmas[min_idx].item(),
                                                           sigmas[max_idx].item())[:-1]
                while restart_times > 0:
                    restart_times -= 1
                    step_list.extend(zip(sigma_restart[:-1], sigma_restart[1:]))
    last_sigma = None
    for old_sigma, new_sigma in step_list:
        if last_sigma is None:
            last_sigma = old_sigma
        elif last_sigma < old_sigma:
            x = x + randn_like(x) * s_noise * (old_sigma**2 - last_sigma**2) ** 0.5
        x = heun_step(x, old_sigma, new_sigma)
        last_sigma = new_sigma
    return x


def unipc_continuous_sigmas(steps: int, ac):
    """A1111's UniPC points: NoiseScheduleVP('discrete') at time_uniform t from 1 to 1/N (steps + 1 points),
    as (VE sigmas, model input times), from the official code's formulas."""
    import torch

    total_n = len(ac)
    t_array = torch.linspace(0.0, 1.0, total_n + 1)[1:]
    log_alpha_array = 0.5 * torch.log(ac)
    t = torch.linspace(1.0, 1.0 / total_n, steps + 1)
    # interpolate_fn: piecewise linear through (t_array, log_alpha_array)
    k = torch.clamp(torch.searchsorted(t_array, t, right=True) - 1, 0, total_n - 2)
    w = (t - t_array[k]) / (t_array[k + 1] - t_array[k])
    log_alpha = log_alpha_array[k] + w * (log_alpha_array[k + 1] - log_alpha_array[k])
    sigma_vp = torch.sqrt(1.0 - torch.exp(2.0 * log_alpha))
    return sigma_vp / torch.exp(log_alpha), (t - 1.0 / total_n) * 1000.0


def diffusers_unipc(eps_model, x, sigmas, timesteps, variant: str = "bh1", order: int = 3):
    """diffusers' UniPCMultistepScheduler (predict x0, lower order final) over the given sigmas and timesteps."""
    import torch
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(solver_order=order, solver_type=variant, lower_order_final=True,
                                        predict_x0=True, final_sigmas_type="sigma_min")
    scheduler.set_timesteps(len(timesteps))
    scheduler.sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
    scheduler.timesteps = torch.as_tensor(timesteps, dtype=torch.float32)
    for t in scheduler.timesteps:
        x = scheduler.step(eps_model(x, float(t)), t, x).prev_sample
    return x
