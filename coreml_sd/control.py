"""ControlNet at generation time: the request's units, the rules they follow, and the stage the
denoiser calls before every UNet call.

A request's ControlNets are `ControlUnit`s, as AUTOMATIC1111's ControlNet extension calls them:
a model, a control image, a weight, guidance start and end (fractions of the steps), a control
mode, a resize mode and a preprocessor. `prepare_control` opens each model (checked against the
base model), loads it as a `controlnet` component on the model's own backend route, turns its
image into the network's input and returns a `ControlStage`. At each UNet call the stage runs
every unit active at that step, weights its residuals and sums them (diffusers' MultiControlNet,
A1111's units) into `Conditioning.control`. When no unit is active (all weights 0, or outside
their start/end) the conditioning is returned untouched: the UNet then runs exactly as without
ControlNet.

Control modes (A1111's "Control Mode"; per unit, the request's by default):

    balanced    every residual times the weight, on both halves of the guidance batch
    prompt      "My prompt is more important": soft weights (deeper residuals weigh more), both halves
    controlnet  "ControlNet is more important" = diffusers' guess_mode: soft weights, and control on
                the conditional half only (the unconditional prediction runs without it)

Two rule sets, chosen by the pipeline's `a1111` flag (diffusers' by default):

    steps        diffusers: step i of n (0-based) runs a unit iff not (i/n < start or (i+1)/n > end);
                 A1111: iff start <= s/n <= end, where s is the step the sampler last reported
                 (0 during steps 0 and 1, i-1 after), as its extension reads `sampling_step`
    soft weights residual k of K: diffusers 10**(-1 + k/(K-1)) (logspace(-1, 0, K));
                 A1111 0.825**(12 - k) (its rounding of the same curve for K = 13)

A ControlNet that pools its residuals (diffusers' global_pool_conditions, the "shuffle" models)
acts as diffusers treats it: conditional half only, uniform weight, residuals averaged over space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from coreml_sd import arrays
from coreml_sd.conditioning import Conditioning
from coreml_sd.errors import InputError, choices_text
from coreml_sd.image_input import name_key, parse_resize_mode

CONTROL_MODES = ("balanced", "prompt", "controlnet")
A1111_MODES = {"balanced": "Balanced", "prompt": "My prompt is more important",
               "controlnet": "ControlNet is more important"}
_MODE_NAMES = {**{name_key(v): k for k, v in A1111_MODES.items()}, **{m: m for m in CONTROL_MODES},
               "0": "balanced", "1": "prompt", "2": "controlnet", "guess": "controlnet", "guess mode": "controlnet"}
A1111_RESIZE = {"stretch": "Just Resize", "crop": "Crop and Resize", "fill": "Resize and Fill"}
# A1111's preprocessor ("Module") ids where they differ from ours.
A1111_MODULES = {"scribble": "scribble_thr"}
RULES = ("diffusers", "a1111")
A1111_SOFT_BASE = 0.825
DEFAULT_RESIZE = "crop"  # A1111's default "Crop and Resize"


def parse_control_mode(name: str | int) -> str:
    """balanced | prompt | controlnet, from ours, A1111's labels or its API's 0/1/2."""
    mode = _MODE_NAMES.get(name_key(name))
    if mode is None:
        raise InputError(f"unknown control mode {name!r}; valid: {choices_text(CONTROL_MODES)} (or A1111's "
                         f"{', '.join(repr(v) for v in A1111_MODES.values())})")
    return mode


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet of a request (A1111's unit). `model`: a file, diffusers folder, the name of a
    ControlNet a converted model holds, or an opened ControlNetSource; `image`: a path or PIL image.
    `mode`/`resize_mode` None: the request's."""

    model: Any
    image: Any
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str | None = None
    resize_mode: str | None = None
    preprocessor: str = "none"

    def checked(self, *, mode: str, resize_mode: str) -> "ControlUnit":
        """This unit with every option validated and the request's defaults filled in."""
        for name in ("weight", "start", "end"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"ControlNet {name} must be a number; got {value!r}")
        if self.weight < 0:
            raise InputError(f"ControlNet weight must be >= 0; got {self.weight}")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise InputError(f"ControlNet guidance start/end must satisfy 0 <= start <= end <= 1; "
                             f"got start {self.start}, end {self.end}")
        from coreml_sd.control_preprocess import get_preprocessor

        return replace(self, weight=float(self.weight), start=float(self.start), end=float(self.end),
                       mode=parse_control_mode(self.mode or mode),
                       resize_mode=parse_resize_mode(self.resize_mode or resize_mode),
                       preprocessor=get_preprocessor(self.preprocessor).name)


def as_unit(item: Any) -> ControlUnit:
    """A ControlUnit from a ControlUnit, a dict of its fields, or a tuple (model, image[, weight[, start[, end]]])."""
    if isinstance(item, ControlUnit):
        return item
    if isinstance(item, dict):
        try:
            return ControlUnit(**item)
        except TypeError as exc:
            raise InputError(f"ControlNet unit {item!r}: {exc}") from None
    if isinstance(item, (tuple, list)) and 2 <= len(item) <= 5:
        return ControlUnit(*item)
    raise InputError(f"a ControlNet is (model, image[, weight[, start[, end]]]) or a ControlUnit; got {item!r}")


# -- the rules (pure functions) -----------------------------------------------------------------
def is_active(step: int, steps: int, start: float, end: float, rule: str = "diffusers") -> bool:
    """Whether a unit with this guidance start/end runs at `step` (0-based) of `steps` (see the module doc)."""
    if rule == "diffusers":
        return not (step / steps < start or (step + 1) / steps > end)
    if rule == "a1111":
        reported = max(step - 1, 0) / steps
        return start <= reported <= end
    raise InputError(f"unknown ControlNet rule {rule!r}; valid: {choices_text(RULES)}")


def soft_weights(count: int, rule: str = "diffusers") -> list[float]:
    """Per-residual weights of the soft modes (prompt, controlnet), for a weight of 1."""
    if rule == "a1111":
        return [A1111_SOFT_BASE ** float(12 - k) for k in range(count)]
    # diffusers: torch.logspace(-1, 0, count) in float32
    return [float(v) for v in np.logspace(-1.0, 0.0, count, dtype=np.float64).astype(np.float32)]


def residual_scales(count: int, weight: float, mode: str, *, pooled: bool = False,
                    rule: str = "diffusers") -> list[float]:
    """What each of a unit's `count` residuals is multiplied by."""
    if mode == "balanced" or pooled:
        return [weight] * count
    if rule == "a1111":
        return [weight * s for s in soft_weights(count, rule)]
    # diffusers multiplies its float32 logspace by the scale in float32
    return [float(np.float32(s) * np.float32(weight)) for s in soft_weights(count, rule)]


def control_extras(units: Sequence["PreparedUnit"]) -> dict[str, str]:
    """A1111's infotext entries: "ControlNet 0": "Module: canny, Model: name [hash], Weight: 1.0, ..."."""
    out = {}
    for i, u in enumerate(units):
        out[f"ControlNet {i}"] = ", ".join((
            f"Module: {A1111_MODULES.get(u.unit.preprocessor, u.unit.preprocessor)}",
            f"Model: {u.info.a1111_model}", f"Weight: {u.unit.weight}",
            f"Resize Mode: {A1111_RESIZE[u.unit.resize_mode]}", f"Guidance Start: {u.unit.start}",
            f"Guidance End: {u.unit.end}", f"Control Mode: {A1111_MODES[u.unit.mode]}"))
    return out


# -- the stage ----------------------------------------------------------------------------------
@dataclass
class PreparedUnit:
    unit: ControlUnit  # checked
    info: Any  # controlnet_source.ControlNetInfo
    key: str  # its component's name in the pipeline's Components
    component: Any  # the loaded ControlNet (contract: residuals(sample, timestep, cond, image))
    image: Any  # (1, 3, H, W) in [0, 1], the loop's array kind

    @property
    def conditional_only(self) -> bool:
        return self.unit.mode == "controlnet" or self.info.pooled


class ControlStage:
    """The ControlNet step of a denoiser: the residuals of the units active at the current step."""

    def __init__(self, units: Sequence[PreparedUnit], *, steps: int, rule: str = "diffusers"):
        if rule not in RULES:
            raise InputError(f"unknown ControlNet rule {rule!r}; valid: {choices_text(RULES)}")
        self.units, self.steps, self.rule = list(units), steps, rule
        self.step = 0
        self._images: dict[tuple[int, int], Any] = {}

    def at_step(self, step: int) -> None:
        """The sampler is about to run step `step` (0-based)."""
        self.step = step

    def active(self) -> list[PreparedUnit]:
        return [u for u in self.units if u.unit.weight != 0
                and is_active(self.step, self.steps, u.unit.start, u.unit.end, self.rule)]

    def apply(self, sample, timestep, cond: Conditioning, uncond_rows: int = 0) -> Conditioning:
        """`cond` with the summed residuals of the active units (`uncond_rows`: how many leading rows
        are the unconditional half of a guidance batch)."""
        total = None
        for u in self.active():
            res = self._residuals(u, sample, timestep, cond, uncond_rows)
            total = res if total is None else [a + b for a, b in zip(total, res)]
        return cond if total is None else cond.with_(control=tuple(total))

    def _residuals(self, u: PreparedUnit, sample, timestep, cond: Conditioning, uncond_rows: int) -> list:
        rows = int(sample.shape[0])
        masked = u.conditional_only and uncond_rows > 0
        # diffusers runs a guess-mode ControlNet on the conditional rows alone; a package of fixed
        # batch runs them all and its unconditional rows are then dropped (the same numbers).
        lo = uncond_rows if masked and getattr(u.component, "batch_size", None) is None else 0
        res = u.component.residuals(sample[lo:], timestep[lo:], cond.rows_slice(lo, rows),
                                    self._image(u, rows - lo))
        scales = residual_scales(len(res), u.unit.weight, u.unit.mode, pooled=u.info.pooled, rule=self.rule)
        res = [r * s for r, s in zip(res, scales)]
        if u.info.pooled:
            res = [_spatial_mean(r) for r in res]
        if masked:
            res = [arrays.concat([_zeros(r, uncond_rows), r[uncond_rows - lo:]]) for r in res]
        return res

    def _image(self, u: PreparedUnit, rows: int):
        key = (id(u), rows)
        if key not in self._images:
            self._images[key] = arrays.concat([u.image] * rows)
        return self._images[key]

    def extras(self) -> dict[str, str]:
        return control_extras(self.units)

    @property
    def keys(self) -> list[str]:
        return [u.key for u in self.units]


def _zeros(like, rows: int):
    if arrays.is_torch(like):
        import torch

        return torch.zeros((rows, *like.shape[1:]), dtype=like.dtype, device=like.device)
    return np.zeros((rows, *like.shape[1:]), dtype=like.dtype)


def _spatial_mean(r):
    if arrays.is_torch(r):
        return r.mean(dim=(2, 3), keepdim=True)
    return r.mean(axis=(2, 3), keepdims=True)


# -- preparing a request ------------------------------------------------------------------------
def prepare_control(components, base, units: Sequence[Any], *, width: int, height: int, steps: int,
                    mode: str = "balanced", resize_mode: str = DEFAULT_RESIZE, a1111: bool = False) -> ControlStage:
    """Open, check and load the request's ControlNets (`components`: the pipeline's; `base`: its model
    source) and their control images at the generation size; the stage the denoiser calls."""
    from coreml_sd.controlnet_source import open_controlnet

    mode, resize_mode = parse_control_mode(mode), parse_resize_mode(resize_mode)
    if components.load_other is None:
        raise InputError("ControlNets need components loaded through Pipeline.load (the backend route)")
    prepared = []
    for item in units:
        unit = as_unit(item).checked(mode=mode, resize_mode=resize_mode)
        source = open_controlnet(unit.model, base)
        key, component = _loaded(components, source)
        image = components.asarray(control_image(unit, width, height))
        prepared.append(PreparedUnit(unit, source.info, key, component, image))
    return ControlStage(prepared, steps=steps, rule="a1111" if a1111 else "diffusers")


def _loaded(components, source) -> tuple[str, Any]:
    """(key, component) of a ControlNet: loaded once per pipeline, under controlnet:<Name> (a second
    ControlNet of the same name from elsewhere gets controlnet:<Name>#2 ...)."""
    origin = str(source.origin.path)
    base, n = f"controlnet:{source.info.package_name}", 1
    key = base
    while key in components.origins and components.origins[key] != origin:
        n += 1
        key = f"{base}#{n}"
    if key not in components.parts:
        components.load_other(source, "controlnet", key)
        components.origins[key] = origin
    return key, components.parts[key]


def control_image(unit: ControlUnit, width: int, height: int) -> np.ndarray:
    """The unit's image, preprocessed and resized: float32 (1, 3, H, W) in [0, 1]."""
    from coreml_sd.control_preprocess import prepare_control_image, preprocess
    from coreml_sd.image_input import load_image

    image = load_image(unit.image)
    if unit.preprocessor != "none":
        image = preprocess(unit.preprocessor, image)
    return prepare_control_image(image, width, height, unit.resize_mode)


__all__ = ["CONTROL_MODES", "ControlUnit", "ControlStage", "PreparedUnit", "as_unit", "control_extras",
           "control_image", "is_active", "parse_control_mode", "prepare_control", "residual_scales",
           "soft_weights"]
