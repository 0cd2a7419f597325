"""Matrix ops: linear, matmul, einsum, scaled_dot_product_attention.

MIL's `einsum` (coremltools `ops/defs/iOS15/linear.py`) accepts exactly two layouts, the ones
Apple's split-einsum attention uses: `nchw,nwhu->nchu` (rank 4) and `chw,whr->chr` (rank 3), with
size-1 broadcasting on the batch-like axes; letters are arbitrary, only the pattern counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from coreml_sd.mil.registry import OpView, register_op


@register_op("linear")
def linear(op: OpView):
    if op.has("bias"):
        return op.kernel(F.linear, "x", "weight", "bias")
    return op.kernel(F.linear, "x", "weight")


@register_op("matmul")
def matmul(op: OpView):
    tx, ty = op.const_bool("transpose_x", False), op.const_bool("transpose_y", False)
    if tx and op.rank("x") == 1 or ty and op.rank("y") == 1:
        raise op.error("transpose of a rank-1 operand is not allowed")

    def run(x, y):
        if tx:
            x = x.transpose(-1, -2)
        if ty:
            y = y.transpose(-1, -2)
        return torch.matmul(x, y)

    return op.kernel(run, "x", "y")


def einsum_pattern(equation: str) -> tuple[list[int], ...]:
    """Each operand's letters numbered by first appearance (the rule coremltools checks)."""
    lhs, _, out = equation.replace(" ", "").partition("->")
    numbering: dict[str, int] = {}
    vectors = []
    for term in lhs.split(",") + [out]:
        vectors.append([numbering.setdefault(ch, len(numbering)) for ch in term])
    return tuple(vectors)


_EINSUM_RANK4 = ([0, 1, 2, 3], [0, 3, 2, 4], [0, 1, 2, 4])
_EINSUM_RANK3 = ([0, 1, 2], [2, 1, 3], [0, 1, 3])


def _einsum_rank4(x, y):
    # x (B, C, H, W1) @ y (B, W1, H, W2) per (B, H) -> (B, C, H, W2)
    return torch.matmul(x.permute(0, 2, 1, 3), y.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)


def _einsum_rank3(x, y):
    # x (C, H, W1) @ y (W1, H, W2) per H -> (C, H, W2)
    return torch.matmul(x.permute(1, 0, 2), y.permute(1, 0, 2)).permute(1, 0, 2)


@register_op("einsum")
def einsum(op: OpView):
    equation = op.const_str("equation")
    operands = op.vars("values")
    if len(operands) != 2:
        raise op.error(f"einsum needs 2 operands, found {len(operands)}")
    pattern = einsum_pattern(equation)
    if pattern == _EINSUM_RANK4:
        return op.kernel(_einsum_rank4, *operands)
    if pattern == _EINSUM_RANK3:
        return op.kernel(_einsum_rank3, *operands)
    raise op.error(f"einsum equation {equation!r} is not one MIL supports (nchw,nwhu->nchu or chw,whr->chr)")


@register_op("scaled_dot_product_attention")
def scaled_dot_product_attention(op: OpView):
    if not op.has("attn_mask"):
        return op.kernel(F.scaled_dot_product_attention, "query", "key", "value")

    def run(q, k, v, mask):
        if mask.dtype != torch.bool and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return op.kernel(run, "query", "key", "value", "attn_mask")
