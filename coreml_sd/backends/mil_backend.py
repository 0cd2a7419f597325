"""The mil backend: converted Core ML packages executed with torch kernels on cpu, cuda or mps.

The components are the shared package adapters of `coreml_sd.backends.packages` (Apple's tensor
contract <-> diffusers conventions, fixed-batch splitting, UNet chunks, input checks) over a
`MilRunner`, the package runner whose call is the `mil` executor. Arrays come back as torch tensors
on the executor's device.

`load_mil_component(path, role, device=..., precision_mode=...)` builds one component.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from coreml_sd import arrays
from coreml_sd.backends.packages import PackageChain, adapt, check_role, fixed_batch
from coreml_sd.memory import mmap_large_allocations, release_memory
from coreml_sd.mil.executor import Executor
from coreml_sd.mil.package import load_program

__all__ = ["MilRunner", "load_mil_component", "load_mil_runner"]


class MilRunner:
    """Package runner over one `mil` executor: feeds and outputs are torch tensors on its device."""

    def __init__(self, executor: Executor):
        self.executor = executor
        self.executors = [executor]
        self.name = executor.path.name
        self.inputs, self.outputs = executor.inputs, executor.outputs
        self.device = executor.device

    @property
    def batch_size(self) -> int | None:
        return fixed_batch(self.inputs)

    def native(self, value, dtype: str) -> torch.Tensor:
        """A tensor on the executor's device; floats stay float32 (the executor rounds fp16 inputs
        itself in exact mode), integers become int32, as the ML program's types are."""
        tensor = value if arrays.is_torch(value) else torch.from_numpy(np.ascontiguousarray(value))
        if dtype.startswith("fp"):
            target = tensor.dtype if tensor.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
        else:
            target = torch.bool if dtype == "bool" else torch.int32
        return tensor.to(device=self.device, dtype=target)

    def run(self, feeds: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return self.executor(feeds)

    def describe(self) -> str:
        return self.executor.describe()


def load_mil_runner(package_path, *, device: str = "auto", precision_mode: str = "fast",
                    fast_dtype: str | None = None) -> PackageChain:
    """The package(s) at `package_path` (a path, or chunk paths in order) as one runner."""
    from coreml_sd.devices import resolve_device

    paths = [package_path] if isinstance(package_path, (str, Path)) else list(package_path)
    device = resolve_device(device)
    mmap_large_allocations()  # activations freed go back to the OS (coreml_sd.memory)
    runners = []
    for path in paths:
        # The loaded program (coremltools graph + numpy weights) is dropped once compiled.
        runners.append(MilRunner(Executor(load_program(path), device=device, precision_mode=precision_mode,
                                          fast_dtype=fast_dtype)))
        release_memory()
    return PackageChain(runners)


def load_mil_component(package_path, role: str, *, device: str = "auto", precision_mode: str = "fast",
                       fast_dtype: str | None = None):
    """A backend component executing the Core ML package(s) at `package_path` with torch kernels.

    `role`: text_encoder | unet | vae_decoder | vae_encoder. For a chunked UNet pass the chunk
    packages in order. `precision_mode`: `exact` (Core ML's fp16 rounding, to verify) or `fast`
    (`fast_dtype` bf16/fp16/fp32, default chosen for the device).
    """
    check_role(role)
    return adapt(load_mil_runner(package_path, device=device, precision_mode=precision_mode, fast_dtype=fast_dtype),
                 role)
