"""One SDXL UNet step (batch 2 for guidance, 1024x1024) on our torch backend next to diffusers, in fp32 and
bf16, and the mil executor on a converted Unet.mlpackage, in one run.

Rounds are interleaved and their order rotates, so a busy machine slows every variant alike; a
ratio is taken within each round, then the median over rounds. The fp32 UNet alone is 10.3 GB, so
the run goes in phases on one module (a 24 GiB machine cannot hold fp32 and bf16 copies and a
mil program at once):

  fp32   diffusers' UNet2DConditionModel called as StableDiffusionXLPipeline calls it
         (added_cond_kwargs text_embeds / time_ids), next to our torch backend's UNet over the
         same module (a Conditioning in, diffusers' arguments out: ours runs diffusers' modules)
  bf16   the same module cast to bf16 in place, both again (skipped on a CPU without native bf16,
         where it is emulated, unless --include-emulated-bf16)
  mil    (--converted FOLDER) the folder's Unet.mlpackage run by the mil executor in fast mode
         (bf16 compute where the CPU has it), next to ours in that precision

Each output is compared with diffusers' fp32 one (PSNR), so a faster variant says what it costs.
Random weights (diffusers' init): latency does not depend on them.

    python -m benchmarks.bench_sdxl_step [--rounds 3] [--converted /tmp/coreml-sd-bench/converted-sdxl-file]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine_info, peak_rss_gib, summarize, write_result
from coreml_sd.bench.machine import busy_note, load_average
from coreml_sd.devices import cpu_has_native_bf16

STEP = "one SDXL UNet step (batch 2, 128x128 latents = 1024x1024)"
NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def sdxl_unet(seed: int = 0):
    """SDXL 1.0 base's UNet (the shipped config) with diffusers' random initialisation, fp32."""
    from diffusers import UNet2DConditionModel

    from coreml_sd.checkpoint.config import shipped_config

    torch.manual_seed(seed)
    return UNet2DConditionModel(**shipped_config("sdxl").unet).eval().requires_grad_(False)


def inputs(unet, seed: int = 0) -> dict:
    """Seeded inputs for `unet` at its native size: latents, timestep, context, pooled text, size time ids."""
    cfg = unet.config
    latent, side = cfg.sample_size, cfg.sample_size * 8
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    gen = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(2, 4, latent, latent, generator=gen), "timestep": torch.full((2,), 500.0),
            "context": torch.randn(2, 77, cfg.cross_attention_dim, generator=gen),
            "text_embeds": torch.randn(2, pooled, generator=gen),
            "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * 2, dtype=torch.float32)}


def conditioning(x: dict):
    from coreml_sd.conditioning import Conditioning

    return Conditioning(x["context"], extra={"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]})


def variants(unet, x: dict, dtype) -> dict:
    """name -> call, at `dtype`: diffusers' call and ours (TorchUNet) on the same module."""
    from coreml_sd.backends.torch_backend import TorchUNet
    from coreml_sd.families import get_family

    cast = {k: v.to(dtype) for k, v in x.items()}
    ours, cond = TorchUNet(unet, dtype, get_family("sdxl")), conditioning(x)

    def theirs():
        return unet(cast["sample"], cast["timestep"], encoder_hidden_states=cast["context"],
                    added_cond_kwargs={"text_embeds": cast["text_embeds"], "time_ids": cast["time_ids"]}).sample

    return {f"diffusers-{NAMES[dtype]}": theirs, f"ours-{NAMES[dtype]}": lambda: ours.predict(x["sample"],
                                                                                             x["timestep"], cond)}


def run_rounds(calls: dict, rounds: int, times: dict) -> dict:
    """Warm up each call, then `rounds` rounds in rotating order, each call announced before it runs;
    returns each call's warm-up output (float32)."""
    outputs = {}
    with torch.inference_mode():
        for name, fn in calls.items():
            print(f"warm-up {name}: {STEP}...", flush=True)
            outputs[name] = fn().float()
            times.setdefault(name, [])
        names = list(calls)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                print(f"round {r + 1}/{rounds} {name}: timing {STEP}...", end=" ", flush=True)
                start = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - start)
                print(f"{times[name][-1]:.2f} s", flush=True)
    return outputs


def ratio(times: dict, a: str, b: str) -> float | None:
    if a not in times or b not in times:
        return None
    return float(np.median([x / y for x, y in zip(times[a], times[b])]))


def mil_phase(folder: Path, x: dict, unet, dtype, rounds: int, times: dict) -> dict:
    """The converted UNet on the mil executor (fast mode) next to ours at `dtype`."""
    from coreml_sd.backends.mil_backend import load_mil_component
    from coreml_sd.backends.torch_backend import TorchUNet
    from coreml_sd.families import get_family

    start = time.perf_counter()
    mil = load_mil_component([Path(folder) / "Unet.mlpackage"], "unet", device="cpu", precision_mode="fast")
    facts = {"load_s": round(time.perf_counter() - start, 1), "runs_on": mil.runs_on,
             "package": str(Path(folder) / "Unet.mlpackage"),
             "note": "the package holds the converted random model's weights, not this module's: latency is "
                     "compared, outputs are not"}
    ours, cond = TorchUNet(unet, dtype, get_family("sdxl")), conditioning(x)
    run_rounds({f"ours-{NAMES[dtype]} (next to mil)": lambda: ours.predict(x["sample"], x["timestep"], cond),
                "mil-fast": lambda: mil.predict(x["sample"], x["timestep"], cond)}, rounds, times)
    return facts


def main() -> None:
    from coreml_sd.metrics import psnr

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--converted", type=Path, default=None, help="a converted SDXL folder: also time mil")
    ap.add_argument("--include-emulated-bf16", action="store_true",
                    help="time bf16 even on a CPU without native bf16 (slow)")
    ap.add_argument("--name", default="sdxl_step_cpu")
    args = ap.parse_args()

    load_before, native_bf16 = load_average(), cpu_has_native_bf16()
    print("building the SDXL UNet (random weights) in fp32...", flush=True)
    unet = sdxl_unet()
    params = sum(p.numel() for p in unet.parameters())
    x, times, skipped = inputs(unet), {}, {}
    outputs = run_rounds(variants(unet, x, torch.float32), args.rounds, times)
    rss_fp32 = peak_rss_gib()
    half = torch.bfloat16 if native_bf16 or args.include_emulated_bf16 else None
    if half is not None:
        unet.to(half)  # in place, parameter by parameter: no second copy
        outputs.update(run_rounds(variants(unet, x, half), args.rounds, times))
    else:
        skipped["bf16"] = "this CPU has no native bf16 (AVX512-BF16/AMX): bf16 is emulated, slower than fp32"
        print(f"skipping bf16: {skipped['bf16']}", flush=True)
    mil = mil_phase(args.converted, x, unet, half or torch.float32, args.rounds, times) if args.converted else {}
    tag = NAMES[half or torch.float32]
    ratios = {"ours/diffusers fp32": ratio(times, "ours-fp32", "diffusers-fp32"),
              "ours/diffusers bf16": ratio(times, "ours-bf16", "diffusers-bf16"),
              "ours bf16/ours fp32": ratio(times, "ours-bf16", "ours-fp32"),
              f"mil/ours {tag}": ratio(times, "mil-fast", f"ours-{tag} (next to mil)")}
    ratios = {k: v for k, v in ratios.items() if v is not None}
    print("ratios (median of per-round ratios):", {k: round(v, 3) for k, v in ratios.items()})
    ref = outputs["diffusers-fp32"].numpy()
    load_after = load_average()
    result = {
        "benchmark": "unet_step_sdxl_torch_cpu",
        "model": f"SDXL 1.0 base UNet architecture, random weights (diffusers init), {params / 1e9:.3f} B parameters",
        "shape": {"sample": list(x["sample"].shape), "encoder_hidden_states": list(x["context"].shape),
                  "text_embeds": list(x["text_embeds"].shape), "time_ids": list(x["time_ids"].shape)},
        "machine": machine_info(),
        "native_bf16": native_bf16,
        "step_seconds": {k: summarize(v) for k, v in times.items()},
        "ratios": ratios,
        "ratio_method": "median over rounds of the ratio within each round (order rotated per round)",
        "targets": {"ours/diffusers fp32": "<= 1.0", "ours/diffusers bf16": "<= 1.0", f"mil/ours {tag}": "<= 1.2"},
        "psnr_db_vs_diffusers_fp32": {k: round(psnr(ref, v.numpy()), 2) for k, v in outputs.items()
                                      if k != "diffusers-fp32"},
        "skipped": skipped,
        "mil": mil,
        "load_average_before_after": [load_before, load_after],
        "busy": busy_note(load_before),
        "peak_rss_gib_fp32_phase": round(rss_fp32, 2),
        "peak_rss_gib": round(peak_rss_gib(), 2),
    }
    print("wrote", write_result(args.name, result))


if __name__ == "__main__":
    main()
