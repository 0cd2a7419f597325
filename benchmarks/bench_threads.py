"""Torch CPU threads against model size: one UNet call of a small and a mid-size model at 1 and N threads.

Checks `coreml_sd.threads.choose_threads` on the machine at hand: the built-in model (3 M
parameters, 4x4 latents) and an SD 1.5-shaped UNet at half width (about 220 M parameters, 64x64
latents, random weights). Thread counts alternate within each round, so a machine whose load
changes during the run slows both alike; the load average is recorded before and after.
Usage: python -m benchmarks.bench_threads [--rounds 5] [--small-calls 20] [--mid-calls 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.common import SD15_UNET, machine_info, summarize, write_result
from coreml_sd.bench.machine import load_average
from coreml_sd.threads import choose_threads, physical_cores


def builtin_case():
    from coreml_sd.sources import open_model

    source = open_model(None)
    unet = source.torch_modules(device="cpu", dtype=torch.float32).unet
    c, s = unet.config.in_channels, unet.config.sample_size
    dim = unet.config.cross_attention_dim
    return unet, (torch.randn(2, c, s, s), torch.full((2,), 500.0), torch.randn(2, 77, dim))


def mid_case():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    config = dict(SD15_UNET, block_out_channels=(160, 320, 640, 640))
    unet = UNet2DConditionModel(**config).eval().requires_grad_(False)
    return unet, (torch.randn(2, 4, 64, 64), torch.full((2,), 500.0), torch.randn(2, 77, 768))


def time_calls(unet, inputs, calls: int) -> float:
    x, t, h = inputs
    start = time.perf_counter()
    for _ in range(calls):
        unet(x, t, encoder_hidden_states=h)
    return (time.perf_counter() - start) / calls


def measure(name: str, unet, inputs, counts: list[int], rounds: int, calls: int) -> dict:
    params = sum(p.numel() for p in unet.parameters())
    times = {n: [] for n in counts}
    with torch.inference_mode():
        for n in counts:  # warm-up at each count (oneDNN builds its kernels per thread count)
            torch.set_num_threads(n)
            time_calls(unet, inputs, 1)
        for r in range(rounds):
            for n in counts if r % 2 == 0 else counts[::-1]:
                torch.set_num_threads(n)
                times[n].append(time_calls(unet, inputs, calls))
                print(f"round {r + 1}/{rounds} {name}: {calls} UNet call(s) at {n} thread(s): "
                      f"{times[n][-1] * 1e3:.1f} ms per call", flush=True)
    best = min(counts, key=lambda n: float(np.median(times[n])))
    chosen = choose_threads(params, physical_cores(), load_average()[0] if load_average() else 0.0)
    return {"parameters": params, "input_shape": list(inputs[0].shape),
            "seconds_per_call": {str(n): summarize(v) for n, v in times.items()},
            "fastest_threads": best, "choose_threads": chosen}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--small-calls", type=int, default=20)
    ap.add_argument("--mid-calls", type=int, default=2)
    ap.add_argument("--name", default="threads_builtin")
    args = ap.parse_args()
    counts = sorted({1, physical_cores(), torch.get_num_threads()})
    load_before = load_average()
    cases = {"builtin": (builtin_case, args.small_calls), "sd15-half-width": (mid_case, args.mid_calls)}
    models = {}
    for name, (make, calls) in cases.items():
        unet, inputs = make()
        models[name] = measure(name, unet, inputs, counts, args.rounds, calls)
        print(name, {k: v for k, v in models[name].items() if k != "seconds_per_call"}, flush=True)
    result = {
        "benchmark": "torch_cpu_threads",
        "what": "one UNet call (batch 2, fp32, inference mode) per thread count, counts alternating within rounds",
        "machine": machine_info(), "load_average_before": load_before, "load_average_after": load_average(),
        "thread_counts": counts, "models": models,
    }
    print("wrote", write_result(args.name, result))


if __name__ == "__main__":
    main()
