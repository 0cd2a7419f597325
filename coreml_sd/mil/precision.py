"""How MIL value types map to torch dtypes in the two precision modes.

* `exact` reproduces what Core ML's fp16 execution stores: every op computes in fp32, and an op
  whose output type is fp16 has its result rounded to fp16 once. Use it to verify a converted
  package. fp16 values are *stored* as fp16 tensors: ops whose torch kernels already compute
  fp16 tensors in fp32 and round once (`HALF_NATIVE_OPS`: elementwise arithmetic, activations,
  reductions, softmax) run on them directly; every other op (convolution, matmul, einsum,
  norms ...) gets its fp16 inputs upcast to fp32 and its result rounded back. The result is the
  same rule as computing everything in fp32 and rounding each output, at half the memory traffic
  and without an fp32 copy of the weights.
* `fast` runs fp16-typed ops in a compute dtype chosen for speed (bf16 on CPUs with bf16
  instructions, fp16 on GPUs, else fp32). fp32-typed ops stay fp32: the program asked for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coreml_sd.errors import InputError, choices_text

PRECISION_MODES = ("exact", "fast")
FAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# MIL element types of values that flow between ops. Sub-byte and narrow integer types occur only
# as inputs of the weight-decompression ops; numpy already holds them widened (uint4 -> uint8).
_FIXED = {
    "fp32": torch.float32,
    "fp64": torch.float64,
    "int32": torch.int32,
    "int64": torch.int64,
    "int16": torch.int16,
    "uint16": torch.int32,  # torch's uint16 has too few kernels; values fit in int32
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int4": torch.int8,
    "uint1": torch.uint8,
    "uint2": torch.uint8,
    "uint3": torch.uint8,
    "uint4": torch.uint8,
    "uint6": torch.uint8,
    "bool": torch.bool,
}


# Op types whose torch kernels, given fp16 tensors, compute in fp32 and round the result to fp16
# once: running them on fp16 storage is exact mode's rule itself (tests/test_mil_ops.py checks each
# against fp32 compute + one rounding; softmax may differ by 1 ulp, its exp/sum order).
# Ops that only move values (keeps_values) also run on fp16 storage.
HALF_NATIVE_OPS = frozenset({
    "add", "sub", "mul", "real_div", "maximum", "minimum", "pow", "abs", "square", "sqrt", "exp", "tanh",
    "sin", "cos", "relu", "sigmoid", "silu", "gelu", "softmax", "reduce_mean", "reduce_sum", "reduce_max",
    "reduce_min", "select",
})


@dataclass(frozen=True)
class Precision:
    mode: str  # "exact" | "fast"
    half: torch.dtype  # dtype holding fp16-typed values

    def __post_init__(self):
        if self.mode not in PRECISION_MODES:
            raise InputError(f"precision mode {self.mode!r} is unknown; valid: {choices_text(PRECISION_MODES)}")

    @property
    def exact(self) -> bool:
        return self.mode == "exact"

    def exact_compute(self, op_type: str, keeps_values: bool) -> torch.dtype:
        """exact mode: the dtype an op with fp16 outputs computes in (see the module docstring)."""
        return self.half if keeps_values or op_type in HALF_NATIVE_OPS else torch.float32

    def torch_dtype(self, mil_dtype: str) -> torch.dtype:
        if mil_dtype == "fp16":
            return self.half
        try:
            return _FIXED[mil_dtype]
        except KeyError:
            raise InputError(
                f"MIL value type {mil_dtype!r} has no torch equivalent here; "
                f"known: fp16, {choices_text(_FIXED)}"
            ) from None

    def describe(self) -> str:
        if self.mode == "exact":
            return "exact (fp32 compute, fp16 rounding)"
        return f"fast ({_dtype_name(self.half)} for fp16 ops)"


def make_precision(mode: str, device: torch.device, fast_dtype: str | None = None) -> Precision:
    """`fast_dtype` None picks: fp16 on cuda/mps, bf16 on CPUs with native bf16, else fp32."""
    if mode not in PRECISION_MODES:
        raise InputError(f"precision mode {mode!r} is unknown; valid: {choices_text(PRECISION_MODES)}")
    if mode == "exact":
        if fast_dtype is not None:
            raise InputError("fast_dtype applies to precision mode 'fast' only; exact computes in fp32")
        return Precision("exact", torch.float16)
    if fast_dtype is None:
        from coreml_sd.devices import cpu_has_native_bf16

        if device.type in ("cuda", "mps"):
            fast_dtype = "fp16"
        else:
            fast_dtype = "bf16" if cpu_has_native_bf16() else "fp32"
    if fast_dtype not in FAST_DTYPES:
        raise InputError(f"fast dtype {fast_dtype!r} is unknown; valid: {choices_text(FAST_DTYPES)}")
    return Precision("fast", FAST_DTYPES[fast_dtype])


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in FAST_DTYPES.items()}.get(dtype, str(dtype))
