"""Execute Core ML ML programs (`.mlpackage`, or compiled `.mlmodelc`) with torch kernels, on any OS.

Core ML predicts only on macOS. This package reads a package's ML program with coremltools' own
proto loader (which works on Linux) and runs its `main` function op by op on cpu, cuda or mps:

    from coreml_sd.mil import Executor, load_program

    program = load_program("Unet.mlpackage")
    unet = Executor(program, device="cpu", precision_mode="fast")  # or "exact" to verify
    noise_pred = unet({"sample": x, "timestep": t, "encoder_hidden_states": c})["noise_pred"]

Modules, one concern each: `package` (reading and validating a package), `compiled` (a compiled
model: `mil_text_read` parses its model.mil text into the proto a package holds, `mil_text_write`
prints one, `mil_values` encodes their constants, `blobfile` checks weight.bin), `weights` (weight.bin
memory-mapped, shared with the page cache instead of copied), `registry` (op type ->
kernel builder), `ops/` (the kernels, semantics from coremltools' op definitions), `precision`
(exact/fast dtype rules), `fusion` (fast-mode fused attention and GroupNorm), `compiler` (ops ->
slot-indexed steps), `executor` (constants, input checks, the call loop). The pipeline-facing
components live in `coreml_sd.backends.mil_backend`.

Importing this package imports torch (not coremltools, which loads when a package is read).
"""

from coreml_sd.mil.executor import Executor, materialize_constants
from coreml_sd.mil.package import MilProgram, TensorSpec, load_program, program_from_function
from coreml_sd.mil.precision import PRECISION_MODES
from coreml_sd.mil.registry import Kernel, OpView, UnsupportedOpError, register_op, supported_ops

__all__ = [
    "PRECISION_MODES",
    "Executor",
    "Kernel",
    "MilProgram",
    "OpView",
    "TensorSpec",
    "UnsupportedOpError",
    "load_program",
    "materialize_constants",
    "program_from_function",
    "register_op",
    "supported_ops",
]
