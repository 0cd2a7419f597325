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
them). Every timed call is announced before it runs. On a CPU without native bf16 (AVX2-only)
diffusers-bf16 is emulated, slower than fp32 by minutes per step: it is skipped and the result
says so, unless --include-emulated-bf16.
Usage: python -m benchmarks.bench_torch_step [--rounds 3] [--quality-steps 8] [--include-emulated-bf16]
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

from benchmarks.common import machine_info, peak_rss_gib, sd15_unet, summarize, write_result
from coreml_sd.backends.torch_backend import TorchUNet
from coreml_sd.bench.machine import busy_note, load_average
from coreml_sd.conditioning import Conditioning
from coreml_sd.devices import cpu_has_native_bf16, resolve_precision, torch_dtype
from coreml_sd.families import SD1


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


STEP = "one SD1.5 UNet step (batch 2, 64x64 latents = 512x512)"


def build_variants(precision: str, native_bf16: bool, include_emulated: bool):
    """(variants to time, skipped name -> why, parameter count). bf16 without native instructions
    is emulated, several times slower than fp32 (minutes per step), so it is skipped unless asked."""
    print(f"building the SD1.5 UNet (random weights) in fp32 and {precision}...", flush=True)
    fp32 = sd15_unet()
    params = sum(p.numel() for p in fp32.parameters())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 64, 64, generator=gen)
    t = torch.full((2,), 500.0)
    h = torch.randn(2, 77, 768, generator=gen)
    ours = TorchUNet(copy.deepcopy(fp32).to(torch_dtype(precision)), torch_dtype(precision), SD1)
    cond = Conditioning(h)
    variants = {"diffusers-fp32": lambda: fp32(x, t, encoder_hidden_states=h),
                f"ours-auto ({precision})": lambda: ours.predict(x, t, cond)}
    skipped = {}
    if native_bf16 or include_emulated:
        bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
        variants["diffusers-bf16"] = lambda: bf16(x.bfloat16(), t, encoder_hidden_states=h.bfloat16())
    else:
        skipped["diffusers-bf16"] = ("this CPU has no native bf16 (AVX512-BF16/AMX): bf16 is emulated, slower than "
                                     "fp32; --include-emulated-bf16 times it anyway")
        print(f"skipping diffusers-bf16: {skipped['diffusers-bf16']}", flush=True)
    return variants, skipped, params, (fp32, ours)


def time_rounds(variants: dict, rounds: int) -> dict[str, list[float]]:
    """Each variant once per round, order rotated per round; every call is announced before it runs."""
    times = {k: [] for k in variants}
    names = list(variants)
    with torch.inference_mode():
        for name, fn in variants.items():
            print(f"warm-up {name}: {STEP}...", flush=True)
            fn()
        for r in range(rounds):
            # The order rotates every round, so no variant always runs after the same neighbour.
            for name in names[r % len(names):] + names[:r % len(names)]:
                print(f"round {r + 1}/{rounds} {name}: timing {STEP}...", end=" ", flush=True)
                times[name].append(timed(variants[name]))
                print(f"{times[name][-1]:.2f} s", flush=True)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quality-steps", type=int, default=8)
    ap.add_argument("--name", default="torch_step_cpu")
    ap.add_argument("--include-emulated-bf16", action="store_true",
                    help="time the bf16 variant even on a CPU without native bf16 (slow)")
    args = ap.parse_args()

    load_before = load_average()
    native_bf16 = cpu_has_native_bf16()
    precision = resolve_precision("auto", "cpu")
    variants, skipped, params, (fp32, ours) = build_variants(precision, native_bf16, args.include_emulated_bf16)
    times = time_rounds(variants, args.rounds)

    # On a shared machine the speed drifts over minutes: a ratio is taken within each round (its
    # runs are seconds apart), then the median over rounds.
    ours_key = f"ours-auto ({precision})"
    ratios = {f"ours/{base}": float(np.median([o / b for o, b in zip(times[ours_key], times[base])]))
              for base in ("diffusers-fp32", "diffusers-bf16") if base in times}
    print("ratios (median of per-round ratios):", {k: round(v, 3) for k, v in ratios.items()})

    quality = {}
    if args.quality_steps:
        print(f"quality: {args.quality_steps} euler steps in fp32 and in {precision} from one seed...", flush=True)
        ref = final_latents(TorchUNet(fp32, torch.float32, SD1), args.quality_steps)
        got = final_latents(ours, args.quality_steps)
        quality = {"sampler": "euler", "steps": args.quality_steps, "precision": precision,
                   "final_latent_psnr_db_vs_fp32": round(psnr(got, ref), 2)}
        print("quality:", quality)

    result = {
        "benchmark": "unet_step_torch_cpu",
        "model": f"SD1.5 UNet architecture, random weights, {params / 1e6:.1f} M parameters",
        "shape": {"sample": [2, 4, 64, 64], "encoder_hidden_states": [2, 77, 768], "image": "512x512"},
        "machine": machine_info(),
        "load_average_before": load_before,
        "busy": busy_note(load_before),
        "step_seconds": {k: summarize(v) for k, v in times.items()},
        "native_bf16": native_bf16,
        "skipped": skipped,
        "ratios": ratios,
        "ratio_method": "median over rounds of the ratio within each round (variant order rotated per round)",
        "targets": {"ours/diffusers-fp32": "<= 0.6", "ours/diffusers-bf16": "<= 1.0"},
        "quality": quality,
        "peak_rss_gib": round(peak_rss_gib(), 2),
    }
    print("wrote", write_result(args.name, result))


if __name__ == "__main__":
    main()
