"""The mil backend: converted Core ML packages executed with torch kernels on cpu, cuda or mps.

Each component adapts the package's tensor contract (Apple's names and layouts, see DESIGN:
`input_ids` float32 (1, 77) -> `last_hidden_state`; `sample`, `timestep`,
`encoder_hidden_states` (B, C, 1, 77) -> `noise_pred`; `z` -> `image`) to the diffusers
conventions of `coreml_sd.backends`: integer token ids, (B, 77, C) text embeddings, any batch that
is a multiple of the package's fixed batch. A UNet split into chunks (`UnetChunk1`, `UnetChunk2`)
runs as one: each chunk reads its inputs from the original inputs and the earlier chunks' outputs.

`load_mil_component(path, kind, device=..., precision_mode=...)` builds one component;
`components_from_packages(...)` builds the three the pipeline needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from coreml_sd.backends import Components
from coreml_sd.errors import InputError, ModelError, choices_text
from coreml_sd.mil.executor import Executor, release_freed_memory
from coreml_sd.mil.package import TensorSpec, load_program

KINDS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
# Tensor names of Apple's Swift StableDiffusion package contract.
_INPUT = {"text_encoder": "input_ids", "vae_decoder": "z", "vae_encoder": "x"}
_OUTPUT = {"text_encoder": "last_hidden_state", "unet": "noise_pred", "vae_decoder": "image", "vae_encoder": "latent"}


class _Package:
    """One or more executors run in sequence (UNet chunks), fed by name, split into fixed batches."""

    def __init__(self, executors: Sequence[Executor]):
        self.executors = list(executors)
        self.inputs: dict[str, TensorSpec] = {}
        produced: set[str] = set()
        for ex in self.executors:
            self.inputs.update({s.name: s for s in ex.inputs if s.name not in produced})
            produced.update(s.name for s in ex.outputs)
        self.outputs = {s.name: s for s in self.executors[-1].outputs}
        self.device = self.executors[0].device
        self.name = ", ".join(ex.path.name for ex in self.executors)

    @property
    def batch_size(self) -> int | None:
        batches = {s.shape[0] for s in self.inputs.values() if s.shape and s.shape[0] is not None}
        return batches.pop() if len(batches) == 1 else None

    def input_name(self, preferred: str) -> str:
        return _pick(preferred, self.inputs, "input", self.name)

    def output_name(self, preferred: str) -> str:
        return _pick(preferred, self.outputs, "output", self.name)

    def run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run on batched `feeds`, in chunks of the package's fixed batch where it has one."""
        total = next(iter(feeds.values())).shape[0]
        batch = self.batch_size or total
        if total % batch:
            raise InputError(f"{self.name}: batch of {total} is not a multiple of the package's fixed batch {batch}")
        parts = [self._run_once({k: v[i:i + batch] for k, v in feeds.items()}) for i in range(0, total, batch)]
        return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}

    def _run_once(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        values = dict(feeds)
        for ex in self.executors:
            values.update(ex({s.name: values[s.name] for s in ex.inputs}))
        return {name: values[name] for name in self.outputs}

    def describe(self) -> str:
        return self.executors[0].describe()


def _pick(preferred: str, specs: Mapping[str, TensorSpec], what: str, package: str) -> str:
    if preferred in specs:
        return preferred
    if len(specs) == 1:
        return next(iter(specs))
    raise ModelError(f"{package}: expected an {what} named {preferred!r}; the package has: {choices_text(specs)}")


def _as_tensor(value, device) -> torch.Tensor:
    tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
    return tensor.to(device)


class MilTextEncoder:
    def __init__(self, package: _Package):
        self.package = package
        self.input = package.input_name(_INPUT["text_encoder"])
        self.output = package.output_name(_OUTPUT["text_encoder"])
        self.runs_on = package.describe()

    def encode(self, input_ids) -> torch.Tensor:
        """int token ids (B, 77) -> last_hidden_state (B, 77, C) float32."""
        ids = _as_tensor(input_ids, self.package.device)
        if ids.is_floating_point():
            raise InputError(f"text encoder: expected integer token ids, found {ids.dtype}")
        # Apple's packages take the ids as float32 (exact for ids below 2**24).
        spec = self.package.inputs[self.input]
        ids = ids.to(torch.float32 if spec.dtype.startswith("fp") else torch.int32)
        return self.package.run({self.input: ids})[self.output]


class MilUNet:
    def __init__(self, package: _Package):
        self.package = package
        self.output = package.output_name(_OUTPUT["unet"])
        self.batch_size = package.batch_size
        self.runs_on = package.describe()
        context = package.inputs.get("encoder_hidden_states")
        if context is None or not {"sample", "timestep"} <= set(package.inputs):
            raise ModelError(
                f"{package.name}: a UNet package needs inputs sample, timestep, encoder_hidden_states; "
                f"found {choices_text(package.inputs)}"
            )
        # (B, C, 1, S) in Apple's Neural-Engine layout, (B, S, C) in a plain conversion
        self._channels_first = len(context.shape) == 4

    def predict(self, sample, timestep, encoder_hidden_states) -> torch.Tensor:
        device = self.package.device
        sample = _as_tensor(sample, device)
        batch = sample.shape[0]
        timestep = _as_tensor(timestep, device).to(torch.float32).reshape(-1).expand(batch)
        context = _as_tensor(encoder_hidden_states, device)
        if self._channels_first:
            context = context.transpose(1, 2).unsqueeze(2)
        feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": context}
        return self.package.run(feeds)[self.output]


class MilVAEDecoder:
    def __init__(self, package: _Package):
        self.package = package
        self.input = package.input_name(_INPUT["vae_decoder"])
        self.output = package.output_name(_OUTPUT["vae_decoder"])
        self.runs_on = package.describe()

    def decode(self, z) -> torch.Tensor:
        """latents already divided by the scaling factor (B, 4, h, w) -> image (B, 3, H, W) in [-1, 1]."""
        return self.package.run({self.input: _as_tensor(z, self.package.device)})[self.output]


class MilVAEEncoder:
    def __init__(self, package: _Package):
        self.package = package
        self.input = package.input_name(_INPUT["vae_encoder"])
        self.output = package.output_name(_OUTPUT["vae_encoder"])
        self.runs_on = package.describe()

    def encode(self, x) -> torch.Tensor:
        """image (B, 3, H, W) in [-1, 1] -> mean and log-variance (B, 8, h, w)."""
        return self.package.run({self.input: _as_tensor(x, self.package.device)})[self.output]


_ADAPTERS = {"text_encoder": MilTextEncoder, "unet": MilUNet, "vae_decoder": MilVAEDecoder, "vae_encoder": MilVAEEncoder}


def load_mil_component(package_path, kind: str, *, device: str = "auto", precision_mode: str = "fast",
                       fast_dtype: str | None = None):
    """A backend component executing the Core ML package(s) at `package_path` with torch kernels.

    `kind`: text_encoder | unet | vae_decoder | vae_encoder. For a chunked UNet pass the chunk
    packages in order. `precision_mode`: `exact` (Core ML's fp16 rounding, to verify) or `fast`
    (`fast_dtype` bf16/fp16/fp32, default chosen for the device).
    """
    from coreml_sd.devices import resolve_device

    if kind not in _ADAPTERS:
        raise InputError(f"unknown component kind {kind!r}; valid: {choices_text(KINDS)}")
    paths = [package_path] if isinstance(package_path, (str, Path)) else list(package_path)
    device = resolve_device(device)
    executors = []
    for path in paths:
        # The loaded program (coremltools graph + numpy weights) is dropped once compiled.
        executors.append(Executor(load_program(path), device=device, precision_mode=precision_mode,
                                  fast_dtype=fast_dtype))
        release_freed_memory()
    return _ADAPTERS[kind](_Package(executors))


def components_from_packages(text_encoder, unet, vae_decoder, *, device: str = "auto", precision_mode: str = "fast",
                             fast_dtype: str | None = None) -> Components:
    """The pipeline's three components from package paths (`unet` may be a list of chunks)."""
    kwargs = dict(device=device, precision_mode=precision_mode, fast_dtype=fast_dtype)
    parts = {
        "text_encoder": load_mil_component(text_encoder, "text_encoder", **kwargs),
        "unet": load_mil_component(unet, "unet", **kwargs),
        "vae_decoder": load_mil_component(vae_decoder, "vae_decoder", **kwargs),
    }
    target = parts["unet"].package.device

    def asarray(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(target)

    return Components(asarray=asarray, runs_on={k: v.runs_on for k, v in parts.items()}, **parts)
