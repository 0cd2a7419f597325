"""Helpers for the mil executor tests: build MIL programs, convert torch modules, compare outputs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from coreml_sd.quiet_imports import import_coremltools

ct = import_coremltools()
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from coreml_sd.mil.executor import Executor  # noqa: E402
from coreml_sd.mil.package import load_program, program_from_function  # noqa: E402

# Where the executor runs in these tests; MIL_TEST_DEVICE=cuda re-runs them on a GPU.
DEVICE = os.environ.get("MIL_TEST_DEVICE", "cpu")

_MIL_TYPES = {
    np.dtype(np.float32): types.fp32,
    np.dtype(np.float16): types.fp16,
    np.dtype(np.int32): types.int32,
    np.dtype(np.bool_): types.bool,
}


def mil_program(body, *arrays, opset=None):
    """A MIL program whose inputs x0, x1 ... have the shapes/dtypes of `arrays`; body(*vars) -> var(s)."""
    opset = opset or ct.target.iOS18
    specs = [mb.TensorSpec(shape=a.shape, dtype=_MIL_TYPES[a.dtype]) for a in arrays]
    names = [f"x{i}" for i in range(len(arrays))]
    # mb.program names inputs after the function's parameters, so build one with the right arity.
    source = f"def fn({', '.join(names)}):\n    return body({', '.join(names)})\n"
    scope = {"body": body}
    exec(source, scope)  # noqa: S102 - test helper generating a fixed-arity signature
    return mb.program(input_specs=specs, opset_version=opset)(scope["fn"])


def run_program(prog, *arrays, mode: str = "exact", fast_dtype: str | None = None):
    """Execute a MIL program's main function; returns its outputs as float64/int numpy arrays."""
    executor = Executor(program_from_function(prog.functions["main"]), precision_mode=mode, fast_dtype=fast_dtype,
                        device=DEVICE)
    outputs = executor({f"x{i}": a for i, a in enumerate(arrays)})
    return [_np(v) for v in outputs.values()]


def run_op(body, *arrays, mode: str = "exact", opset=None, fast_dtype: str | None = None):
    return run_program(mil_program(body, *arrays, opset=opset), *arrays, mode=mode, fast_dtype=fast_dtype)


def _np(tensor):
    tensor = tensor.detach().cpu()
    return tensor.double().numpy() if tensor.is_floating_point() else tensor.numpy()


def psnr(actual, reference) -> float:
    """Peak signal-to-noise ratio in dB, peak = max |reference| (Apple's converter gate's convention)."""
    from coreml_sd.metrics import psnr as _psnr

    return _psnr(reference, actual)


def trace(module, example_inputs):
    import torch

    with torch.no_grad():
        # check_trace would run the module twice more; the parity tests check the result anyway
        return torch.jit.trace(module.eval(), example_inputs, strict=False, check_trace=False)


def convert_module(module, example_inputs, names, out_path: Path, *, precision: str = "fp32",
                   input_dtypes=None, target=None, output_names=None) -> Path:
    """Convert `module` (traced here unless it already is) with plain coremltools to an ML program
    package at `out_path`."""
    import torch

    from benchmarks import coremltools_fixes

    coremltools_fixes.apply()
    traced = module if isinstance(module, torch.jit.ScriptModule) else trace(module, example_inputs)
    dtypes = input_dtypes or [np.float32] * len(names)
    inputs = [ct.TensorType(name=n, shape=tuple(x.shape), dtype=d) for n, x, d in zip(names, example_inputs, dtypes)]
    kwargs = {}
    if output_names:
        kwargs["outputs"] = [ct.TensorType(name=n) for n in output_names]
    model = ct.convert(
        traced,
        inputs=inputs,
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16,
        minimum_deployment_target=target,
        **kwargs,
    )
    model.save(str(out_path))
    return out_path


def run_package(path, feeds: dict, mode: str = "exact", **kwargs) -> dict:
    executor = Executor(load_program(path), precision_mode=mode, device=DEVICE, **kwargs)
    return {k: _np(v) for k, v in executor(feeds).items()}


def op_types(path) -> set[str]:
    return {op.op_type for op in load_program(path).function.operations}
