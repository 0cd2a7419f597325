"""One SD1.5 UNet step (batch 2 for guidance, 512x512) on our torch backend next to diffusers.

Measured side by side in one process, rounds interleaved, so a busy machine slows all variants
alike and the ratios stay meaningful:

  diffusers-fp32   StableDiffusionPipeline's default on a CPU: the UNet in fp32
  diffusers-bf16   the same UNet cast to bf16 by hand
  ours-auto        coreml_sd's torch backend with --precision auto (bf16 on CPUs with native bf16),
                   loaded as the backend loads it (a fresh copy of the weights in that precision)

(An earlier version pre-packed oneDNN weights on CPUs; results/prepack_study_cpu.json recorded it
slower in every case, and it was removed.)

Then a short sampling loop in fp32 and in our auto precision from the same seed, to report the
final-latent PSNR that the faster precision costs. Random weights (latency does not depend on
them). Usage: python -m benchmarks.bench_torch_step [--rounds 3] [--quality-steps 8]
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

from benchmarks.common import machine_info, peak_rss_gib, sd15_unet, summarize, write_result
from coreml_sd.backends.torch_backend import TorchUNet
from coreml_sd.devices import resolve_precision, torch_dtype


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def psnr(a: np.ndarray, ref: np.ndarray) -> float:
    from coreml_sd.metrics import psnr as _psnr

    return _psnr(ref, a)


def final_latents(unet, steps: int, seed: int = 0) -> np.ndarray:
    from coreml_sd.config import SchedulerConfig
    from coreml_sd.denoiser import Denoiser
    from coreml_sd.rng import NoiseSource
    from coreml_sd.samplers import noise_from_sources, sample
    from coreml_sd.schedules import make_plan

    plan = make_plan(SchedulerConfig(), "euler", steps)
    gen = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(1, 77, 768, generator=gen), torch.randn(1, 77, 768, generator=gen)
    noise = noise_from_sources([NoiseSource(seed)], torch.from_numpy)
    x = noise((1, 4, 64, 64)) * plan.init_noise_sigma
    den = Denoiser(unet, plan, prediction_type="epsilon", cond=cond, uncond=uncond, guidance_scale=7.5)
    for x in sample("euler", den, x, plan, noise):
        pass
    return x.numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quality-steps", type=int, default=8)
    ap.add_argument("--name", default="torch_step_cpu")
    args = ap.parse_args()

    precision = resolve_precision("auto", "cpu")
    fp32 = sd15_unet()
    params = sum(p.numel() for p in fp32.parameters())
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    ours = TorchUNet(copy.deepcopy(fp32).to(torch_dtype(precision)), torch_dtype(precision))

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 64, 64, generator=gen)
    t = torch.full((2,), 500.0)
    h = torch.randn(2, 77, 768, generator=gen)
    variants = {
        "diffusers-fp32": lambda: fp32(x, t, encoder_hidden_states=h),
        "diffusers-bf16": lambda: bf16(x.bfloat16(), t, encoder_hidden_states=h.bfloat16()),
        f"ours-auto ({precision})": lambda: ours.predict(x, t, h),
    }
    times = {k: [] for k in variants}
    with torch.inference_mode():
        for fn in variants.values():  # warm-up
            fn()
        names = list(variants)
        for r in range(args.rounds):
            # The order rotates every round, so no variant always runs after the same neighbour.
            for name in names[r % len(names):] + names[:r % len(names)]:
                times[name].append(timed(variants[name]))
                print(f"round {r + 1} {name}: {times[name][-1]:.2f} s", flush=True)

    # On a shared machine the speed drifts over minutes: a ratio is taken within each round (its
    # runs are seconds apart), then the median over rounds.
    ours_key = f"ours-auto ({precision})"
    ratios = {f"ours/{base}": float(np.median([o / b for o, b in zip(times[ours_key], times[base])]))
              for base in ("diffusers-fp32", "diffusers-bf16")}
    print("ratios (median of per-round ratios):", {k: round(v, 3) for k, v in ratios.items()})

    quality = {}
    if args.quality_steps:
        ref = final_latents(TorchUNet(fp32, torch.float32), args.quality_steps)
        got = final_latents(ours, args.quality_steps)
        quality = {"sampler": "euler", "steps": args.quality_steps, "precision": precision,
                   "final_latent_psnr_db_vs_fp32": round(psnr(got, ref), 2)}
        print("quality:", quality)

    result = {
        "benchmark": "unet_step_torch_cpu",
        "model": f"SD1.5 UNet architecture, random weights, {params / 1e6:.1f} M parameters",
        "shape": {"sample": [2, 4, 64, 64], "encoder_hidden_states": [2, 77, 768], "image": "512x512"},
        "machine": machine_info(),
        "step_seconds": {k: summarize(v) for k, v in times.items()},
        "ratios": ratios,
        "ratio_method": "median over rounds of the ratio within each round (variant order rotated per round)",
        "targets": {"ours/diffusers-fp32": "<= 0.6", "ours/diffusers-bf16": "<= 1.0"},
        "quality": quality,
        "peak_rss_gib": round(peak_rss_gib(), 2),
    }
    print("wrote", write_result(args.name, result))


if __name__ == "__main__":
    main()
