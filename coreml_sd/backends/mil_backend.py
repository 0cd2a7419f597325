"""The mil backend: converted Core ML packages executed with torch kernels on cpu, cuda or mps.

The components are the shared package adapters of `coreml_sd.backends.packages` (Apple's tensor
contract <-> diffusers conventions, fixed-batch splitting, UNet chunks, input checks) over a
`MilRunner`, the package runner whose call is the `mil` executor. Arrays come back as torch tensors
on the executor's device.

`load_mil_component(path, kind, device=..., precision_mode=...)` builds one component;
`components_from_packages(...)` builds the three the pipeline needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from coreml_sd import arrays
from coreml_sd.backends import Components
from coreml_sd.backends.packages import KINDS, PackageChain, adapt, check_kind, fixed_batch
from coreml_sd.mil.executor import Executor, release_freed_memory
from coreml_sd.mil.package import load_program

__all__ = ["KINDS", "MilRunner", "components_from_packages", "load_mil_component", "load_mil_runner"]


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
    runners = []
    for path in paths:
        # The loaded program (coremltools graph + numpy weights) is dropped once compiled.
        runners.append(MilRunner(Executor(load_program(path), device=device, precision_mode=precision_mode,
                                          fast_dtype=fast_dtype)))
        release_freed_memory()
    return PackageChain(runners)


def load_mil_component(package_path, kind: str, *, device: str = "auto", precision_mode: str = "fast",
                       fast_dtype: str | None = None):
    """A backend component executing the Core ML package(s) at `package_path` with torch kernels.

    `kind`: text_encoder | unet | vae_decoder | vae_encoder. For a chunked UNet pass the chunk
    packages in order. `precision_mode`: `exact` (Core ML's fp16 rounding, to verify) or `fast`
    (`fast_dtype` bf16/fp16/fp32, default chosen for the device).
    """
    check_kind(kind)
    return adapt(load_mil_runner(package_path, device=device, precision_mode=precision_mode, fast_dtype=fast_dtype),
                 kind)


def torch_asarray(device) -> Any:
    """numpy -> a torch tensor on `device` (the sampling loop's arrays when the UNet runs on torch)."""
    def asarray(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    return asarray


def components_from_packages(text_encoder, unet, vae_decoder, *, device: str = "auto", precision_mode: str = "fast",
                             fast_dtype: str | None = None) -> Components:
    """The pipeline's three components from package paths (`unet` may be a list of chunks)."""
    kwargs = dict(device=device, precision_mode=precision_mode, fast_dtype=fast_dtype)
    parts = {
        "text_encoder": load_mil_component(text_encoder, "text_encoder", **kwargs),
        "unet": load_mil_component(unet, "unet", **kwargs),
        "vae_decoder": load_mil_component(vae_decoder, "vae_decoder", **kwargs),
    }
    target = parts["unet"].package.runners[0].device
    return Components(asarray=torch_asarray(target), runs_on={k: v.runs_on for k, v in parts.items()}, **parts)
