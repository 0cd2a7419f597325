"""Op-group fusions for `fast` mode: patterns coremltools decomposes, run as one torch kernel.

coremltools lowers torch's attention to matmul -> softmax -> matmul and GroupNorm to ten
reductions and elementwise ops. Run op by op in bf16 they cost far more than the fused kernels
torch eager uses (`F.scaled_dot_product_attention`, `F.group_norm`), and round every
intermediate. A fusion replaces exactly such a chain when every intermediate value has no other
reader; anything that does not match runs op by op. `exact` mode never fuses: it must round
after every op as Core ML does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch.nn.functional as F

from coreml_sd.mil.registry import Kernel


FUSION_KINDS = ("fused_attention", "fused_group_norm")


@dataclass(frozen=True, eq=False)
class Fusion:
    name: str  # a readable kind, e.g. "fused_attention"
    ops: tuple  # the program ops replaced, in program order
    kernel: Kernel  # computes the last op's output from the group's external inputs


def _only_reader(var, keep: set[int]):
    """The single op reading `var`, if it has exactly one reader and is not a function output."""
    readers = var.child_ops
    if len(readers) != 1 or id(var) in keep:
        return None
    return readers[0]


def _const(var):
    return None if var is None else var.val


def _scalar(var):
    value = _const(var)
    if value is None or np.asarray(value).size != 1:
        return None
    return float(np.asarray(value).reshape(-1)[0])


def match_attention(softmax_op, keep: set[int]) -> Fusion | None:
    """matmul(q, k^T) [* s | / s] [+ mask] -> softmax(-1) -> matmul(., v)  =>  SDPA."""
    x = softmax_op.inputs["x"]
    rank = len(x.shape)
    axis = _scalar(softmax_op.inputs.get("axis"))
    if rank not in (3, 4) or (axis is not None and int(axis) not in (-1, rank - 1)):
        return None
    scores = _scores_chain(softmax_op, keep)
    if scores is None:
        return None
    first, ops, scale, mask = scores
    if _const(first.inputs.get("transpose_x")):
        return None
    k_transposed = bool(_const(first.inputs.get("transpose_y")))
    second = _only_reader(softmax_op.outputs[0], keep)
    if second is None or second.op_type != "matmul" or second.inputs["x"] is not softmax_op.outputs[0]:
        return None
    if _const(second.inputs.get("transpose_x")) or _const(second.inputs.get("transpose_y")):
        return None
    q, k, v = first.inputs["x"], first.inputs["y"], second.inputs["y"]
    if not (len(q.shape) == len(k.shape) == len(v.shape) == rank):
        return None

    def run(q, k, v, *maybe_mask):
        k = k if k_transposed else k.transpose(-1, -2)
        m = maybe_mask[0].to(q.dtype) if maybe_mask else None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale)

    args = (q, k, v) + ((mask,) if mask is not None else ())
    return Fusion("fused_attention", tuple([first] + ops + [second]), Kernel(run, args))


def _scores_chain(softmax_op, keep):
    """Walk back from softmax over an optional additive mask and scalar scale to the q.k matmul:
    (matmul op, ops between it and the softmax inclusive, scale, mask var or None)."""
    ops, scale, mask = [softmax_op], 1.0, None
    x = softmax_op.inputs["x"]
    producer = x.op
    if producer is not None and producer.op_type == "add" and _only_reader(x, keep) is softmax_op:
        a, b = producer.inputs["x"], producer.inputs["y"]
        x, mask = (a, b) if a.op is not None and a.op.op_type in ("matmul", "mul", "real_div") else (b, a)
        ops.insert(0, producer)
        producer = x.op
    if producer is not None and producer.op_type in ("mul", "real_div"):
        factor = _scalar(producer.inputs["y"])
        if factor is None or _only_reader(x, keep) is not ops[0]:
            return None
        scale = factor if producer.op_type == "mul" else 1.0 / factor
        ops.insert(0, producer)
        x, producer = producer.inputs["x"], producer.inputs["x"].op
    if producer is None or producer.op_type != "matmul" or _only_reader(x, keep) is not ops[0]:
        return None
    return producer, ops, scale, mask


def match_group_norm(reduce_op, keep: set[int]) -> Fusion | None:
    """coremltools' GroupNorm lowering (reshape, mean, sub, square, mean, add eps, sqrt, div,
    reshape [, mul gamma [, add beta]])  =>  F.group_norm."""
    grouped = reduce_op.inputs["x"]
    head = grouped.op
    if head is None or head.op_type != "reshape" or not _keep_dims_over_tail(reduce_op, len(grouped.shape)):
        return None
    x = head.inputs["x"]
    if not _groups_channels(x.shape, grouped.shape):
        return None
    groups = grouped.shape[1]
    chain = _group_norm_chain(reduce_op, grouped, keep)
    if chain is None:
        return None
    ops, eps, normalized = chain
    tail = _only_reader(normalized, keep)
    # the result may come back in another spatial layout, e.g. (N, C, H*W) from (N, C, H, W)
    if tail is None or tail.op_type != "reshape" or not _same_channels(tail.outputs[0].shape, x.shape):
        return None
    out_shape = tuple(tail.outputs[0].shape)
    ops = [head] + ops + [tail]
    gamma, beta, ops = _affine_after(tail.outputs[0], ops, x.shape[1], keep)
    names = [v for v in (gamma, beta) if v is not None]
    has_gamma, has_beta = gamma is not None, beta is not None

    def run(x, *params):
        weight = params[0].reshape(-1) if has_gamma else None
        bias = params[-1].reshape(-1) if has_beta else None
        y = F.group_norm(x, groups, weight, bias, eps)
        return y if tuple(y.shape) == out_shape else y.reshape(out_shape)

    return Fusion("fused_group_norm", tuple(ops), Kernel(run, (x, *names)))


def _static(shape) -> bool:
    return all(isinstance(d, (int, np.integer)) for d in shape)


def _groups_channels(x_shape, grouped_shape) -> bool:
    """x (N, C, *spatial) viewed as (N, G, C/G, *rest) with the same number of spatial elements."""
    if not (_static(x_shape) and _static(grouped_shape)) or len(x_shape) < 2 or len(grouped_shape) < 3:
        return False
    return (grouped_shape[0] == x_shape[0] and grouped_shape[1] * grouped_shape[2] == x_shape[1]
            and np.prod(grouped_shape[3:]) == np.prod(x_shape[2:]))


def _same_channels(shape, x_shape) -> bool:
    return (_static(shape) and len(shape) >= 2 and tuple(shape[:2]) == tuple(x_shape[:2])
            and np.prod(shape[2:]) == np.prod(x_shape[2:]))


def _keep_dims_over_tail(op, rank: int) -> bool:
    axes = _const(op.inputs.get("axes"))
    if axes is None or not bool(_const(op.inputs.get("keep_dims"))):
        return False
    return sorted(int(a) % rank for a in np.asarray(axes).reshape(-1)) == list(range(2, rank))


def _group_norm_chain(mean_op, grouped, keep):
    """mean -> sub -> square -> mean -> add eps -> sqrt -> real_div; returns (ops, eps, output)."""
    readers = grouped.child_ops
    if len(readers) != 2 or id(grouped) in keep:
        return None
    sub = next((r for r in readers if r is not mean_op), None)
    if sub is None or sub.op_type != "sub" or sub.inputs["x"] is not grouped or sub.inputs["y"] is not mean_op.outputs[0]:
        return None
    if _only_reader(mean_op.outputs[0], keep) is not sub:
        return None
    centered = sub.outputs[0]
    users = centered.child_ops
    if len(users) != 2 or id(centered) in keep:
        return None
    square = next((u for u in users if u.op_type == "square"), None)
    div = next((u for u in users if u.op_type == "real_div"), None)
    if square is None or div is None or div.inputs["x"] is not centered:
        return None
    mean2 = _only_reader(square.outputs[0], keep)
    if mean2 is None or mean2.op_type != "reduce_mean" or not _keep_dims_over_tail(mean2, len(grouped.shape)):
        return None
    add = _only_reader(mean2.outputs[0], keep)
    if add is None or add.op_type != "add":
        return None
    other = add.inputs["y"] if add.inputs["x"] is mean2.outputs[0] else add.inputs["x"]
    eps = _scalar(other)
    sqrt = _only_reader(add.outputs[0], keep)
    if eps is None or sqrt is None or sqrt.op_type != "sqrt" or _only_reader(sqrt.outputs[0], keep) is not div:
        return None
    if div.inputs["y"] is not sqrt.outputs[0]:
        return None
    return [mean_op, sub, square, mean2, add, sqrt, div], eps, div.outputs[0]


def _affine_after(var, ops, channels: int, keep):
    """Optional per-channel mul (gamma) then add (beta) with constants of C elements."""
    gamma = beta = None
    reader = _only_reader(var, keep)
    if reader is not None and reader.op_type == "mul":
        other = _other_operand(reader, var)
        if other is not None and _per_channel(other, channels, len(var.shape)):
            gamma, ops, var = other, ops + [reader], reader.outputs[0]
            reader = _only_reader(var, keep)
    if reader is not None and reader.op_type == "add":
        other = _other_operand(reader, var)
        if other is not None and _per_channel(other, channels, len(var.shape)):
            beta, ops = other, ops + [reader]
    return gamma, beta, ops


def _other_operand(op, var):
    if op.inputs["x"] is var:
        return op.inputs["y"]
    if op.inputs["y"] is var:
        return op.inputs["x"]
    return None


def _per_channel(var, channels: int, rank: int) -> bool:
    value = _const(var)
    if value is None:
        return False
    shape = tuple(np.shape(value))
    # broadcastable as (1, C, 1, ...) against a rank-`rank` tensor
    padded = (1,) * (rank - len(shape)) + shape
    return len(padded) == rank and padded[1] == channels and all(d == 1 for i, d in enumerate(padded) if i != 1)


_ANCHORS: dict[str, Callable] = {"softmax": match_attention, "reduce_mean": match_group_norm}


def find_fusions(function) -> dict[int, Fusion]:
    """id(op) -> the fusion that op belongs to, for every matched group in `function`."""
    keep = {id(v) for v in function.outputs}
    found: dict[int, Fusion] = {}
    for op in function.operations:
        matcher = _ANCHORS.get(op.op_type)
        if matcher is None or id(op) in found:
            continue
        fusion = matcher(op, keep)
        if fusion is not None and not any(id(o) in found for o in fusion.ops):
            found.update((id(o), fusion) for o in fusion.ops)
    return found

