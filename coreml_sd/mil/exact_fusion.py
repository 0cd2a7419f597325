"""Exact-mode attention: the q.k -> [scale] -> [mask] -> softmax -> .v chain in query blocks.

Exact mode must round every fp16 op's result as Core ML stores it, so it cannot hand attention to
SDPA as fast mode does (`fusion.py`). Op by op, though, each op writes a whole (Sk, Sq) score
matrix per head (64 MB in fp32 at 4096 tokens) to memory and the next reads it back: the SD 1.5
UNet's gate spent most of its attention time there. Every query's row of the chain depends only
on that query, so this kernel runs the same ops, each computed in fp32 from fp16 values and
rounded to fp16 when its output type is fp16, over blocks of queries small enough to stay in
cache. The arithmetic per element is the ops' own; only the matrix products' summation order
may differ, as between any two BLAS calls.

The chains matched are fast mode's (split-einsum pairs per head, heads-as-batch matmuls), found by
the same walk (`fusion.attention_chain`); the group must have no other readers of its
intermediates.
"""

from __future__ import annotations

import torch

from coreml_sd.mil.fusion import Fusion, _scalar, attention_chain
from coreml_sd.mil.registry import Kernel, mil_dtype_name

BLOCK_ELEMENTS = 2**19  # score elements per block (2 MB in fp32): cache-sized


def match_exact_attention(softmax_op, keep: set[int]) -> Fusion | None:
    matched = attention_chain(softmax_op, keep)
    if matched is None:
        return None
    first, chain, _, mask, second, (q, k, v), prepare, finish, mask_layout = matched
    steps = tuple(_step(op) for op in chain[:-1])  # between the product and the softmax
    rounds = tuple(mil_dtype_name(op.outputs[0]) == "fp16" for op in [first, *chain, second])

    def run(q, k, v, *maybe_mask):
        q, k, v = prepare(q, k, v)
        m = mask_layout(maybe_mask[0]) if maybe_mask else None
        return finish(blocked_attention(q, k, v, m, steps, rounds))

    args = (q, k, v) + ((mask,) if mask is not None else ())
    return Fusion("exact_attention", tuple([first, *chain, second]), Kernel(run, args))


def _step(op) -> tuple[str, float | None]:
    """('mul' | 'real_div', scalar) for the scale, ('add', None) for the mask."""
    if op.op_type in ("mul", "real_div"):
        return op.op_type, _scalar(op.inputs["y"])
    return "add", None


def _round(x: torch.Tensor, rounds: bool) -> torch.Tensor:
    return x.half().float() if rounds else x


def blocked_attention(q, k, v, mask, steps, rounds) -> torch.Tensor:
    """q (..., Sq, d), k (..., Sk, d), v (..., Sk, dv), mask broadcastable to (..., Sq, Sk) or None;
    `rounds`: per op of the chain (product, steps..., softmax, product), round its result to fp16."""
    k32, v32 = k.float(), v.float()
    kt = k32.transpose(-1, -2)
    batch = max(1, q[..., 0, 0].numel())
    rows = max(1, BLOCK_ELEMENTS // (batch * k.shape[-2]))
    out = []
    for start in range(0, q.shape[-2], rows):
        stop = min(start + rows, q.shape[-2])
        s = _round(q[..., start:stop, :].float() @ kt, rounds[0])
        for i, (kind, value) in enumerate(steps, start=1):
            if kind == "mul":
                s = s * value
            elif kind == "real_div":
                s = s / value
            else:
                s = s + (mask if mask.shape[-2] == 1 else mask[..., start:stop, :]).float()
            s = _round(s, rounds[i])
        p = _round(torch.softmax(s, dim=-1), rounds[-2])
        out.append(_round(p @ v32, rounds[-1]))
    return torch.cat(out, dim=-2)


def find_exact_fusions(function) -> dict[int, Fusion]:
    """id(op) -> exact-mode fusion, for every attention chain of `function` that matches."""
    keep = {id(v) for v in function.outputs}
    found: dict[int, Fusion] = {}
    for op in function.operations:
        if op.op_type != "softmax" or id(op) in found:
            continue
        fusion = match_exact_attention(op, keep)
        if fusion is not None and not any(id(o) in found for o in fusion.ops):
            found.update((id(o), fusion) for o in fusion.ops)
    return found
