"""Fixes for coremltools' torch frontend that conversion of diffusers modules needs today.

coremltools 9.0 converts `aten::int` / `aten::bool` of a compile-time constant with
`int(x.val)`. Under numpy 2 that raises for a 1-element array that is not 0-d
("only 0-dimensional arrays can be converted to Python scalars"); diffusers' UNet produces such a
constant from its timestep handling, so every UNet conversion stops there. The fix reads the single
element explicitly and otherwise keeps upstream's behaviour.

Call `apply()` before `coremltools.convert`; it is idempotent.
"""

from __future__ import annotations

_applied = False


def _scalar_cast(context, node, py_type, dtype_name: str) -> None:
    import numpy as np
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs

    inputs = _get_inputs(context, node, expected=1)
    x = inputs[0]
    if not (len(x.shape) == 0 or all(d == 1 for d in x.shape)):
        raise ValueError(
            f"torch op {node.kind!r} ({node.name}): expected a scalar or a 1-element tensor, "
            f"found shape {tuple(x.shape)}"
        )
    if x.can_be_folded_to_const():
        # `.item()` works for 0-d and 1-element arrays alike; int(ndarray) does not under numpy 2.
        if isinstance(x.val, py_type):
            res = x
        else:
            value = x.val.item() if isinstance(x.val, np.ndarray) else x.val
            res = mb.const(val=py_type(value), name=node.name)
    elif len(x.shape) > 0:
        squeezed = mb.squeeze(x=x, name=node.name + "_item")
        res = mb.cast(x=squeezed, dtype=dtype_name, name=node.name)
    else:
        res = mb.cast(x=x, dtype=dtype_name, name=node.name)
    context.add(res, node.name)


def apply() -> None:
    """Register the fixed `int` and `bool` conversions (override=True) with coremltools."""
    global _applied
    if _applied:
        return
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op

    def _int(context, node):
        _scalar_cast(context, node, int, "int32")

    def _bool(context, node):
        _scalar_cast(context, node, bool, "bool")

    # Registered under the same names upstream uses ("_int" with alias "int", "_bool" with "bool").
    register_torch_op(_int, torch_alias=["int"], override=True)
    register_torch_op(_bool, torch_alias=["bool"], override=True)
    _applied = True
