"""The op registry: MIL op type -> a builder that turns one program op into a torch kernel.

A builder runs once per op at compile time. It reads the op's constant parameters (axes, pads,
modes ...) through an `OpView`, validates them, and returns a `Kernel`: a plain function of the
op's tensor inputs plus the list of inputs to feed it. Doing the parsing once keeps the per-call
work to the torch call itself.

Registration follows coremltools' torch_op_registry: a second registration of the same op type is
an error unless it says `override=True`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from coreml_sd.errors import ModelError, choices_text

if TYPE_CHECKING:
    from coreml_sd.mil.precision import Precision


class UnsupportedOpError(ModelError):
    """The program uses an op type, or an op parameter, that the mil executor does not implement."""


@dataclass(frozen=True)
class Kernel:
    """A compiled op: `fn(*tensors)` over the values of `args` (program vars), in that order."""

    fn: Callable[..., Any]
    args: tuple  # coremltools Var objects


@dataclass(frozen=True)
class OpEntry:
    build: Callable[["OpView"], Kernel]
    # True for ops that only move values (reshape, transpose, slice ...): their fp16 outputs are
    # already fp16 values, so `exact` mode need not round them again.
    keeps_values: bool = False


_REGISTRY: dict[str, OpEntry] = {}


def register_op(*op_types: str, keeps_values: bool = False, override: bool = False):
    """Decorator registering a builder for one or more MIL op types."""

    def wrap(build: Callable[["OpView"], Kernel]):
        for op_type in op_types:
            if op_type in _REGISTRY and not override:
                raise ValueError(
                    f"MIL op {op_type!r} is already registered ({_REGISTRY[op_type].build.__qualname__}); "
                    "pass override=True to replace it"
                )
            _REGISTRY[op_type] = OpEntry(build, keeps_values)
        return build

    return wrap


def supported_ops() -> tuple[str, ...]:
    _load_kernels()
    return tuple(sorted(_REGISTRY))


def lookup(op_type: str, op_name: str) -> OpEntry:
    _load_kernels()
    entry = _REGISTRY.get(op_type)
    if entry is None:
        raise UnsupportedOpError(
            f"op type {op_type!r} (op {op_name!r} in the program) is not supported by the mil "
            f"executor; supported op types: {choices_text(sorted(_REGISTRY))}"
        )
    return entry


def _load_kernels() -> None:
    # Importing the kernel modules registers them; done on first use so that importing the
    # registry alone (e.g. to register a custom op) stays cheap.
    from coreml_sd.mil import ops  # noqa: F401


_MISSING = object()


class OpView:
    """What a builder sees of one program op: its constant parameters and its types."""

    def __init__(self, op, precision: "Precision", device, out_dtypes: Sequence | None = None):
        self._op = op
        self._out_dtypes = out_dtypes  # storage dtype of each output, as the compiler planned
        self.type: str = op.op_type
        self.name: str = op.name
        self.precision = precision
        self.device = device  # torch.device the kernels run on (for tensors they create)

    # -- inputs ---------------------------------------------------------------------------
    def var(self, name: str):
        """The input Var `name`, a default filled in by coremltools, or None when absent."""
        if name in self._op.inputs:
            return self._op.inputs[name]
        value = getattr(self._op, name, None)
        return value if _is_var(value) else None

    def vars(self, name: str) -> list:
        value = self.var(name)
        if value is None:
            return []
        return list(value) if isinstance(value, (list, tuple)) else [value]

    def has(self, name: str) -> bool:
        return self.var(name) is not None

    def is_const(self, name: str) -> bool:
        var = self.var(name)
        return var is not None and not isinstance(var, (list, tuple)) and var.val is not None

    def const(self, name: str, default: Any = _MISSING) -> Any:
        """The value of a compile-time constant input (numpy array or numpy scalar)."""
        var = self.var(name)
        if var is None:
            if default is _MISSING:
                raise self.error(f"required input {name!r} is missing")
            return default
        if var.val is None:
            raise self.error(f"input {name!r} must be a compile-time constant, found a runtime value")
        return var.val

    def const_int(self, name: str, default: Any = _MISSING) -> int:
        value = self.const(name, default)
        return value if value is None else int(np.asarray(value).reshape(-1)[0])

    def const_float(self, name: str, default: Any = _MISSING) -> float:
        value = self.const(name, default)
        return value if value is None else float(np.asarray(value).reshape(-1)[0])

    def const_bool(self, name: str, default: Any = _MISSING) -> bool:
        value = self.const(name, default)
        return value if value is None else bool(np.asarray(value).reshape(-1)[0])

    def const_str(self, name: str, default: Any = _MISSING) -> str:
        value = self.const(name, default)
        return value if value is None else str(value)

    def const_ints(self, name: str, default: Any = _MISSING) -> tuple[int, ...] | None:
        value = self.const(name, default)
        return value if value is None else tuple(int(v) for v in np.asarray(value).reshape(-1))

    def const_bools(self, name: str, default: Any = _MISSING) -> tuple[bool, ...] | None:
        value = self.const(name, default)
        return value if value is None else tuple(bool(v) for v in np.asarray(value).reshape(-1))

    # -- types ----------------------------------------------------------------------------
    def shape(self, name: str) -> tuple:
        """Static shape of input `name`; a dimension not known at compile time is None."""
        return _static_shape(self.var(name))

    def rank(self, name: str) -> int:
        return len(self.shape(name))

    def dtype(self, name: str) -> str:
        return mil_dtype_name(self.var(name))

    @property
    def outputs(self) -> list:
        return list(self._op.outputs)

    def out_shape(self, index: int = 0) -> tuple:
        return _static_shape(self._op.outputs[index])

    def out_dtype(self, index: int = 0) -> str:
        return mil_dtype_name(self._op.outputs[index])

    def torch_dtype(self, mil_dtype: str):
        """The torch dtype that holds values of MIL type `mil_dtype` in this precision mode."""
        return self.precision.torch_dtype(mil_dtype)

    def out_torch_dtype(self, index: int = 0):
        """The torch dtype output `index` is stored in (kernels creating values use it)."""
        if self._out_dtypes is not None:
            return self._out_dtypes[index]
        return self.precision.torch_dtype(self.out_dtype(index))

    # -- results --------------------------------------------------------------------------
    def kernel(self, fn: Callable[..., Any], *args) -> Kernel:
        """`fn` called with the values of `args`: input names (str) or Vars, in order."""
        resolved = []
        for arg in args:
            var = self.var(arg) if isinstance(arg, str) else arg
            if var is None:
                raise self.error(f"required input {arg!r} is missing")
            resolved.append(var)
        return Kernel(fn, tuple(resolved))

    def error(self, message: str) -> UnsupportedOpError:
        return UnsupportedOpError(f"op {self.name!r} ({self.type}): {message}")


def _is_var(value) -> bool:
    return value is not None and hasattr(value, "sym_type") and hasattr(value, "op")


def _static_shape(var) -> tuple:
    from coremltools.converters.mil.mil import types

    if var is None:
        return ()
    if not types.is_tensor(var.sym_type):
        return ()
    return tuple(int(d) if isinstance(d, (int, np.integer)) else None for d in var.shape)


def mil_dtype_name(var) -> str:
    """'fp16', 'fp32', 'int32', 'bool', 'uint8' ... of a Var (its element type for tensors)."""
    from coremltools.converters.mil.mil import types

    return types.builtin_to_string(var.dtype)

