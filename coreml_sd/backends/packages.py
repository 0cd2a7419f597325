"""Core ML packages behind the backend contract, whichever engine executes them.

A converted model's packages speak Apple's tensor contract (see DESIGN: `input_ids` float32
(1, 77) -> `last_hidden_state` or `hidden_embeds` (SDXL) and `pooled_outputs`; `sample`,
`timestep`, `encoder_hidden_states` (B, C, 1, 77) and the family's extra inputs by name
(`text_embeds`, `time_ids` ...) -> `noise_pred`; `z` -> `image`; `x` -> `latent`) at a fixed
batch. The pipeline speaks diffusers' (integer token ids, (B, 77, C) text embeddings, a
`Conditioning`, any batch). The adapters here translate, once for every engine: they only need a
*package runner*,

    name, inputs, outputs (TensorSpec), batch_size, run(feeds) -> outputs, describe(), native(value, dtype)

where `run` executes exactly one call at the package's own shapes and `native` turns a numpy array
or torch tensor into the engine's array (torch for the `mil` executor, numpy for Core ML). So
everything except the engine's own call — input checks, layouts, batch splitting, UNet chunks —
is the same code on Linux (mil) and on a Mac (Core ML), and Linux tests cover it.

Nothing here imports torch or coremltools: torch tensors are recognised by `coreml_sd.arrays`.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from coreml_sd import arrays
from coreml_sd.components import ROLES, TensorSpec, format_shape
from coreml_sd.conditioning import Conditioning, TextEncoding
from coreml_sd.errors import InputError, ModelError, choices_text

__all__ = ["TensorSpec", "format_shape", "adapt", "call_package", "check_feeds", "fixed_batch", "PackageChain"]

# Tensor names of Apple's Swift StableDiffusion package contract (the first name is ours where
# Apple's SDXL packages use another: "hidden_embeds").
INPUT_NAMES = {"text_encoder": ("input_ids",), "vae_decoder": ("z",), "vae_encoder": ("x",)}
OUTPUT_NAMES = {"text_encoder": ("last_hidden_state", "hidden_embeds"), "unet": ("noise_pred",),
                "vae_decoder": ("image",), "vae_encoder": ("latent",)}
POOLED_OUTPUT = "pooled_outputs"
UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")
CONTROL_INPUT = "additional_residual_{}"  # ControlledUnet's residual inputs, numbered

class PackageRunner(Protocol):
    """One engine's view of a package (or of a chain of packages run as one)."""

    name: str
    inputs: tuple  # of TensorSpec-like (name, shape, dtype, describe())
    outputs: tuple

    @property
    def batch_size(self) -> int | None: ...

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]: ...

    def native(self, value, dtype: str) -> Any: ...

    def describe(self) -> str: ...


def fixed_batch(inputs: Sequence) -> int | None:
    """The batch every input's first dimension fixes, or None when they disagree or are flexible."""
    batches = {s.shape[0] for s in inputs if s.shape and s.shape[0] is not None}
    return batches.pop() if len(batches) == 1 else None


class PackageChain:
    """Packages run one after another as one (a UNet split into UnetChunk1/2): each reads its inputs
    by name from the original inputs and the earlier packages' outputs."""

    def __init__(self, runners: Sequence[PackageRunner]):
        if not runners:
            raise ValueError("a package chain needs at least one package")
        self.runners = list(runners)
        self.name = ", ".join(r.name for r in self.runners)
        inputs: dict[str, Any] = {}
        produced: set[str] = set()
        for r in self.runners:
            inputs.update({s.name: s for s in r.inputs if s.name not in produced and s.name not in inputs})
            produced.update(s.name for s in r.outputs)
        self.inputs = tuple(inputs.values())
        self.outputs = tuple(self.runners[-1].outputs)

    @property
    def batch_size(self) -> int | None:
        return fixed_batch(self.inputs)

    @property
    def executors(self) -> list:
        """The mil executors behind the chain (empty for other engines), for benchmarks' facts."""
        return [ex for r in self.runners for ex in getattr(r, "executors", [])]

    def native(self, value, dtype: str):
        return self.runners[0].native(value, dtype)

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        values = dict(feeds)
        for r in self.runners:
            values.update(r.run({s.name: values[s.name] for s in r.inputs}))
        return {s.name: values[s.name] for s in self.outputs}

    def describe(self) -> str:
        return self.runners[0].describe()


# -- calling a package --------------------------------------------------------------------------
def _kind(value) -> str:
    """float | integer | bool, for numpy arrays and torch tensors alike."""
    if arrays.is_torch(value):
        if str(value.dtype) == "torch.bool":
            return "bool"
        return "float" if value.dtype.is_floating_point else "integer"
    dtype = np.asarray(value).dtype
    if dtype == np.bool_:
        return "bool"
    return "float" if np.issubdtype(dtype, np.floating) else "integer"


def _spec_kind(dtype: str) -> str:
    return "bool" if dtype == "bool" else ("float" if dtype.startswith("fp") else "integer")


def check_feeds(runner: PackageRunner, feeds: Mapping[str, Any]) -> int:
    """Check names, shapes (any batch: `call_package` runs it in calls of the fixed batch) and
    element kinds; return the batch."""
    specs = {s.name: s for s in runner.inputs}
    valid = "; ".join(f"{s.name} {format_shape(s.shape)} {s.dtype}" for s in runner.inputs)
    unknown, missing = sorted(set(feeds) - set(specs)), sorted(set(specs) - set(feeds))
    if unknown or missing:
        raise InputError(f"{runner.name}: " + (f"unknown input(s) {', '.join(map(repr, unknown))}; " if unknown else "")
                         + (f"missing input(s) {', '.join(map(repr, missing))}; " if missing else "")
                         + f"valid inputs: {valid}")
    batch, total = runner.batch_size, None
    for name, value in feeds.items():
        spec, shape = specs[name], tuple(np.shape(value))
        expected = spec.shape
        same_rank = len(shape) == len(expected)
        if not same_rank or any(e is not None and e != f for e, f in zip(expected[1:], shape[1:])):
            raise InputError(f"{runner.name}: input {name!r} expects shape {format_shape(expected)}, found "
                             f"{format_shape(shape)}; valid inputs: {valid}")
        if expected and expected[0] is not None:
            if batch and expected[0] == batch and shape[0] == 0:
                raise InputError(f"{runner.name}: input {name!r} has no rows (shape {format_shape(shape)})")
            if expected[0] != batch and shape[0] != expected[0]:
                raise InputError(f"{runner.name}: input {name!r} expects shape {format_shape(expected)}, found "
                                 f"{format_shape(shape)}; valid inputs: {valid}")
        if _kind(value) != _spec_kind(spec.dtype):
            raise InputError(f"{runner.name}: input {name!r} expects {_spec_kind(spec.dtype)} values ({spec.dtype}), "
                             f"found {_kind(value)} values; valid inputs: {valid}")
        if shape and total is not None and shape[0] != total:
            raise InputError(f"{runner.name}: inputs disagree on the batch: {total} rows and {shape[0]} rows "
                             f"({name!r})")
        total = shape[0] if shape else total
    return total or 1


def call_package(runner: PackageRunner, feeds: Mapping[str, Any]) -> dict[str, Any]:
    """Check `feeds`, run them in calls of the package's fixed batch, return the outputs concatenated.

    A batch that is not a multiple of the fixed one (one image without guidance on a batch-2 UNet:
    LCM-LoRA and Turbo recipes) has its last call filled up with copies of its last row, whose
    outputs are dropped: rows are computed independently, so the real rows' results are theirs."""
    total = check_feeds(runner, feeds)
    dtypes = {s.name: s.dtype for s in runner.inputs}
    native = {k: runner.native(v, dtypes[k]) for k, v in feeds.items()}
    batch = runner.batch_size or total
    pad = -total % batch
    if pad:
        native = {k: arrays.concat([v] + [v[-1:]] * pad) for k, v in native.items()}
    parts = [runner.run({k: v[i:i + batch] for k, v in native.items()}) for i in range(0, total + pad, batch)]
    out = parts[0] if len(parts) == 1 else {name: arrays.concat([p[name] for p in parts]) for name in parts[0]}
    return {name: value[:total] for name, value in out.items()} if pad else out


def _pick(preferred: tuple[str, ...], specs: Sequence, what: str, package: str) -> str:
    names = [s.name for s in specs]
    for name in preferred:
        if name in names:
            return name
    if len(names) == 1:
        return names[0]
    raise ModelError(f"{package}: expected an {what} named {' or '.join(map(repr, preferred))}; the package has: "
                     f"{choices_text(names)}")


# -- the components -----------------------------------------------------------------------------
class _Adapter:
    role = ""

    def __init__(self, package: PackageRunner):
        self.package = package
        self.runs_on = package.describe()
        self.output = _pick(OUTPUT_NAMES[self.role], package.outputs, "output", package.name)
        if self.role in INPUT_NAMES:
            self.input = _pick(INPUT_NAMES[self.role], package.inputs, "input", package.name)

    def _call_one(self, value):
        return call_package(self.package, {self.input: value})[self.output]


class PackageTextEncoder(_Adapter):
    role = "text_encoder"

    def encode(self, input_ids, clip_skip: int = 1) -> TextEncoding:
        """int token ids (B, 77) -> the hidden state (B, 77, C) float32, and the pooled output where the
        package has one."""
        if clip_skip != 1:
            raise InputError(f"{self.package.name} gives its text encoder's last layer only, so clip skip "
                             f"{clip_skip} cannot be applied to it; convert the model with --clip-skip {clip_skip}, or run "
                             f"the text encoder on torch (--backend text_encoder=torch) where the source model is at "
                             f"hand")
        if _kind(input_ids) != "integer":
            dtype = input_ids.dtype if hasattr(input_ids, "dtype") else type(input_ids).__name__
            raise InputError(f"text encoder: expected integer token ids, found {dtype}")
        spec = next(s for s in self.package.inputs if s.name == self.input)
        # Apple's packages take the ids as float32 (exact for ids below 2**24).
        ids = self.package.native(input_ids, "fp32" if spec.dtype.startswith("fp") else spec.dtype)
        out = call_package(self.package, {self.input: ids})
        return TextEncoding(out[self.output], out.get(POOLED_OUTPUT))


class PackageUNet(_Adapter):
    role = "unet"

    def __init__(self, package: PackageRunner):
        super().__init__(package)
        names = {s.name: s for s in package.inputs}
        if not set(UNET_INPUTS) <= set(names):
            raise ModelError(f"{package.name}: a UNet package needs inputs {', '.join(UNET_INPUTS)}; found "
                             f"{choices_text(names)}")
        self.batch_size = package.batch_size
        self.input_names = tuple(names)
        # (B, C, 1, S) in Apple's Neural-Engine layout, (B, S, C) in a plain conversion
        self._channels_first = len(names["encoder_hidden_states"].shape) == 4

    def predict(self, sample, timestep, cond: Conditioning):
        """diffusers' UNet call: sample (B, 4, h, w), timestep (B,) or scalar, conditioning -> (B, 4, h, w)."""
        batch = sample.shape[0]
        # A handful of numbers: numpy is the common ground, the runner moves them where they run.
        t = arrays.to_numpy(timestep).astype(np.float32).reshape(-1)
        if t.size not in (1, batch):
            raise InputError(f"{self.package.name}: expected one timestep or one per row ({batch}); found {t.size}")
        if cond.latent_extra is not None:  # inpainting UNets take mask and masked-image latents as channels
            sample = arrays.concat([sample, cond.latent_extra], axis=1)
        context = cond.context
        if self._channels_first:
            context = context.swapaxes(1, 2)[:, :, None, :]  # (B, 77, C) -> (B, C, 1, 77), numpy or torch
        feeds = {"sample": sample, "timestep": t if t.size == batch else np.full(batch, t[0], np.float32),
                 "encoder_hidden_states": context, **cond.extra}
        for i, residual in enumerate(cond.control or ()):
            feeds[CONTROL_INPUT.format(i)] = residual
        if cond.control is None:  # a ControlledUnet at a step without control: adding zeros changes nothing
            feeds.update(self._zero_residuals(batch))
        return call_package(self.package, feeds)[self.output]

    def _zero_residuals(self, batch: int) -> dict[str, np.ndarray]:
        return {s.name: np.zeros((batch, *s.shape[1:]), np.float32) for s in self.package.inputs
                if s.name.startswith(CONTROL_INPUT.format(""))}


class PackageControlNet:
    """A ControlNet package (Apple's `controlnet/<Name>`: sample, timestep, encoder_hidden_states,
    controlnet_cond -> additional_residual_0..N) behind the ControlNet contract."""

    role = "controlnet"
    INPUTS = ("sample", "timestep", "encoder_hidden_states", "controlnet_cond")

    def __init__(self, package: PackageRunner):
        self.package = package
        self.runs_on = package.describe()
        names = {s.name: s for s in package.inputs}
        if not set(self.INPUTS) <= set(names):
            raise ModelError(f"{package.name}: a ControlNet package needs inputs {', '.join(self.INPUTS)}; found "
                             f"{choices_text(names)}")
        outputs = {s.name for s in package.outputs}
        self.outputs = [CONTROL_INPUT.format(i) for i in range(len(outputs))]
        if set(self.outputs) != outputs:
            raise ModelError(f"{package.name}: a ControlNet package's outputs are {CONTROL_INPUT.format('0')}.."
                             f"{CONTROL_INPUT.format(len(outputs) - 1)}; found {choices_text(sorted(outputs))}")
        self.batch_size = package.batch_size
        self._channels_first = len(names["encoder_hidden_states"].shape) == 4

    def residuals(self, sample, timestep, cond: Conditioning, image) -> tuple:
        batch = sample.shape[0]
        t = arrays.to_numpy(timestep).astype(np.float32).reshape(-1)
        context = cond.context.swapaxes(1, 2)[:, :, None, :] if self._channels_first else cond.context
        feeds = {"sample": sample, "timestep": t if t.size == batch else np.full(batch, t[0], np.float32),
                 "encoder_hidden_states": context, "controlnet_cond": image,
                 **{k: v for k, v in cond.extra.items() if k in {s.name for s in self.package.inputs}}}
        out = call_package(self.package, feeds)
        return tuple(out[name] for name in self.outputs)


class PackageVAEDecoder(_Adapter):
    role = "vae_decoder"

    def decode(self, z):
        """latents already divided by the scaling factor (B, 4, h, w) -> image (B, 3, H, W) in [-1, 1]."""
        return self._call_one(z)


class PackageVAEEncoder(_Adapter):
    role = "vae_encoder"

    def encode(self, x):
        """image (B, 3, H, W) in [-1, 1] -> mean and log-variance (B, 8, h, w)."""
        return self._call_one(x)


ADAPTERS = {a.role: a for a in (PackageTextEncoder, PackageUNet, PackageVAEDecoder, PackageVAEEncoder,
                                 PackageControlNet)}


def check_role(role: str) -> None:
    if role not in ADAPTERS:
        raise InputError(f"unknown component role {role!r}; valid: {choices_text(ROLES)}")


def adapt(runner: PackageRunner, role: str):
    """The backend component of `role` over `runner` (a single package or a `PackageChain`)."""
    check_role(role)
    return ADAPTERS[role](runner)
