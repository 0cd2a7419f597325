"""`torch.compile` for the torch backend's UNet, for GPUs where eager diffusers is launch-bound.

At batch 2 (the guidance pair) an SD 1.5 UNet step in eager fp16 costs about 26 ms on an H100
while its arithmetic needs about 1.6 ms: most of the step is Python and one kernel launch per
op (~1,000 launches). What closes that gap, in order of effect:

1. CUDA graphs: the whole step is recorded once and replayed as one launch (inductor's
   `triton.cudagraphs`, which `reduce-overhead` and `max-autotune` turn on). Shapes must stay
   fixed, and they do: the pipeline always calls the UNet with the same batch and size.
2. Inductor's fusions: GroupNorm+SiLU, bias+activation and the residual adds fold into the
   convolution/GEMM epilogues or into one Triton kernel each.
3. channels_last: cuDNN's tensor-core convolutions work in NHWC; in NCHW each one transposes.
4. Fused QKV projections: one GEMM for q, k and v of each self-attention instead of three
   (diffusers' `fuse_qkv_projections`); attention itself stays torch's fused SDPA (flash).
5. 1x1 convolutions as matrix multiplies (`conv_1x1_as_mm`): the UNet's proj_in/proj_out and
   shortcut convolutions then use the autotuned GEMM templates.

Compilation happens at the first call (a minute or more; `max-autotune` several): benchmarks
warm up before timing. On a CPU the torch backend stays eager (bf16 where the CPU has native
bf16); compiling is allowed there too but is not the default. The mode names are
importable without torch (the CLI lists them).
"""

from __future__ import annotations

import logging

from coreml_sd.errors import InputError, choices_text

log = logging.getLogger(__name__)

# mode -> inductor options (torch.compile takes a mode or options, not both: these are the
# modes' own settings plus the SD-specific ones above).
COMPILE_MODES: dict[str, dict] = {
    "default": {"conv_1x1_as_mm": True},
    "reduce-overhead": {"conv_1x1_as_mm": True, "triton.cudagraphs": True},
    "max-autotune": {"conv_1x1_as_mm": True, "triton.cudagraphs": True, "max_autotune": True,
                     "coordinate_descent_tuning": True},
    "max-autotune-no-cudagraphs": {"conv_1x1_as_mm": True, "max_autotune": True, "coordinate_descent_tuning": True},
}


def check_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise InputError(f"unknown torch compile mode {mode!r}; valid modes: {choices_text(COMPILE_MODES)}")
    return mode


def uses_cuda_graphs(mode: str, device: str) -> bool:
    return device == "cuda" and bool(COMPILE_MODES[check_mode(mode)].get("triton.cudagraphs"))


def compile_unet(unet, mode: str, *, device: str, backend: str = "inductor"):
    """Prepare `unet` (in place) and return its compiled module. `backend` is torch.compile's
    (tests use "eager" to check the preparation without waiting for inductor)."""
    import torch

    check_mode(mode)
    if hasattr(unet, "fuse_qkv_projections"):
        unet.fuse_qkv_projections()
    if device != "cpu":
        unet.to(memory_format=torch.channels_last)
    options = dict(COMPILE_MODES[mode]) if backend == "inductor" else None
    if options and device != "cuda":
        options.pop("triton.cudagraphs", None)  # CUDA graphs exist only on CUDA
    log.info("compiling the UNet with torch.compile (%s, %s) at its first call", mode, backend)
    return torch.compile(unet, backend=backend, options=options, fullgraph=False, dynamic=False)
