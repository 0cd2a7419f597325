"""The mil executor on a UNet made by `coreml-sd convert`: fused against op by op, next to torch.

One SD 1.5-architecture UNet step (batch 2, 512x512) in the mil executor's fast mode, with its op
fusions (attention as SDPA, GroupNorm / LayerNorm as single kernels) and without, next to the
same weights as a diffusers UNet in torch eager at the same precision — in one process, the
order rotated every round, each ratio taken within a round and the median kept (this VM's speed
drifts over minutes).

    python -m benchmarks.bench_mil_fusion --model DIR [--rounds 5] [--dtype bf16]

DIR: a folder written by `coreml-sd convert` (its manifest names the source diffusers folder,
whose UNet is the torch side); `coreml-sd bench` leaves one for the random SD 1.5 model in the
cache folder's `bench/converted/`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine_info, peak_rss_gib, summarize, write_result
from coreml_sd.metrics import psnr
from coreml_sd.mil.executor import Executor
from coreml_sd.mil.package import load_program


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--name", default="mil_fusion_sd15_cpu")
    args = ap.parse_args()

    from diffusers import UNet2DConditionModel

    manifest = json.loads((args.model / "manifest.json").read_text())
    source = Path(manifest["source"]["path"])
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    program = load_program(args.model / "Unet.mlpackage")
    fused = Executor(program, precision_mode="fast", fast_dtype=args.dtype)
    plain = Executor(program, precision_mode="fast", fast_dtype=args.dtype, fuse=False)
    unet = UNet2DConditionModel.from_pretrained(source / "unet", torch_dtype=dtype).eval()

    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, 64, 64)).astype(np.float32)
    context = rng.standard_normal((2, 77, 768)).astype(np.float32)
    timestep = np.full((2,), 500.0, dtype=np.float32)
    feeds = {"sample": sample, "timestep": timestep,
             "encoder_hidden_states": context.transpose(0, 2, 1)[:, :, None, :]}  # (B, C, 1, S) as DESIGN
    names = {s.name for s in fused.inputs}
    assert names == set(feeds), f"unexpected UNet inputs {sorted(names)}"
    x, t, h = (torch.from_numpy(a).to(dtype) for a in (sample, timestep, context))

    variants = {
        "mil fused": lambda: fused(feeds),
        "mil op by op": lambda: plain(feeds),
        f"torch eager {args.dtype}": lambda: unet(x, t, encoder_hidden_states=h),
    }
    times = {k: [] for k in variants}
    order = list(variants)
    with torch.inference_mode():
        outs = {k: fn() for k, fn in variants.items()}  # warm-up, and the outputs compared below
        for r in range(args.rounds):
            for name in order[r % 3:] + order[:r % 3]:
                start = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - start)
                print(f"round {r + 1} {name}: {times[name][-1]:.2f} s", flush=True)

    def ratio(a, b):
        return float(np.median([x / y for x, y in zip(times[a], times[b])]))

    torch_key = f"torch eager {args.dtype}"
    ratios = {"mil fused / mil op by op": ratio("mil fused", "mil op by op"),
              f"mil fused / {torch_key}": ratio("mil fused", torch_key),
              f"mil op by op / {torch_key}": ratio("mil op by op", torch_key)}
    print("ratios (median of per-round ratios):", {k: round(v, 3) for k, v in ratios.items()})

    def out(v):
        v = next(iter(v.values())) if isinstance(v, dict) else v.sample
        return v.float().numpy()

    ref = out(outs[torch_key])
    agreement = {}
    for k in ("mil fused", "mil op by op"):
        agreement[k] = round(psnr(ref, out(outs[k])), 2)
    print("PSNR against torch (dB):", agreement)

    result = {
        "benchmark": "mil_unet_step_fusion",
        "command": f"python -m benchmarks.bench_mil_fusion --model {args.model} --rounds {args.rounds} --dtype {args.dtype}",
        "model": {"folder": str(args.model), "attention": manifest.get("attention"),
                  "weights": manifest.get("weights") or manifest.get("compression"), "source": str(source)},
        "shape": {"sample": [2, 4, 64, 64], "encoder_hidden_states": [2, 768, 1, 77], "image": "512x512"},
        "fast_dtype": args.dtype,
        "fusions": fused.fused,
        "machine": machine_info(),
        "step_seconds": {k: summarize(v) for k, v in times.items()},
        "ratios": ratios,
        "ratio_method": "median over rounds of the ratio within each round (order rotated per round)",
        "psnr_db_vs_torch": agreement,
        "peak_rss_gib": round(peak_rss_gib(), 2),
    }
    print("wrote", write_result(args.name, result))


if __name__ == "__main__":
    main()
