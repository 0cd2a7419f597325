"""Arrays crossing from one engine to another: the one place where they are converted.

Each loaded component computes on one kind of array: numpy (Core ML) or torch tensors on a device
(torch, mil). The sampling loop runs on the UNet's kind, since it calls the UNet at every step. A
component of another kind (a torch text encoder next to a Core ML UNet, say) is wrapped in a
`Boundary`, which hands it its inputs in its own kind and gives its outputs back in the loop's.
Components of the loop's kind are not wrapped, so a single-backend pipeline pays nothing.

torch is imported only when a torch kind converts something (it is loaded already then).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from coreml_sd import arrays
from coreml_sd.conditioning import Conditioning, TextEncoding


@dataclass(frozen=True)
class ArrayKind:
    engine: str  # "numpy" | "torch"
    device: str | None = None  # torch device ("cpu", "cuda:0", "mps")

    def __str__(self) -> str:
        return self.engine if self.device is None else f"{self.engine} {self.device}"

    def asarray(self, value):
        """numpy (noise, token ids) or any array -> this kind."""
        if self.engine == "numpy":
            return np.ascontiguousarray(arrays.to_numpy(value))
        import torch

        if isinstance(value, torch.Tensor):
            return value.to(self.device)
        return torch.from_numpy(np.ascontiguousarray(value)).to(self.device)

    def holds(self, value) -> bool:
        if self.engine == "numpy":
            return not arrays.is_torch(value)
        return arrays.is_torch(value) and _same_device(str(value.device), self.device)


NUMPY = ArrayKind("numpy")


def torch_kind(device) -> ArrayKind:
    return ArrayKind("torch", str(device))


def _same_device(a: str, b: str | None) -> bool:
    def norm(d) -> str:  # "cuda" and "cuda:0" name the same device
        return str(d).removesuffix(":0")

    return norm(a) == norm(b)


def convert(value, kind: ArrayKind):
    """`value` as an array of `kind` (unchanged when it already is one)."""
    if value is None or kind.holds(value):
        return value
    return kind.asarray(value)


def _convert_any(value, kind: ArrayKind):
    """An array, a Conditioning or a TextEncoding with every array converted to `kind`."""
    if isinstance(value, Conditioning):
        return value.map(lambda a: convert(a, kind))
    if isinstance(value, TextEncoding):
        return TextEncoding(convert(value.hidden, kind), convert(value.pooled, kind))
    if isinstance(value, tuple):  # a ControlNet's residuals
        return tuple(convert(v, kind) for v in value)
    return convert(value, kind)


class Boundary:
    """A component computing on `native` arrays inside a loop of `loop` arrays (see the module doc).

    Other attributes (batch_size, runs_on, module, package ...) are the wrapped component's.
    """

    def __init__(self, inner: Any, *, native: ArrayKind, loop: ArrayKind):
        self.inner, self.native, self.loop = inner, native, loop

    def __getattr__(self, name: str):
        if name == "inner":  # not set yet (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _call(self, method: str, *args):
        out = getattr(self.inner, method)(*[_convert_any(a, self.native) for a in args])
        return _convert_any(out, self.loop)

    def encode(self, value, **kwargs):
        # Token ids stay numpy integers: every engine's text encoder takes them so (the contract).
        if not arrays.is_torch(value) and getattr(value, "dtype", None) is not None and value.dtype.kind in "iu":
            return _convert_any(self.inner.encode(value, **kwargs), self.loop)
        return _convert_any(self.inner.encode(_convert_any(value, self.native), **kwargs), self.loop)

    def predict(self, *args):
        return self._call("predict", *args)

    def decode(self, *args):
        return self._call("decode", *args)

    def residuals(self, *args):
        return self._call("residuals", *args)


def at_boundary(component: Any, *, native: ArrayKind, loop: ArrayKind) -> Any:
    """`component` as the loop sees it: itself when the kinds agree, else behind a Boundary."""
    return component if native == loop else Boundary(component, native=native, loop=loop)
