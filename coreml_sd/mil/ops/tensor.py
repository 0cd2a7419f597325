"""Layout ops: reshape, transpose, slicing, concat/split/stack, pad, tile and friends.

Semantics from coremltools `ops/defs/iOS15/tensor_transformation.py` and `tensor_operation.py`
(+ iOS16/17 variants). Where the program knows an op's output shape statically (the usual case for
converted Stable Diffusion models), the reshape family uses it directly; the dynamic rules (0 copies
a dimension, -1 is inferred) apply otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from coreml_sd.mil.registry import OpView, register_op

PAD_MODES = ("constant", "reflect", "replicate")


def _static(shape) -> bool:
    return all(d is not None for d in shape)


def _to_ints(value) -> list[int]:
    return [int(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]


@register_op("reshape", keeps_values=True)
def reshape(op: OpView):
    out = op.out_shape()
    if _static(out):
        return op.kernel(lambda x: x.reshape(out), "x")

    def run(x, shape):
        target = _to_ints(shape)
        if 0 in target:
            target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
        return x.reshape(target)

    return op.kernel(run, "x", "shape")


@register_op("reshape_like", "expand_dims", "squeeze", "flatten2d", keeps_values=True)
def reshape_static(op: OpView):
    out = op.out_shape()
    if _static(out):
        return op.kernel(lambda x: x.reshape(out), "x")
    if op.type == "expand_dims":
        axes = op.const_ints("axes")
        rank = op.rank("x") + len(axes)
        positions = sorted(a % rank for a in axes)

        def unsqueeze(x):
            for a in positions:
                x = x.unsqueeze(a)
            return x

        return op.kernel(unsqueeze, "x")
    if op.type == "squeeze" and op.has("axes"):
        dims = tuple(a % op.rank("x") for a in op.const_ints("axes"))
        return op.kernel(lambda x: x.squeeze(dims), "x")
    if op.type == "squeeze":
        return op.kernel(lambda x: x.squeeze(), "x")
    if op.type == "flatten2d":
        axis = op.const_int("axis", 1) % max(op.rank("x"), 1)
        return op.kernel(lambda x: x.reshape(int(torch.tensor(x.shape[:axis]).prod()), -1), "x")
    raise op.error("needs a static output shape")


@register_op("transpose", keeps_values=True)
def transpose(op: OpView):
    perm = op.const_ints("perm")
    return op.kernel(lambda x: x.permute(perm), "x")


@register_op("concat", keeps_values=True)
def concat(op: OpView):
    values = op.vars("values")
    axis = op.const_int("axis")
    interleave = op.const_bool("interleave", False)
    if all(len(_shape(v)) == 0 for v in values):  # scalars concatenate into a vector
        return op.kernel(lambda *xs: torch.stack(xs), *values)
    if interleave:
        rank = len(_shape(values[0]))
        a = axis % rank
        return op.kernel(lambda *xs: torch.stack(xs, dim=a + 1).flatten(a, a + 1), *values)
    return op.kernel(lambda *xs: torch.cat(xs, dim=axis), *values)


def _shape(var) -> tuple:
    return tuple(getattr(var, "shape", ()) or ())


@register_op("stack", keeps_values=True)
def stack(op: OpView):
    axis = op.const_int("axis")
    return op.kernel(lambda *xs: torch.stack(xs, dim=axis), *op.vars("values"))


@register_op("split", keeps_values=True)
def split(op: OpView):
    axis = op.const_int("axis")
    outs = op.outputs
    sizes = [op.out_shape(i)[axis] for i in range(len(outs))]
    if any(s is None for s in sizes):
        if op.has("split_sizes"):
            sizes = list(op.const_ints("split_sizes"))
        else:
            count = op.const_int("num_splits")
            return op.kernel(lambda x: tuple(torch.chunk(x, count, dim=axis)), "x")
    return op.kernel(lambda x: tuple(torch.split(x, sizes, dim=axis)), "x")


def slice_plan(shape, begin, end, stride, begin_mask, end_mask, squeeze_mask):
    """numpy-style per-dim (start, stop, step, squeeze) for `x[begin:end:stride]` (MIL semantics)."""
    rank = len(shape)
    stride = list(stride) if stride is not None else [1] * rank
    begin_mask = begin_mask or [False] * rank
    end_mask = end_mask or [False] * rank
    squeeze_mask = squeeze_mask or [False] * rank
    plan = []
    for i, size in enumerate(shape):
        if squeeze_mask[i]:
            index = begin[i] + size if begin[i] < 0 else begin[i]
            plan.append((index, index + 1, 1, True))
            continue
        b = None if begin_mask[i] else begin[i]
        e = None if end_mask[i] else end[i]
        start, stop, step = slice(b, e, stride[i]).indices(size)
        plan.append((start, stop, step, False))
    return plan


def apply_slice_plan(x: torch.Tensor, plan) -> torch.Tensor:
    simple = []
    for start, stop, step, _ in plan:
        simple.append(slice(start, stop, step) if step > 0 else slice(None))
    y = x[tuple(simple)]
    for dim, (start, stop, step, _) in enumerate(plan):
        if step < 0:  # torch slices only forward: gather the reversed positions
            index = torch.arange(start, stop, step, device=x.device)
            y = y.index_select(dim, index)
    squeeze = [dim for dim, p in enumerate(plan) if p[3]]
    return y.squeeze(squeeze) if squeeze else y


@register_op("slice_by_index", keeps_values=True)
def slice_by_index(op: OpView):
    masks = [op.const_bools(n, None) for n in ("begin_mask", "end_mask", "squeeze_mask")]
    stride = op.const_ints("stride", None)
    shape = op.shape("x")
    if op.is_const("begin") and op.is_const("end") and _static(shape):
        plan = slice_plan(shape, op.const_ints("begin"), op.const_ints("end"), stride, *masks)
        if all(step > 0 for _, _, step, _ in plan):
            index = tuple(p[0] if p[3] else slice(p[0], p[1], p[2]) for p in plan)
            return op.kernel(lambda x: x[index], "x")
        return op.kernel(lambda x: apply_slice_plan(x, plan), "x")

    def run(x, begin, end):
        return apply_slice_plan(x, slice_plan(x.shape, _to_ints(begin), _to_ints(end), stride, *masks))

    return op.kernel(run, "x", "begin", "end")


@register_op("slice_by_size", keeps_values=True)
def slice_by_size(op: OpView):
    def narrow(x, begin, size):
        for dim, (b, s) in enumerate(zip(_to_ints(begin), _to_ints(size))):
            b = b + x.shape[dim] if b < 0 else b
            x = x.narrow(dim, b, x.shape[dim] - b if s == -1 else s)
        return x

    if op.is_const("begin") and op.is_const("size"):
        begin, size = op.const_ints("begin"), op.const_ints("size")
        return op.kernel(lambda x: narrow(x, begin, size), "x")
    return op.kernel(narrow, "x", "begin", "size")


@register_op("reverse", keeps_values=True)
def reverse(op: OpView):
    rank = op.rank("x")
    axes = op.const_ints("axes", None)
    dims = tuple(range(rank)) if axes is None else tuple(a % rank for a in axes)
    return op.kernel(lambda x: torch.flip(x, dims), "x")


@register_op("tile", keeps_values=True)
def tile(op: OpView):
    if op.is_const("reps"):
        reps = op.const_ints("reps")
        return op.kernel(lambda x: x.repeat(reps), "x")
    return op.kernel(lambda x, reps: x.repeat(_to_ints(reps)), "x", "reps")


@register_op("pad", keeps_values=True)
def pad(op: OpView):
    mode = op.const_str("mode", "constant")
    if mode not in PAD_MODES:
        raise op.error(f"pad mode {mode!r} is unknown; valid: {', '.join(PAD_MODES)}")
    value = op.const_float("constant_val", 0.0)
    if op.is_const("pad"):
        pads = op.const_ints("pad")
        return op.kernel(lambda x: pad_tensor(x, pads, mode, value), "x")
    return op.kernel(lambda x, p: pad_tensor(x, _to_ints(p), mode, value), "x", "pad")


def pad_tensor(x: torch.Tensor, pads, mode: str, value: float) -> torch.Tensor:
    """MIL pad: `pads` holds (before, after) for the last len(pads)/2 dims, outermost first."""
    n = len(pads) // 2
    if mode == "constant":
        torch_pads = []
        for i in reversed(range(n)):
            torch_pads += [pads[2 * i], pads[2 * i + 1]]
        return F.pad(x, torch_pads, value=value)
    for i in range(n):
        dim = x.dim() - n + i
        before, after = pads[2 * i], pads[2 * i + 1]
        if before or after:
            x = x.index_select(dim, _pad_index(x.shape[dim], before, after, mode, x.device))
    return x


def _pad_index(size: int, before: int, after: int, mode: str, device) -> torch.Tensor:
    positions = torch.arange(-before, size + after, device=device)
    if mode == "replicate":
        return positions.clamp(0, size - 1)
    # reflect without repeating the edge: -1 -> 1, size -> size - 2
    positions = positions.abs()
    return torch.where(positions >= size, 2 * (size - 1) - positions, positions)


@register_op("shape")
def shape(op: OpView):
    dtype = op.out_torch_dtype()
    return op.kernel(lambda x: torch.tensor(tuple(x.shape), dtype=dtype, device=x.device), "x")


@register_op("fill")
def fill(op: OpView):
    value = op.const("value", 0.0)
    dtype, device = op.out_torch_dtype(), op.device
    value = value.item() if hasattr(value, "item") else value
    out = op.out_shape()
    if _static(out):
        return op.kernel(lambda s: torch.full(out, value, dtype=dtype, device=device), "shape")
    return op.kernel(lambda s: torch.full(_to_ints(s), value, dtype=dtype, device=device), "shape")


@register_op("fill_like")
def fill_like(op: OpView):
    value = op.const("value", 0.0)
    value = value.item() if hasattr(value, "item") else value
    dtype = op.out_torch_dtype()
    return op.kernel(lambda ref: torch.full(ref.shape, value, dtype=dtype, device=ref.device), "ref_tensor")


@register_op("range_1d")
def range_1d(op: OpView):
    dtype = op.out_torch_dtype()

    def run(end, start, step):
        return torch.arange(start.item(), end.item(), step.item(), device=end.device).to(dtype)

    return op.kernel(run, "end", "start", "step")


@register_op("band_part")
def band_part(op: OpView):
    lower, upper = op.const_int("lower", -1), op.const_int("upper", -1)

    def run(x):
        m, n = x.shape[-2:]
        rows = torch.arange(m, device=x.device).unsqueeze(1)
        cols = torch.arange(n, device=x.device).unsqueeze(0)
        keep = torch.ones((m, n), dtype=torch.bool, device=x.device)
        if lower >= 0:
            keep &= (rows - cols) <= lower
        if upper >= 0:
            keep &= (cols - rows) <= upper
        return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))

    return op.kernel(run, "x")


@register_op("cumsum")
def cumsum(op: OpView):
    axis = op.const_int("axis", 0)
    exclusive, reverse_ = op.const_bool("exclusive", False), op.const_bool("reverse", False)

    def run(x):
        y = torch.flip(x, (axis,)) if reverse_ else x
        out = torch.cumsum(y, dim=axis).to(x.dtype)
        if exclusive:
            out = out - y
        return torch.flip(out, (axis,)) if reverse_ else out

    return op.kernel(run, "x")


@register_op("one_hot")
def one_hot(op: OpView):
    axis = op.const_int("axis", -1)
    on, off = op.const("on_value", 1).item(), op.const("off_value", 0).item()
    dtype = op.out_torch_dtype()
    rank = op.rank("indices") + 1

    def run(indices, depth):
        hot = F.one_hot(indices.long(), int(depth.item()))
        out = torch.where(hot.bool(), torch.tensor(on, dtype=dtype), torch.tensor(off, dtype=dtype))
        return out.movedim(-1, axis % rank)

    return op.kernel(run, "indices", "one_hot_vector_size")


@register_op("topk")
def topk(op: OpView):
    k, axis = op.const_int("k", 1), op.const_int("axis", -1)
    ascending = op.const_bool("ascending", False)
    with_indices = op.const_bool("return_indices", True)
    index_dtype = op.out_torch_dtype(1) if with_indices else None

    def run(x):
        values, indices = torch.topk(x, k, dim=axis, largest=not ascending, sorted=True)
        return (values, indices.to(index_dtype)) if with_indices else values

    return op.kernel(run, "x")


@register_op("argsort")
def argsort(op: OpView):
    axis, ascending = op.const_int("axis", -1), op.const_bool("ascending", False)
    dtype = op.out_torch_dtype()
    return op.kernel(lambda x: torch.argsort(x, dim=axis, descending=not ascending, stable=True).to(dtype), "x")


@register_op("non_zero")
def non_zero(op: OpView):
    return op.kernel(lambda x: torch.nonzero(x).to(torch.int32), "x")


@register_op("pixel_shuffle", keeps_values=True)
def pixel_shuffle(op: OpView):
    factor = op.const_int("upscale_factor")
    return op.kernel(lambda x: F.pixel_shuffle(x, factor), "x")


@register_op("pixel_unshuffle", keeps_values=True)
def pixel_unshuffle(op: OpView):
    factor = op.const_int("downscale_factor")
    return op.kernel(lambda x: F.pixel_unshuffle(x, factor), "x")


@register_op("depth_to_space", keeps_values=True)
def depth_to_space(op: OpView):
    # TensorFlow's DCR order (MIL took the op from there): the block index is the outer part of
    # the channel, unlike pixel_shuffle where the channel is outer.
    b = op.const_int("block_size")

    def run(x):
        n, c, h, w = x.shape
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
        return y.reshape(n, c // (b * b), h * b, w * b)

    return op.kernel(run, "x")


@register_op("space_to_depth", keeps_values=True)
def space_to_depth(op: OpView):
    b = op.const_int("block_size")

    def run(x):
        n, c, h, w = x.shape
        y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
        return y.reshape(n, c * b * b, h // b, w // b)

    return op.kernel(run, "x")


@register_op("slice_update", keeps_values=True)
def slice_update(op: OpView):
    masks = [op.const_bools(n, None) for n in ("begin_mask", "end_mask", "squeeze_mask")]
    stride = op.const_ints("stride", None)

    def run(x, update, begin, end):
        plan = slice_plan(x.shape, _to_ints(begin), _to_ints(end), stride, *masks)
        if any(step < 0 for _, _, step, _ in plan):
            raise NotImplementedError("slice_update with negative strides")
        out = x.clone()
        index = tuple(slice(a, b, s) for a, b, s, _ in plan)
        out[index] = update.reshape(out[index].shape)
        return out

    return op.kernel(run, "x", "update", "begin", "end")
