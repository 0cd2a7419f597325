"""Weight decompression ops (coremltools `ops/defs/iOS16/constexpr_ops.py`, `iOS18/compression.py`).

They run once, when an executor prepares its constants, never per call. iOS16 forms carry packed
bit fields (LSB first) plus an explicit `shape`; iOS18 forms arrive from the loader already unpacked
to one integer per element, with blockwise (per-group) scales and lookup tables whose leading dims
divide the output's. Arithmetic is fp32; the executor then stores the result in the op's type.
"""

from __future__ import annotations

import math

import torch

from coreml_sd.mil.registry import OpView, register_op


def unpack_bits(packed: torch.Tensor, nbits: int, count: int) -> torch.Tensor:
    """`count` unsigned `nbits`-wide values packed LSB-first into bytes, as int64."""
    packed = packed.reshape(-1).to(torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1)[: count * nbits]
    weights = (1 << torch.arange(nbits, device=packed.device)).to(torch.int64)
    return (bits.reshape(count, nbits).to(torch.int64) * weights).sum(1)


def _promote(param: torch.Tensor, rank: int, axis: int) -> torch.Tensor:
    """A scalar or vector along `axis` reshaped to broadcast against a rank-`rank` tensor."""
    if param.dim() == rank:
        return param
    if param.dim() == 0:
        return param.reshape((1,) * rank)
    shape = [1] * rank
    shape[axis % rank] = -1
    return param.reshape(shape)


@register_op("constexpr_affine_dequantize")
def affine_dequantize(op: OpView):
    axis = op.const_int("axis")

    def run(data, zero_point, scale):
        rank = data.dim()
        x = data.to(torch.float32) - _promote(zero_point.to(torch.float32), rank, axis)
        return x * _promote(scale.to(torch.float32), rank, axis)

    return op.kernel(run, "quantized_data", "zero_point", "scale")


@register_op("constexpr_cast")
def constexpr_cast(op: OpView):
    target = op.out_torch_dtype()
    return op.kernel(lambda x: x.to(target), "source_val")


def blockwise(data: torch.Tensor, param: torch.Tensor, fn) -> torch.Tensor:
    """`fn(data, param)` with `param` repeated blockwise to data's shape (block = ratio of sizes)."""
    split, pshape = [], []
    for d, p in zip(data.shape, param.shape):
        split += [p, d // p]
        pshape += [p, 1]
    return fn(data.reshape(split), param.reshape(pshape)).reshape(data.shape)


def shift_scale(data: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    x = data.to(torch.float32)
    if offset is not None:
        x = blockwise(x, offset.to(torch.float32), torch.sub)
    return blockwise(x, scale.to(torch.float32), torch.mul)


@register_op("constexpr_blockwise_shift_scale")
def blockwise_shift_scale(op: OpView):
    if op.has("offset"):
        return op.kernel(shift_scale, "data", "scale", "offset")
    return op.kernel(lambda data, scale: shift_scale(data, scale, None), "data", "scale")


def lut_lookup(indices: torch.Tensor, lut: torch.Tensor, vector_axis: int | None) -> torch.Tensor:
    """iOS18 lookup: `lut` (*blocks, palettes, vector) indexed per block by `indices`."""
    rank = indices.dim()
    blocks = lut.shape[:rank]
    palettes, vector = lut.shape[-2], lut.shape[-1]
    # Broadcast each block's table over its block of indices, then pick the indexed entry.
    split, tshape = [], []
    for d, b in zip(indices.shape, blocks):
        split += [b, d // b]
        tshape += [b, 1]
    idx = indices.to(torch.int64).reshape(split).unsqueeze(-1).unsqueeze(-1)
    table = lut.reshape(tshape + [palettes, vector])
    idx = idx.expand(*idx.shape[:-2], 1, vector)
    table = table.expand(*idx.shape[:-2], palettes, vector)
    values = torch.gather(table, -2, idx).squeeze(-2)  # (*split, vector)
    values = values.reshape(tuple(indices.shape) + (vector,))
    if vector == 1:
        return values.squeeze(-1)
    axis = vector_axis % rank
    # Each index expands into `vector` consecutive elements along `axis`.
    values = values.movedim(-1, axis + 1)
    shape = list(indices.shape)
    shape[axis] *= vector
    return values.reshape(shape)


@register_op("constexpr_lut_to_dense")
def lut_to_dense(op: OpView):
    if op.has("shape"):  # iOS16: packed indices, flat table, explicit shape
        shape = op.const_ints("shape")
        count = math.prod(shape)

        def run16(indices, lut):
            nbits = int(math.log2(lut.shape[0]))
            return lut[unpack_bits(indices, nbits, count)].reshape(shape)

        return op.kernel(run16, "indices", "lut")
    axis = op.const_int("vector_axis", None)
    return op.kernel(lambda indices, lut: lut_lookup(indices, lut, axis), "indices", "lut")


def scatter_mask(nonzero: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dense tensor of mask's shape: `nonzero` values in order where mask is set, else 0."""
    out = torch.zeros(mask.shape, dtype=nonzero.dtype, device=nonzero.device)
    out[mask.to(torch.bool)] = nonzero
    return out


@register_op("constexpr_sparse_to_dense")
def sparse_to_dense(op: OpView):
    if op.has("shape"):  # iOS16: the mask is packed bits
        shape = op.const_ints("shape")
        count = math.prod(shape)

        def run16(nonzero, mask):
            bits = unpack_bits(mask, 1, count).reshape(shape)
            return scatter_mask(nonzero, bits)

        return op.kernel(run16, "nonzero_data", "mask")
    return op.kernel(scatter_mask, "nonzero_data", "mask")


@register_op("constexpr_lut_to_sparse")
def lut_to_sparse(op: OpView):
    axis = op.const_int("vector_axis", None)

    def run(mask, nonzero_indices, lut):
        dense = lut_lookup(scatter_mask(nonzero_indices, mask), lut, axis)
        if lut.shape[-1] > 1:
            mask = mask.repeat_interleave(lut.shape[-1], dim=axis % mask.dim())
        return mask, dense[mask.to(torch.bool)]

    return op.kernel(run, "indices_mask", "indices_nonzero_data", "lut")


@register_op("constexpr_sparse_blockwise_shift_scale")
def sparse_blockwise_shift_scale(op: OpView):
    has_offset = op.has("offset")

    def run(mask, nonzero, scale, offset=None):
        dense = shift_scale(scatter_mask(nonzero, mask), scale, offset if has_offset else None)
        return mask, dense[mask.to(torch.bool)]

    names = ["data_mask", "nonzero_data", "scale"] + (["offset"] if has_offset else [])
    return op.kernel(run, *names)
