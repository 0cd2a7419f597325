"""One SD1.5 UNet step (batch 2 for guidance, 512x512) on our torch backend, eager and compiled,
next to diffusers in fp32 and bf16.

Measured side by side in one process, the order of the variants rotated every round, so a busy
machine slows all variants alike and the ratios (taken within each round, then the median) stay
meaningful:

  diffusers-fp32   StableDiffusionPipeline's default on a CPU: the UNet in fp32
  diffusers-bf16   the same UNet cast to bf16 by hand
  ours-eager       coreml_sd's torch backend, --precision auto (bf16 on CPUs with native bf16)
  ours-compiled    the same with --compile MODE (torch.compile, inductor; torch_compile.py)

The compiled variant's first call is its compile (recorded: cold, from an empty cache folder).
Then, each in a fresh process: the compiled UNet's first call again with the cache filled by the
first process (what a second launch pays), and the time to a first image from a cold start
(`Pipeline.load` to the decoded image, `--image-steps` Euler a steps) eager, compiled with an
empty cache and compiled from the cache. Then a short sampling loop in fp32 and in our auto
precision (eager and compiled) from the same seed: the final-latent PSNR each costs. Random
weights (latency does not depend on them).

Every timed call is announced before it runs. On a CPU without native bf16 (AVX2-only)
diffusers-bf16 is emulated, slower than fp32 by minutes per step: it is skipped and the result says
so, unless --include-emulated-bf16. `--mode off` leaves the compiled variant out.

    python -m benchmarks.bench_torch_step --rounds 5 --mode default --quality-steps 8 --image-steps 8
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine_info, peak_rss_gib, sd15_unet, summarize, write_result
from coreml_sd.bench.machine import busy_note, load_average
from coreml_sd.devices import cpu_has_native_bf16, resolve_precision

MODEL = Path(os.environ.get("TMPDIR", "/tmp")) / "coreml-sd-bench" / "sd15-random-diffusers"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def final_latents(unet, steps: int, seed: int = 0) -> np.ndarray:
    import torch

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


def _inputs():
    import torch

    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 64, 64, generator=gen), torch.full((2,), 500.0), torch.randn(2, 77, 768, generator=gen)


STEP = "one SD1.5 UNet step (batch 2, 64x64 latents = 512x512)"


def steps_phase(args) -> dict:
    """The variants in rotated rounds, every call announced before it runs; the compiled one's first
    call is its (cold) compile. bf16 without native instructions is emulated, several times slower
    than fp32 (minutes per step), so it is skipped unless asked."""
    import torch

    from coreml_sd.backends.torch_backend import TorchUNet
    from coreml_sd.backends.torch_compile import compile_unet
    from coreml_sd.conditioning import Conditioning
    from coreml_sd.devices import torch_dtype
    from coreml_sd.families import SD1

    precision = resolve_precision("auto", "cpu")
    dtype = torch_dtype(precision)
    print(f"building the SD1.5 UNet (random weights) in fp32 and {precision}...", flush=True)
    fp32 = sd15_unet()
    params = sum(p.numel() for p in fp32.parameters())
    eager = TorchUNet(copy.deepcopy(fp32).to(dtype), dtype, SD1)
    x, t, h = _inputs()
    cond = Conditioning(h)
    variants = {"diffusers-fp32": lambda: fp32(x, t, encoder_hidden_states=h)}
    skipped = {}
    if cpu_has_native_bf16() or args.include_emulated_bf16:
        bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
        variants["diffusers-bf16"] = lambda: bf16(x.bfloat16(), t, encoder_hidden_states=h.bfloat16())
    else:
        skipped["diffusers-bf16"] = ("this CPU has no native bf16 (AVX512-BF16/AMX): bf16 is emulated, slower than "
                                     "fp32; --include-emulated-bf16 times it anyway")
        print(f"skipping diffusers-bf16: {skipped['diffusers-bf16']}", flush=True)
    variants[f"ours-eager ({precision})"] = lambda: eager.predict(x, t, cond)
    compiled, compile_s, close = None, None, {}
    if args.mode != "off":
        compiled = TorchUNet(compile_unet(copy.deepcopy(fp32).to(dtype), args.mode, device="cpu"), dtype, SD1)
        variants[f"ours-compiled ({precision}, {args.mode})"] = lambda: compiled.predict(x, t, cond)
    names = list(variants)
    with torch.inference_mode():
        if compiled is not None:
            print(f"compiling: the compiled variant's first call ({STEP}, cold cache)...", flush=True)
            compile_s = timed(variants[names[-1]])
            print(f"compiled first call (compile, cold cache): {compile_s:.1f} s", flush=True)
        for name in names:
            print(f"warm-up {name}: {STEP}...", flush=True)
            variants[name]()
        times = {k: [] for k in variants}
        for r in range(args.rounds):
            # The order rotates every round, so no variant always runs after the same neighbour.
            for name in names[r % len(names):] + names[:r % len(names)]:
                print(f"round {r + 1}/{args.rounds} {name}: timing {STEP}...", end=" ", flush=True)
                times[name].append(timed(variants[name]))
                print(f"{times[name][-1]:.2f} s", flush=True)
        if compiled is not None:
            close = {"compiled_vs_eager_psnr_db": _psnr(compiled.predict(x, t, cond), eager.predict(x, t, cond))}
    quality = {}
    if args.quality_steps:
        print(f"quality: {args.quality_steps} euler steps in fp32 and in {precision} from one seed...", flush=True)
        ref = final_latents(TorchUNet(fp32, torch.float32, SD1), args.quality_steps)
        got = {"ours-eager": round(_psnr(final_latents(eager, args.quality_steps), ref), 2)}
        if compiled is not None:
            got["ours-compiled"] = round(_psnr(final_latents(compiled, args.quality_steps), ref), 2)
        quality = {"sampler": "euler", "steps": args.quality_steps, "precision": precision,
                   "final_latent_psnr_db_vs_fp32": got}
    return {"params": params, "precision": precision, "step_times": times, "compile_cold_s": compile_s,
            "one_step": close, "quality": quality, "peak_rss_gib": peak_rss_gib(), "skipped": skipped}


def _psnr(a, ref) -> float:
    from coreml_sd.metrics import psnr

    return float(psnr(np.asarray(ref, dtype=np.float64), np.asarray(a, dtype=np.float64)))


def relaunch_phase(args) -> dict:
    """A fresh process: the compiled UNet's first call with the cache the steps phase filled."""
    import torch

    from coreml_sd.backends.torch_compile import compile_unet

    start = time.perf_counter()
    module = compile_unet(sd15_unet().to(torch.bfloat16), args.mode, device="cpu")
    x, t, h = _inputs()
    with torch.inference_mode():
        first = timed(lambda: module(x.bfloat16(), t, encoder_hidden_states=h.bfloat16()))
    from torch._dynamo.utils import counters

    hits = {k: v for group in ("inductor", "aot_autograd") for k, v in counters[group].items() if "cache" in k}
    return {"first_call_s": first, "since_start_s": time.perf_counter() - start, "cache": hits}


def image_phase(args) -> dict:
    """A fresh process: Pipeline.load to the first decoded image (text encoding, steps, decoding)."""
    from coreml_sd.pipeline import Pipeline

    start = time.perf_counter()
    pipe = Pipeline.load(args.model, backend="torch", device="cpu", compile=args.compile)
    loaded = time.perf_counter()
    pipe("a photograph of an astronaut riding a horse", seed=0, steps=args.image_steps)
    done = time.perf_counter()
    return {"compile": args.compile, "load_s": loaded - start, "generate_s": done - loaded,
            "first_image_s": done - start, "steps": args.image_steps, "runs_on": dict(pipe.components.runs_on)}


def _phase(name: str, args, extra: list[str], env: dict | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, "-m", "benchmarks.bench_torch_step", "--phase", name, "--phase-out", str(out),
               "--mode", args.mode, "--image-steps", str(args.image_steps), "--model", str(args.model), *extra]
        print(f"[bench_torch_step] {name}: {' '.join(extra)}", flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, **(env or {})}, cwd=Path(__file__).resolve().parents[1])
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mode", default="default", help="torch.compile mode of the compiled variant (off: none)")
    ap.add_argument("--include-emulated-bf16", action="store_true",
                    help="time the bf16 variant even on a CPU without native bf16 (slow)")
    ap.add_argument("--quality-steps", type=int, default=8)
    ap.add_argument("--image-steps", type=int, default=8, help="Euler a steps of the first-image timing (0: skip)")
    ap.add_argument("--model", type=Path, default=MODEL, help="diffusers folder for the first-image timing")
    ap.add_argument("--name", default="torch_step_cpu")
    ap.add_argument("--phase", choices=("relaunch", "image"), help=argparse.SUPPRESS)
    ap.add_argument("--phase-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--compile", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        phase = {"relaunch": relaunch_phase, "image": image_phase}[args.phase]
        args.phase_out.write_text(json.dumps(phase(args)))
        return
    load_start = load_average()
    relaunch, images = {}, {}
    with tempfile.TemporaryDirectory(prefix="coreml-sd-inductor-") as cache:
        # Empty: the steps phase (in this process) compiles cold; the relaunch reads what it wrote.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        steps = steps_phase(args)
        env = {"TORCHINDUCTOR_CACHE_DIR": cache}
        if args.mode != "off":
            relaunch = _phase("relaunch", args, [], env)
        if args.image_steps and args.model.exists():
            images["eager"] = _phase("image", args, [])
            if args.mode != "off":
                images["compiled, cached"] = _phase("image", args, ["--compile", args.mode], env)
                with tempfile.TemporaryDirectory(prefix="coreml-sd-inductor-") as empty:
                    images["compiled, cold"] = _phase("image", args, ["--compile", args.mode],
                                                      {"TORCHINDUCTOR_CACHE_DIR": empty})
    times = steps["step_times"]
    ours = [n for n in times if n.startswith("ours-")]
    bases = [n for n in times if n.startswith("diffusers-")]
    # On a shared machine the speed drifts over minutes: a ratio is taken within each round (its
    # runs are seconds apart), then the median over rounds.
    ratios = {f"{a}/{b}": float(np.median([x / y for x, y in zip(times[a], times[b])])) for a in ours for b in bases}
    if len(ours) == 2:
        ratios[f"{ours[1]}/{ours[0]}"] = float(np.median([x / y for x, y in zip(times[ours[1]], times[ours[0]])]))
    print("ratios (median of per-round ratios):", {k: round(v, 3) for k, v in ratios.items()})
    load_end = load_average()
    result = {
        "benchmark": "unet_step_torch_cpu",
        "command": "python -m benchmarks.bench_torch_step " + " ".join(sys.argv[1:]),
        "model": f"SD1.5 UNet architecture, random weights, {steps['params'] / 1e6:.1f} M parameters",
        "shape": {"sample": [2, 4, 64, 64], "encoder_hidden_states": [2, 77, 768], "image": "512x512"},
        "machine": machine_info(),
        "load_average_start_end": [load_start, load_end],
        "busy": busy_note(load_start),
        "native_bf16": cpu_has_native_bf16(),
        "skipped": steps["skipped"],
        "compile_mode": args.mode,
        "step_seconds": {k: summarize(v) for k, v in times.items()},
        "ratios": ratios,
        "ratio_method": "median over rounds of the ratio within each round (variant order rotated per round)",
        "targets": {f"{ours[-1]}/diffusers-bf16": "<= 0.8"},
        "compile": {"first_call_cold_cache_s": steps["compile_cold_s"],
                    "first_call_second_launch_s": relaunch.get("first_call_s"),
                    "second_launch_cache": relaunch.get("cache")},
        "first_image": images,
        "compiled_vs_eager_one_step_psnr_db": steps["one_step"].get("compiled_vs_eager_psnr_db"),
        "quality": steps["quality"],
        "peak_rss_gib_steps_phase": round(steps["peak_rss_gib"], 2),
    }
    print("wrote", write_result(args.name, result))


if __name__ == "__main__":
    main()
