"""Op-group fusions for `fast` mode: patterns coremltools decomposes, run as one torch kernel.

coremltools lowers torch's attention to matmul -> softmax -> matmul and GroupNorm to ten
reductions and elementwise ops; `coreml-sd convert` writes attention as per-head einsum pairs
(Neural Engine) or heads-as-batch matmuls (GPU), and GroupNorm / channel LayerNorm as mean, sub,
mul, mean, rsqrt, mul. Run op by op in bf16 they cost far more than the fused kernels
torch eager uses (`F.scaled_dot_product_attention`, `F.group_norm`), and round every
intermediate. A fusion replaces exactly such a chain when every intermediate value has no other
reader; anything that does not match runs op by op. `exact` mode must round after every op as
Core ML does: it runs attention chains with their roundings in query blocks (`exact_fusion.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch.nn.functional as F

from coreml_sd.mil.registry import Kernel


FUSION_KINDS = ("fused_attention", "fused_group_norm", "fused_layer_norm", "exact_attention")


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
    """scores [* s | / s] [+ mask] -> softmax over the keys -> (. v)  =>  SDPA, in two families:

    * matmul: `matmul(q, k)` with any transpose flags and softmax over the last axis, then
      `matmul(p, v)` or `matmul(v, p, transpose_y=True)` (heads-as-batch layouts: coremltools'
      torch frontend, and `coreml-sd convert --attention original`, which keeps (B, h, d, S));
    * einsum: MIL's `nchw,nwhu->nchu` pair over (B, S, H, ..) slices (Apple's and coreml-sd's
      split-einsum attention for the Neural Engine): `einsum(k, q)` with softmax over axis 1, then
      `einsum(v, p)`.
    """
    matched = attention_chain(softmax_op, keep)
    if matched is None:
        return None
    first, ops, scale, mask, second, (q, k, v), prepare, finish, mask_layout = matched

    def run(q, k, v, *maybe_mask):
        q, k, v = prepare(q, k, v)
        m = mask_layout(maybe_mask[0]).to(q.dtype) if maybe_mask else None
        return finish(F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale))

    args = (q, k, v) + ((mask,) if mask is not None else ())
    return Fusion("fused_attention", tuple([first] + ops + [second]), Kernel(run, args))


def attention_chain(softmax_op, keep: set[int]):
    """The attention group around `softmax_op` (see `match_attention`), shared by fast and exact
    mode: (first product, ops between it and the softmax (the softmax last), scale, mask, second
    product, (q, k, v), prepare, finish, mask layout), or None when it is not one."""
    x = softmax_op.inputs["x"]
    rank = len(x.shape)
    axis = _scalar(softmax_op.inputs.get("axis"))
    axis = -1 if axis is None else int(axis) % rank if rank else None
    if rank not in (3, 4):
        return None
    scores = _scores_chain(softmax_op, keep)
    if scores is None:
        return None
    first, ops, scale, mask = scores
    second = _only_reader(softmax_op.outputs[0], keep)
    if second is None:
        return None
    if first.op_type == "matmul" and axis in (-1, rank - 1):
        layout = _matmul_layout(first, second, softmax_op.outputs[0])
    elif first.op_type == "einsum" and rank == 4 and axis == 1:
        layout = _einsum_layout(first, second, softmax_op.outputs[0])
    else:
        return None
    if layout is None:
        return None
    (q, k, v), prepare, finish, mask_layout = layout
    if mask is not None and mask_layout is None:
        return None
    return first, ops, scale, mask, second, (q, k, v), prepare, finish, mask_layout


def _t(x):
    return x.transpose(-1, -2)


def _same(x):
    return x


def _matmul_layout(first, second, probs):
    """(q, k, v vars), prepare(q, k, v) -> SDPA operands, finish(out), mask layout; or None."""
    if second.op_type != "matmul":
        return None
    q, k = first.inputs["x"], first.inputs["y"]
    tq, tk = bool(_const(first.inputs.get("transpose_x"))), bool(_const(first.inputs.get("transpose_y")))
    tx, ty = bool(_const(second.inputs.get("transpose_x"))), bool(_const(second.inputs.get("transpose_y")))
    rank = len(probs.shape)
    if second.inputs["x"] is probs and second.inputs["y"] is not probs and not tx:
        v, tv, out_t = second.inputs["y"], ty, False  # out = p @ v
    elif second.inputs["y"] is probs and second.inputs["x"] is not probs and ty:
        v, tv, out_t = second.inputs["x"], not tx, True  # out = v @ p^T = (p @ v^T)^T
    else:
        return None
    if not all(len(t.shape) == rank for t in (q, k, v)):
        return None

    def prepare(q, k, v):
        # scores = op(q) @ op(k): SDPA takes q and k with the feature axis last
        return (_t(q) if tq else q), (k if tk else _t(k)), (_t(v) if tv else v)

    return (q, k, v), prepare, (_t if out_t else _same), _same


def _einsum_layout(first, second, probs):
    """MIL einsum nchw,nwhu->nchu (rank 4): per (n, h), out[:, :] = a @ b over axes (1, 3)."""
    from coreml_sd.mil.ops.linear import _EINSUM_RANK4, einsum_pattern

    if second.op_type != "einsum":
        return None
    for op in (first, second):
        equation = _const(op.inputs.get("equation"))
        if not isinstance(equation, str) and equation is not None:
            equation = str(np.asarray(equation).reshape(-1)[0]) if np.asarray(equation).size == 1 else None
        if equation is None or einsum_pattern(equation) != _EINSUM_RANK4 or len(op.inputs["values"]) != 2:
            return None
    k, q = first.inputs["values"]  # scores (n, Sk, h, Sq) = k (n, Sk, h, d) @ q (n, d, h, Sq)
    v, p = second.inputs["values"]  # out (n, d, h, Sq) = v (n, d, h, Sk) @ p (n, Sk, h, Sq)
    if p is not probs or v is probs:
        return None
    shapes = [tuple(t.shape) for t in (q, k, v)]
    # (the sequence axes 1 and 3 may be flexible: a program taking several image sizes)
    if not all(len(sh) == 4 and _static((sh[0], sh[2])) for sh in shapes) \
            or len({(sh[0], sh[2]) for sh in shapes}) != 1:
        return None  # SDPA needs one batch and head layout; MIL's size-1 broadcasting is left op by op

    def heads_first(x):  # (n, a, h, b) -> (n, h, a, b)
        return x.permute(0, 2, 1, 3)

    def prepare(q, k, v):
        return _t(heads_first(q)), heads_first(k), _t(heads_first(v))

    def finish(out):  # (n, h, Sq, d) -> (n, d, h, Sq)
        return _t(out).permute(0, 2, 1, 3)

    def mask_layout(m):  # additive, broadcast against scores (n, Sk, h, Sq) -> (n, h, Sq, Sk)
        return m.reshape((1,) * (4 - m.dim()) + tuple(m.shape)).permute(0, 2, 3, 1)

    return (q, k, v), prepare, finish, mask_layout


def _scores_chain(softmax_op, keep):
    """Walk back from softmax over an optional additive mask and scalar scale to the q.k product
    (matmul or einsum): (its op, ops between it and the softmax inclusive, scale, mask var or None)."""
    ops, scale, mask = [softmax_op], 1.0, None
    x = softmax_op.inputs["x"]
    producer = x.op
    if producer is not None and producer.op_type == "add" and _only_reader(x, keep) is softmax_op:
        a, b = producer.inputs["x"], producer.inputs["y"]
        x, mask = (a, b) if a.op is not None and a.op.op_type in ("matmul", "einsum", "mul", "real_div") else (b, a)
        ops.insert(0, producer)
        producer = x.op
    if producer is not None and producer.op_type in ("mul", "real_div"):
        factor = _scalar(producer.inputs["y"])
        if factor is None or _only_reader(x, keep) is not ops[0]:
            return None
        scale = factor if producer.op_type == "mul" else 1.0 / factor
        ops.insert(0, producer)
        x, producer = producer.inputs["x"], producer.inputs["x"].op
    if producer is None or producer.op_type not in ("matmul", "einsum") or _only_reader(x, keep) is not ops[0]:
        return None
    return producer, ops, scale, mask


def match_group_norm(reduce_op, keep: set[int]) -> Fusion | None:
    """GroupNorm lowered as reshape to (N, G, C/G, ..), mean, sub, square, mean, add eps, sqrt, div
    (coremltools) or mean, sub, mul, mean, rsqrt, mul (coreml-sd convert), reshape back
    [, mul gamma [, add beta]]  =>  F.group_norm."""
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
    if tail is None or tail.op_type != "reshape":
        return None
    if _shape_of(tail.inputs["shape"], x):  # flexible sizes: back to x's own shape, read when run
        out_shape = None
    elif _same_channels(tail.outputs[0].shape, x.shape):
        out_shape = tuple(tail.outputs[0].shape)
    else:
        return None
    ops = [head] + ops + [tail]
    gamma, beta, ops = _affine_after(tail.outputs[0], ops, x.shape[1], keep)
    names = [v for v in (gamma, beta) if v is not None]
    has_gamma, has_beta = gamma is not None, beta is not None

    def run(x, *params):
        weight = params[0].reshape(-1) if has_gamma else None
        bias = params[-1].reshape(-1) if has_beta else None
        y = F.group_norm(x, groups, weight, bias, eps)
        return y if out_shape is None or tuple(y.shape) == out_shape else y.reshape(out_shape)

    return Fusion("fused_group_norm", tuple(ops), Kernel(run, (x, *names)))


def _static(shape) -> bool:
    return all(isinstance(d, (int, np.integer)) for d in shape)


def _groups_channels(x_shape, grouped_shape) -> bool:
    """x (N, C, *spatial) viewed as (N, G, C/G, *rest) with the same number of spatial elements
    (flexible spatial sizes: the same product of the same symbols)."""
    if not (_static(x_shape[:2]) and _static(grouped_shape[:3])) or len(x_shape) < 2 or len(grouped_shape) < 3:
        return False
    return (grouped_shape[0] == x_shape[0] and grouped_shape[1] * grouped_shape[2] == x_shape[1]
            and _product(grouped_shape[3:]) == _product(x_shape[2:]))


def _product(dims):
    out = 1
    for d in dims:
        out = out * (int(d) if isinstance(d, (int, np.integer)) else d)
    return out


def _shape_of(var, x) -> bool:
    """`var` is computed as shape(x) (a reshape back to x's flexible shape)."""
    return var is not None and var.op is not None and var.op.op_type == "shape" and var.op.inputs["x"] is x


def _same_channels(shape, x_shape) -> bool:
    return (_static(shape) and len(shape) >= 2 and tuple(shape[:2]) == tuple(x_shape[:2])
            and np.prod(shape[2:]) == np.prod(x_shape[2:]))


def _keep_dims_over_tail(op, rank: int) -> bool:
    axes = _const(op.inputs.get("axes"))
    if axes is None or not bool(_const(op.inputs.get("keep_dims"))):
        return False
    return sorted(int(a) % rank for a in np.asarray(axes).reshape(-1)) == list(range(2, rank))


def _group_norm_chain(mean_op, grouped, keep, *, shared_input: bool = False):
    """mean -> sub -> square -> mean -> (add eps -> sqrt -> real_div | rsqrt(eps) -> mul), over the
    axes of `mean_op`; `square` may be mul(c, c) (coremltools' lowering and coreml-sd's own).
    `shared_input`: `grouped` is the fusion's input and may have other readers (a residual).
    Returns (ops, eps, output)."""
    axes = _const(mean_op.inputs.get("axes"))
    readers = _distinct(grouped.child_ops)
    if not shared_input and (len(readers) != 2 or id(grouped) in keep):
        return None
    sub = next((r for r in readers if r is not mean_op and r.op_type == "sub" and r.inputs["x"] is grouped
                and r.inputs["y"] is mean_op.outputs[0]), None)
    if sub is None or sub.op_type != "sub" or sub.inputs["x"] is not grouped or sub.inputs["y"] is not mean_op.outputs[0]:
        return None
    if _only_reader(mean_op.outputs[0], keep) is not sub:
        return None
    centered = sub.outputs[0]
    users = _distinct(centered.child_ops)
    if len(users) != 2 or id(centered) in keep:
        return None
    square = next((u for u in users if u.op_type == "square" or
                   u.op_type == "mul" and u.inputs["x"] is centered and u.inputs["y"] is centered), None)
    if square is None:
        return None
    normalize = next(u for u in users if u is not square)
    mean2 = _only_reader(square.outputs[0], keep)
    if mean2 is None or mean2.op_type != "reduce_mean" or not bool(_const(mean2.inputs.get("keep_dims"))) \
            or not np.array_equal(np.asarray(_const(mean2.inputs.get("axes"))), np.asarray(axes)):
        return None
    step = _only_reader(mean2.outputs[0], keep)
    if step is None:
        return None
    if step.op_type == "rsqrt":  # 1 / sqrt(var + epsilon), then centered * that
        eps = _scalar(step.inputs.get("epsilon")) if step.inputs.get("epsilon") is not None else 1e-12
        if eps is None or normalize.op_type != "mul" or _only_reader(step.outputs[0], keep) is not normalize \
                or _other_operand(normalize, centered) is not step.outputs[0]:
            return None
        return [mean_op, sub, square, mean2, step, normalize], eps, normalize.outputs[0]
    if step.op_type != "add":
        return None
    add = step
    eps = _scalar(add.inputs["y"] if add.inputs["x"] is mean2.outputs[0] else add.inputs["x"])
    sqrt = _only_reader(add.outputs[0], keep)
    if eps is None or sqrt is None or sqrt.op_type != "sqrt" or _only_reader(sqrt.outputs[0], keep) is not normalize:
        return None
    if normalize.op_type != "real_div" or normalize.inputs["x"] is not centered or normalize.inputs["y"] is not sqrt.outputs[0]:
        return None
    return [mean_op, sub, square, mean2, add, sqrt, normalize], eps, normalize.outputs[0]


def _distinct(ops) -> list:
    """Ops in order, each once (an op reading a value twice, as mul(c, c), may be listed twice)."""
    seen: dict[int, object] = {}
    for op in ops:
        seen.setdefault(id(op), op)
    return list(seen.values())


def match_channel_layer_norm(reduce_op, keep: set[int]) -> Fusion | None:
    """LayerNorm over the channel axis of a (B, C, 1, S) tensor, as `coreml-sd convert` emits it for
    the Neural Engine (mean over axis 1, sub, mul, mean, rsqrt, mul [, mul gamma [, add beta]])
    =>  F.layer_norm over the channels."""
    x = reduce_op.inputs["x"]
    axes = _const(reduce_op.inputs.get("axes"))
    keep_dims = bool(_const(reduce_op.inputs.get("keep_dims")))
    if len(x.shape) != 4 or not _static(x.shape[:2]) or axes is None or not keep_dims:
        return None
    if sorted(int(a) % 4 for a in np.asarray(axes).reshape(-1)) != [1]:
        return None
    chain = _group_norm_chain(reduce_op, x, keep, shared_input=True)
    if chain is None:
        return None
    ops, eps, normalized = chain
    channels = x.shape[1]
    gamma, beta, ops = _affine_after(normalized, ops, channels, keep)
    has_gamma, has_beta = gamma is not None, beta is not None

    def run(x, *params):
        weight = params[0].reshape(-1) if has_gamma else None
        bias = params[-1].reshape(-1) if has_beta else None
        y = F.layer_norm(x.permute(0, 2, 3, 1), (channels,), weight, bias, eps)
        return y.permute(0, 3, 1, 2)

    return Fusion("fused_layer_norm", tuple(ops), Kernel(run, (x, *[v for v in (gamma, beta) if v is not None])))


def match_norm(reduce_op, keep: set[int]) -> Fusion | None:
    return match_group_norm(reduce_op, keep) or match_channel_layer_norm(reduce_op, keep)


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


_ANCHORS: dict[str, Callable] = {"softmax": match_attention, "reduce_mean": match_norm}


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

