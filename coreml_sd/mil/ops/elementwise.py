"""Elementwise ops: binary arithmetic and comparisons (numpy broadcasting), unary math, cast.

Semantics from coremltools `ops/defs/iOS15/elementwise_binary.py` and `elementwise_unary.py`:
`mod` and `floor_div` follow Python's floor convention; `inverse`, `log` and `rsqrt` add their
`epsilon` before the operation; `round` rounds half to even (numpy's rule).
"""

from __future__ import annotations

import torch

from coreml_sd.mil.registry import OpView, register_op


def _floor_div(x, y):
    return torch.div(x, y, rounding_mode="floor")


def _real_div(x, y):
    return torch.div(x, y)


_BINARY = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "real_div": _real_div,
    "floor_div": _floor_div,
    "mod": torch.remainder,
    "pow": torch.pow,
    "maximum": torch.maximum,
    "minimum": torch.minimum,
    "equal": torch.eq,
    "not_equal": torch.ne,
    "less": torch.lt,
    "less_equal": torch.le,
    "greater": torch.gt,
    "greater_equal": torch.ge,
    "logical_and": torch.logical_and,
    "logical_or": torch.logical_or,
    "logical_xor": torch.logical_xor,
}


@register_op(*_BINARY)
def binary(op: OpView):
    return op.kernel(_BINARY[op.type], "x", "y")


def _exp2(x):
    return torch.exp2(x) if x.is_floating_point() else torch.exp2(x.float())


_UNARY = {
    "abs": torch.abs,
    "acos": torch.acos,
    "asin": torch.asin,
    "atan": torch.atan,
    "atanh": torch.atanh,
    "ceil": torch.ceil,
    "cos": torch.cos,
    "cosh": torch.cosh,
    "erf": torch.erf,
    "exp": torch.exp,
    "exp2": _exp2,
    "floor": torch.floor,
    "logical_not": torch.logical_not,
    "round": torch.round,
    "sign": torch.sign,
    "sin": torch.sin,
    "sinh": torch.sinh,
    "sqrt": torch.sqrt,
    "square": torch.square,
    "tan": torch.tan,
    "tanh": torch.tanh,
}


@register_op(*_UNARY)
def unary(op: OpView):
    return op.kernel(_UNARY[op.type], "x")


@register_op("inverse")
def inverse(op: OpView):
    eps = op.const_float("epsilon", 1e-4)
    return op.kernel(lambda x: torch.reciprocal(x + eps), "x")


@register_op("log")
def log(op: OpView):
    eps = op.const_float("epsilon", 1e-45)
    return op.kernel(lambda x: torch.log(x + eps), "x")


@register_op("rsqrt")
def rsqrt(op: OpView):
    eps = op.const_float("epsilon", 1e-12)
    return op.kernel(lambda x: torch.rsqrt(x + eps), "x")


@register_op("clip")
def clip(op: OpView):
    lo, hi = op.const_float("alpha"), op.const_float("beta")
    # min(max(x, alpha), beta), also when alpha > beta (torch.clamp agrees: max wins last).
    return op.kernel(lambda x: torch.clamp(x, lo, hi), "x")


@register_op("threshold")
def threshold(op: OpView):
    alpha = op.const("alpha").item()
    return op.kernel(lambda x: torch.clamp(x, min=alpha), "x")


@register_op("cast")
def cast(op: OpView):
    target = op.out_torch_dtype()
    return op.kernel(lambda x: x.to(target), "x")


@register_op("identity", keeps_values=True)
def identity(op: OpView):
    return op.kernel(lambda x: x, "x")


@register_op("select")
def select(op: OpView):
    return op.kernel(torch.where, "cond", "a", "b")
