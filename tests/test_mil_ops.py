"""One test per MIL op kernel against numpy/torch references, in fp32 and fp16 programs.

Each case builds a one-op MIL program with coremltools' Builder (inputs are placeholders, so
nothing is constant-folded) and runs it with the executor in `exact` mode. fp16 cases feed fp16
inputs; the reference is computed in float64 from the same fp16 values, and the executor's output
must be fp16-representable (exact mode rounds fp16 results) and within fp16 rounding of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers_mil import mb, run_op, types

from coreml_sd.mil import compiler
from coreml_sd.mil.ops.image import grid_points
from coreml_sd.mil.registry import supported_ops

RNG = np.random.default_rng(0)


def rand(*shape, lo=-2.0, hi=2.0):
    return RNG.uniform(lo, hi, shape).astype(np.float32)


def ints(*shape, lo=0, hi=5):
    return RNG.integers(lo, hi, shape).astype(np.int32)


def bools(*shape):
    return RNG.random(shape) > 0.5


def c(value, like):
    """A constant of x's float type (MIL requires matching types for T-typed parameters)."""
    return np.array(value, dtype=types.nptype_from_builtin(like.dtype))


def t(a):
    return torch.from_numpy(np.asarray(a))


@dataclass
class Case:
    op: str
    body: Callable
    inputs: Callable[[], list]
    ref: Callable
    dtypes: tuple = ("fp32", "fp16")
    name: str = ""
    tol16: float = 2e-3
    extra_ops: tuple = field(default_factory=tuple)  # other registered ops this case covers

    @property
    def id(self):
        return f"{self.op}-{self.name}" if self.name else self.op


def _binary(op, fn, lo=-2.0, hi=2.0, ylo=None, yhi=None, shapes=((2, 3, 4), (3, 1))):
    return Case(op, lambda x, y: getattr(mb, op)(x=x, y=y),
                lambda: [rand(*shapes[0], lo=lo, hi=hi), rand(*shapes[1], lo=ylo or lo, hi=yhi or hi)], fn)


def _unary(op, fn, lo=-2.0, hi=2.0, **kw):
    return Case(op, lambda x: getattr(mb, op)(x=x, **kw), lambda: [rand(3, 5, lo=lo, hi=hi)], fn)


CASES = [
    _binary("add", np.add),
    _binary("sub", np.subtract),
    _binary("mul", np.multiply),
    _binary("real_div", np.divide, ylo=0.5, yhi=2.0),
    _binary("floor_div", np.floor_divide, lo=-5, hi=5, ylo=0.7, yhi=2.0),
    _binary("mod", np.mod, lo=-5, hi=5, ylo=0.7, yhi=2.0),
    _binary("pow", np.power, lo=0.2, hi=2.0),
    _binary("maximum", np.maximum),
    _binary("minimum", np.minimum),
    _binary("equal", lambda x, y: x == np.round(y), shapes=((4, 4), (4,))),
    _binary("not_equal", np.not_equal),
    _binary("less", np.less),
    _binary("less_equal", np.less_equal),
    _binary("greater", np.greater),
    _binary("greater_equal", np.greater_equal),
    Case("add", lambda x, y: mb.add(x=x, y=y), lambda: [ints(3, 4, lo=-9, hi=9), ints(4)], np.add,
         dtypes=("fp32",), name="int32"),
    *[Case(op, lambda x, y, op=op: getattr(mb, op)(x=x, y=y), lambda: [bools(3, 4), bools(3, 4)], fn, dtypes=("fp32",))
      for op, fn in (("logical_and", np.logical_and), ("logical_or", np.logical_or), ("logical_xor", np.logical_xor))],
    Case("logical_not", lambda x: mb.logical_not(x=x), lambda: [bools(5)], np.logical_not, dtypes=("fp32",)),
    _unary("abs", np.abs),
    _unary("acos", np.arccos, -0.9, 0.9),
    _unary("asin", np.arcsin, -0.9, 0.9),
    _unary("atan", np.arctan),
    _unary("atanh", np.arctanh, -0.9, 0.9),
    _unary("ceil", np.ceil),
    _unary("cos", np.cos),
    _unary("cosh", np.cosh),
    _unary("erf", lambda x: np.vectorize(math.erf)(x)),
    _unary("exp", np.exp),
    _unary("exp2", np.exp2),
    _unary("floor", np.floor),
    Case("round", lambda x: mb.round(x=x), lambda: [np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.7, -0.2], np.float32)],
         np.round),
    _unary("sign", np.sign),
    _unary("sin", np.sin),
    _unary("sinh", np.sinh),
    _unary("sqrt", np.sqrt, 0.0, 4.0),
    _unary("square", np.square),
    _unary("tan", np.tan, -1.2, 1.2),
    _unary("tanh", np.tanh),
    Case("inverse", lambda x: mb.inverse(x=x, epsilon=c(0.25, x)), lambda: [rand(4, 3, lo=0.5, hi=3)],
         lambda x: 1 / (x + 0.25)),
    Case("log", lambda x: mb.log(x=x, epsilon=c(0.5, x)), lambda: [rand(4, 3, lo=0.1, hi=3)], lambda x: np.log(x + 0.5)),
    Case("rsqrt", lambda x: mb.rsqrt(x=x, epsilon=c(0.5, x)), lambda: [rand(4, 3, lo=0.1, hi=3)],
         lambda x: 1 / np.sqrt(x + 0.5)),
    Case("clip", lambda x: mb.clip(x=x, alpha=c(-0.5, x), beta=c(0.75, x)), lambda: [rand(4, 5)],
         lambda x: np.clip(x, -0.5, 0.75)),
    Case("threshold", lambda x: mb.threshold(x=x, alpha=c(0.3, x)), lambda: [rand(4, 5)], lambda x: np.maximum(x, 0.3)),
    Case("cast", lambda x: mb.cast(x=x, dtype="int32"), lambda: [rand(3, 4, lo=-5, hi=5)], lambda x: np.trunc(x),
         name="to_int32"),
    Case("cast", lambda x: mb.cast(x=x, dtype="fp16"), lambda: [rand(3, 4) * 1.001], lambda x: x.astype(np.float16),
         dtypes=("fp32",), name="to_fp16", tol16=0),
    Case("cast", lambda x: mb.cast(x=x, dtype="bool"), lambda: [np.array([0.0, 1.5, -2.0, 0.0], np.float32)],
         lambda x: x != 0, name="to_bool"),
    Case("cast", lambda x: mb.cast(x=x, dtype="fp32"), lambda: [ints(3, 4, lo=-9, hi=9)], lambda x: x.astype(np.float64),
         dtypes=("fp32",), name="from_int32"),
    Case("identity", lambda x: mb.identity(x=x), lambda: [rand(2, 3)], lambda x: x),
    Case("select", lambda b, x, y: mb.select(cond=b, a=x, b=y), lambda: [bools(3, 4), rand(3, 4), rand(4)],
         lambda b, x, y: np.where(b, x, y)),
    # activations
    _unary("relu", lambda x: np.maximum(x, 0)),
    _unary("relu6", lambda x: np.clip(x, 0, 6), -3, 9),
    _unary("sigmoid", lambda x: 1 / (1 + np.exp(-x))),
    _unary("silu", lambda x: x / (1 + np.exp(-x))),
    _unary("softsign", lambda x: x / (1 + np.abs(x))),
    _unary("softplus", lambda x: np.log1p(np.exp(x))),
    Case("gelu", lambda x: mb.gelu(x=x), lambda: [rand(3, 7)], lambda x: F.gelu(t(x)).numpy(), name="exact"),
    Case("gelu", lambda x: mb.gelu(x=x, mode="TANH_APPROXIMATION"), lambda: [rand(3, 7)],
         lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))), name="tanh"),
    Case("gelu", lambda x: mb.gelu(x=x, mode="SIGMOID_APPROXIMATION"), lambda: [rand(3, 7)],
         lambda x: x / (1 + np.exp(-1.702 * x)), name="sigmoid"),
    Case("softmax", lambda x: mb.softmax(x=x, axis=1), lambda: [rand(2, 5, 3, lo=-4, hi=4)],
         lambda x: torch.softmax(t(x), 1).numpy()),
    Case("leaky_relu", lambda x: mb.leaky_relu(x=x, alpha=c(0.1, x)), lambda: [rand(4, 5)],
         lambda x: np.where(x >= 0, x, 0.1 * x)),
    Case("elu", lambda x: mb.elu(x=x, alpha=c(0.7, x)), lambda: [rand(4, 5)], lambda x: np.where(x > 0, x, 0.7 * np.expm1(x))),
    Case("thresholded_relu", lambda x: mb.thresholded_relu(x=x, alpha=c(0.5, x)), lambda: [rand(4, 5)],
         lambda x: np.where(x >= 0.5, x, 0)),
    Case("clamped_relu", lambda x: mb.clamped_relu(x=x, alpha=c(0.2, x), beta=c(1.0, x)), lambda: [rand(4, 5)],
         lambda x: np.minimum(np.where(x >= 0, x, 0.2 * x), 1.0)),
    Case("linear_activation", lambda x: mb.linear_activation(x=x, alpha=c(1.5, x), beta=c(-0.5, x)),
         lambda: [rand(4, 5)], lambda x: 1.5 * x - 0.5),
    Case("scaled_tanh", lambda x: mb.scaled_tanh(x=x, alpha=c(1.5, x), beta=c(0.5, x)), lambda: [rand(4, 5)],
         lambda x: 1.5 * np.tanh(0.5 * x)),
    Case("sigmoid_hard", lambda x: mb.sigmoid_hard(x=x, alpha=c(0.2, x), beta=c(0.5, x)), lambda: [rand(4, 5, lo=-4, hi=4)],
         lambda x: np.clip(0.2 * x + 0.5, 0, 1)),
    Case("prelu", lambda x: mb.prelu(x=x, alpha=c([0.1, 0.2, 0.3], x)), lambda: [rand(2, 3, 4, 4)],
         lambda x: np.where(x > 0, x, x * np.array([0.1, 0.2, 0.3]).reshape(1, 3, 1, 1))),
    Case("softplus_parametric",
         lambda x: mb.softplus_parametric(x=x, alpha=c([1.0, 2.0, 0.5], x), beta=c([0.5, 1.0, 2.0], x)),
         lambda: [rand(2, 3, 4, 4)],
         lambda x: np.array([1.0, 2.0, 0.5]).reshape(1, 3, 1, 1)
         * np.log1p(np.exp(x * np.array([0.5, 1.0, 2.0]).reshape(1, 3, 1, 1)))),
]

W_LIN = rand(6, 5)
B_LIN = rand(6)
W_CONV = rand(8, 4, 3, 3, lo=-0.5, hi=0.5)
W_GROUP = rand(8, 2, 3, 3, lo=-0.5, hi=0.5)
W_CONV1D = rand(4, 3, 3, lo=-0.5, hi=0.5)
B_CONV = rand(8)
W_DECONV = rand(4, 3, 3, 3, lo=-0.5, hi=0.5)  # (C_in, C_out, kh, kw)


def _conv_ref(x, w, b=None, stride=1, padding=0, dilation=1, groups=1, pad=None):
    x = t(x)
    if pad is not None:
        x = F.pad(x, pad)
    return F.conv2d(x, t(w).to(x.dtype), None if b is None else t(b).to(x.dtype), stride, padding, dilation, groups).numpy()


def _sdpa_ref(q, k, v, mask=None):
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    if mask is not None:
        scores = np.where(mask, scores, -np.inf) if mask.dtype == bool else scores + mask
    return torch.softmax(t(scores), -1).numpy() @ v


CASES += [
    Case("linear", lambda x: mb.linear(x=x, weight=c(W_LIN, x), bias=c(B_LIN, x)), lambda: [rand(2, 3, 5)],
         lambda x: x @ W_LIN.T.astype(np.float64) + B_LIN),
    Case("linear", lambda x: mb.linear(x=x, weight=c(W_LIN, x)), lambda: [rand(4, 5)], lambda x: x @ W_LIN.T.astype(np.float64),
         name="no_bias"),
    Case("matmul", lambda x, y: mb.matmul(x=x, y=y), lambda: [rand(2, 3, 4, 5), rand(3, 5, 6)], np.matmul, name="broadcast"),
    Case("matmul", lambda x, y: mb.matmul(x=x, y=y, transpose_x=True, transpose_y=True), lambda: [rand(2, 5, 4), rand(2, 6, 5)],
         lambda x, y: np.swapaxes(x, -1, -2) @ np.swapaxes(y, -1, -2), name="transposed"),
    Case("matmul", lambda x, y: mb.matmul(x=x, y=y), lambda: [rand(4), rand(3, 4, 2)], np.matmul, name="vector"),
    Case("einsum", lambda x, y: mb.einsum(values=(x, y), equation="bkhc,bchq->bkhq"),
         lambda: [rand(2, 6, 4, 3), rand(1, 3, 4, 5)], lambda x, y: np.einsum("bkhc,bchq->bkhq", np.broadcast_to(x, (2, 6, 4, 3)),
                                                                          np.broadcast_to(y, (2, 3, 4, 5))), name="rank4"),
    Case("einsum", lambda x, y: mb.einsum(values=(x, y), equation="chw,whr->chr"), lambda: [rand(3, 1, 4), rand(4, 5, 2)],
         lambda x, y: np.einsum("chw,whr->chr", np.broadcast_to(x, (3, 5, 4)), y), name="rank3"),
    Case("scaled_dot_product_attention", lambda q, k, v: mb.scaled_dot_product_attention(query=q, key=k, value=v),
         lambda: [rand(2, 3, 5, 4), rand(2, 3, 7, 4), rand(2, 3, 7, 6)], _sdpa_ref),
    Case("scaled_dot_product_attention",
         lambda q, k, v, m: mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=m),
         lambda: [rand(1, 2, 5, 4), rand(1, 2, 7, 4), rand(1, 2, 7, 3), np.tril(np.ones((5, 7), bool), 2)],
         _sdpa_ref, name="bool_mask"),
    Case("scaled_dot_product_attention",
         lambda q, k, v, m: mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=m),
         lambda: [rand(1, 2, 5, 4), rand(1, 2, 7, 4), rand(1, 2, 7, 3), rand(5, 7)], _sdpa_ref, name="float_mask"),
    Case("conv", lambda x: mb.conv(x=x, weight=c(W_CONV, x), bias=c(B_CONV, x), pad_type="valid"), lambda: [rand(2, 4, 7, 6)],
         lambda x: _conv_ref(x, W_CONV, B_CONV), name="valid"),
    Case("conv", lambda x: mb.conv(x=x, weight=c(W_CONV, x), pad_type="same", strides=[2, 2]), lambda: [rand(1, 4, 7, 6)],
         lambda x: _conv_ref(x, W_CONV, stride=2, pad=(0, 1, 1, 1)), name="same_stride2"),
    Case("conv", lambda x: mb.conv(x=x, weight=c(W_CONV, x), pad_type="same_lower", strides=[2, 2]), lambda: [rand(1, 4, 7, 6)],
         lambda x: _conv_ref(x, W_CONV, stride=2, pad=(1, 0, 1, 1)), name="same_lower"),
    Case("conv", lambda x: mb.conv(x=x, weight=c(W_CONV, x), pad_type="custom", pad=[0, 1, 2, 1], dilations=[1, 2]),
         lambda: [rand(1, 4, 7, 9)], lambda x: _conv_ref(x, W_CONV, dilation=(1, 2), pad=(2, 1, 0, 1)), name="custom_dilated"),
    Case("conv", lambda x: mb.conv(x=x, weight=c(W_GROUP, x), bias=c(B_CONV, x), pad_type="custom", pad=[1, 1, 1, 1], groups=2),
         lambda: [rand(2, 4, 5, 5)], lambda x: _conv_ref(x, W_GROUP, B_CONV, padding=1, groups=2), name="groups"),
    Case("conv", lambda x: mb.conv(x=x, weight=c(W_CONV1D, x), pad_type="custom", pad=[1, 1]), lambda: [rand(2, 3, 9)],
         lambda x: F.conv1d(t(x), t(W_CONV1D).double(), padding=1).numpy(), name="1d"),
    Case("conv_transpose",
         lambda x: mb.conv_transpose(x=x, weight=c(W_DECONV, x), bias=c(B_CONV[:3], x), pad_type="custom", pad=[1, 1, 1, 1],
                                     strides=[2, 2]),
         lambda: [rand(1, 4, 4, 5)],
         lambda x: F.conv_transpose2d(t(x), t(W_DECONV).double(), t(B_CONV[:3]).double(), 2, 1).numpy()),
    Case("conv_transpose",
         lambda x: mb.conv_transpose(x=x, weight=c(W_DECONV, x), pad_type="custom", pad=[1, 1, 1, 1], strides=[2, 2],
                                     output_shape=[1, 3, 8, 10]),
         lambda: [rand(1, 4, 4, 5)],
         lambda x: F.conv_transpose2d(t(x), t(W_DECONV).double(), None, 2, 1, output_padding=1).numpy(), name="output_shape"),
    Case("avg_pool", lambda x: mb.avg_pool(x=x, kernel_sizes=[3, 3], strides=[2, 2], pad_type="custom", pad=[1, 1, 1, 1],
                                           exclude_padding_from_average=True),
         lambda: [rand(2, 3, 7, 6)], lambda x: F.avg_pool2d(t(x), 3, 2, 1, count_include_pad=False).numpy()),
    Case("avg_pool", lambda x: mb.avg_pool(x=x, kernel_sizes=[2, 2], strides=[2, 2], pad_type="custom", pad=[0, 1, 0, 1]),
         lambda: [rand(1, 2, 5, 5)], lambda x: F.avg_pool2d(F.pad(t(x), (0, 1, 0, 1)), 2, 2).numpy(), name="asymmetric"),
    Case("max_pool", lambda x: mb.max_pool(x=x, kernel_sizes=[3, 3], strides=[2, 2], pad_type="same"),
         lambda: [rand(2, 3, 7, 6)], lambda x: F.max_pool2d(F.pad(t(x), (0, 1, 1, 1), value=-np.inf), 3, 2).numpy()),
    Case("l2_pool", lambda x: mb.l2_pool(x=x, kernel_sizes=[2, 2], strides=[2, 2], pad_type="valid"),
         lambda: [rand(1, 3, 6, 6)], lambda x: np.sqrt(F.avg_pool2d(t(x * x), 2, 2).numpy() * 4)),
    # normalization
    Case("layer_norm", lambda x: mb.layer_norm(x=x, axes=[-1], gamma=c(B_LIN, x), beta=c(W_LIN[:, 0], x), epsilon=c(1e-5, x)),
         lambda: [rand(2, 3, 6)], lambda x: F.layer_norm(t(x), (6,), t(B_LIN).double(), t(W_LIN[:, 0]).double()).numpy()),
    Case("layer_norm", lambda x: mb.layer_norm(x=x, axes=[1], gamma=c(B_LIN[:4], x), beta=c(W_LIN[0, :4], x)),
         lambda: [rand(2, 4, 1, 5)],
         lambda x: (F.layer_norm(t(x).permute(0, 2, 3, 1), (4,), t(B_LIN[:4]).double(), t(W_LIN[0, :4]).double())
                    .permute(0, 3, 1, 2).numpy()), name="channel_axis"),
    Case("layer_norm", lambda x: mb.layer_norm(x=x, axes=[2, 3]), lambda: [rand(2, 3, 4, 5)],
         lambda x: F.layer_norm(t(x), (4, 5)).numpy(), name="two_axes_no_affine"),
    Case("instance_norm", lambda x: mb.instance_norm(x=x, gamma=c(B_LIN[:3], x), beta=c(W_LIN[0, :3], x), epsilon=c(1e-3, x)),
         lambda: [rand(2, 3, 4, 5)],
         lambda x: F.instance_norm(t(x), weight=t(B_LIN[:3]).double(), bias=t(W_LIN[0, :3]).double(), eps=1e-3).numpy()),
    Case("batch_norm",
         lambda x: mb.batch_norm(x=x, mean=c(W_LIN[0, :3], x), variance=c(B_LIN[:3] ** 2 + 0.1, x), gamma=c(W_LIN[1, :3], x),
                                 beta=c(W_LIN[2, :3], x)),
         lambda: [rand(2, 3, 4, 5)],
         lambda x: F.batch_norm(t(x), t(W_LIN[0, :3]).double(), t(B_LIN[:3] ** 2 + 0.1).double(), t(W_LIN[1, :3]).double(),
                                t(W_LIN[2, :3]).double()).numpy()),
    Case("l2_norm", lambda x: mb.l2_norm(x=x, epsilon=c(1e-6, x)), lambda: [rand(2, 3, 4, 5)],
         lambda x: x / np.sqrt(np.sum(x * x, axis=(1, 2, 3), keepdims=True) + 1e-6)),
    Case("local_response_norm", lambda x: mb.local_response_norm(x=x, size=3, alpha=c(0.1, x), beta=c(0.75, x), k=c(1.0, x)),
         lambda: [rand(2, 5, 3, 3)], lambda x: F.local_response_norm(t(x), 3, 0.1, 0.75, 1.0).numpy()),
]

REDUCE_REFS = {
    "reduce_sum": np.sum, "reduce_mean": np.mean, "reduce_max": np.max, "reduce_min": np.min, "reduce_prod": np.prod,
    "reduce_sum_square": lambda x, axis, keepdims: np.sum(x * x, axis=axis, keepdims=keepdims),
    "reduce_l1_norm": lambda x, axis, keepdims: np.sum(np.abs(x), axis=axis, keepdims=keepdims),
    "reduce_l2_norm": lambda x, axis, keepdims: np.sqrt(np.sum(x * x, axis=axis, keepdims=keepdims)),
    "reduce_log_sum": lambda x, axis, keepdims: np.log(np.sum(x, axis=axis, keepdims=keepdims)),
    "reduce_log_sum_exp": lambda x, axis, keepdims: np.log(np.sum(np.exp(x), axis=axis, keepdims=keepdims)),
}
for _op, _ref in REDUCE_REFS.items():
    _lo = 0.5 if _op in ("reduce_log_sum", "reduce_prod") else -2.0
    _hi = 1.5 if _op == "reduce_prod" else 2.0
    CASES.append(Case(_op, lambda x, op=_op: getattr(mb, op)(x=x, axes=[0, -1], keep_dims=True),
                      lambda lo=_lo, hi=_hi: [rand(3, 4, 5, lo=lo, hi=hi)],
                      lambda x, ref=_ref: ref(x, axis=(0, 2), keepdims=True), name="keep"))
    CASES.append(Case(_op, lambda x, op=_op: getattr(mb, op)(x=x, axes=[1]),
                      lambda lo=_lo, hi=_hi: [rand(3, 4, 5, lo=lo, hi=hi)],
                      lambda x, ref=_ref: ref(x, axis=1, keepdims=False), name="drop"))
CASES += [
    Case("reduce_mean", lambda x: mb.reduce_mean(x=x), lambda: [rand(3, 4)], lambda x: np.mean(x), name="all_axes"),
    Case("reduce_argmax", lambda x: mb.reduce_argmax(x=x, axis=1, keep_dims=True), lambda: [rand(3, 6, 2)],
         lambda x: np.argmax(x, axis=1)[:, None]),
    Case("reduce_argmin", lambda x: mb.reduce_argmin(x=x, axis=-1), lambda: [rand(3, 6)], lambda x: np.argmin(x, axis=-1)),
]


CASES += [
    Case("reshape", lambda x: mb.reshape(x=x, shape=[0, -1, 2]), lambda: [rand(2, 3, 4)], lambda x: x.reshape(2, 6, 2)),
    Case("expand_dims", lambda x: mb.expand_dims(x=x, axes=[0, -1]), lambda: [rand(2, 3)], lambda x: x[None, :, :, None]),
    Case("squeeze", lambda x: mb.squeeze(x=x, axes=[1]), lambda: [rand(2, 1, 3, 1)], lambda x: x[:, 0]),
    Case("squeeze", lambda x: mb.squeeze(x=x), lambda: [rand(2, 1, 3, 1)], lambda x: x[:, 0, :, 0], name="all"),
    Case("flatten2d", lambda x: mb.flatten2d(x=x, axis=2), lambda: [rand(2, 3, 4, 5)], lambda x: x.reshape(6, 20)),
    Case("reshape_like", lambda x, r: mb.reshape_like(x=x, ref_tensors=(r,), begins=(0,), ends=(2,), end_masks=(False,)),
         lambda: [rand(3, 4), rand(2, 6, 5)], lambda x, r: x.reshape(2, 6)),
    Case("transpose", lambda x: mb.transpose(x=x, perm=[2, 0, 1]), lambda: [rand(2, 3, 4)], lambda x: x.transpose(2, 0, 1)),
    Case("concat", lambda x, y: mb.concat(values=(x, y, x), axis=1), lambda: [rand(2, 3), rand(2, 1)],
         lambda x, y: np.concatenate([x, y, x], 1)),
    Case("concat", lambda x, y: mb.concat(values=(x, y), axis=0, interleave=True), lambda: [rand(3, 2), rand(3, 2)],
         lambda x, y: np.stack([x, y], 1).reshape(6, 2), name="interleave"),
    Case("stack", lambda x, y: mb.stack(values=(x, y), axis=1), lambda: [rand(2, 3), rand(2, 3)], lambda x, y: np.stack([x, y], 1)),
    Case("split", lambda x: mb.split(x=x, num_splits=2, axis=-1), lambda: [rand(3, 4)], lambda x: np.split(x, 2, -1)),
    Case("split", lambda x: mb.split(x=x, split_sizes=[1, 3, 2], axis=0), lambda: [rand(6, 2)],
         lambda x: np.split(x, [1, 4], 0), name="sizes"),
    Case("slice_by_index",
         lambda x: mb.slice_by_index(x=x, begin=[0, 0, 1], end=[0, 0, 0], stride=[1, -2, 1], begin_mask=[True, True, False],
                                     end_mask=[True, True, False], squeeze_mask=[False, False, True]),
         lambda: [rand(2, 5, 3)], lambda x: x[:, ::-2, 1], name="negative_stride_squeeze"),
    Case("slice_by_index", lambda x: mb.slice_by_index(x=x, begin=[1, -3], end=[3, -1]), lambda: [rand(4, 6)],
         lambda x: x[1:3, -3:-1], name="negative_index"),
    Case("slice_by_size", lambda x: mb.slice_by_size(x=x, begin=[1, 2], size=[2, -1]), lambda: [rand(4, 6)], lambda x: x[1:3, 2:]),
    Case("reverse", lambda x: mb.reverse(x=x, axes=[0, 2]), lambda: [rand(2, 3, 4)], lambda x: x[::-1, :, ::-1]),
    Case("tile", lambda x: mb.tile(x=x, reps=[2, 1, 3]), lambda: [rand(2, 3, 1)], lambda x: np.tile(x, (2, 1, 3))),
    Case("pad", lambda x: mb.pad(x=x, pad=[1, 2, 0, 3], mode="constant", constant_val=c(0.5, x)), lambda: [rand(2, 3, 4)],
         lambda x: np.pad(x, [(0, 0), (1, 2), (0, 3)], constant_values=0.5)),
    Case("pad", lambda x: mb.pad(x=x, pad=[2, 1, 1, 2], mode="reflect"), lambda: [rand(1, 2, 4, 5)],
         lambda x: np.pad(x, [(0, 0), (0, 0), (2, 1), (1, 2)], mode="reflect"), name="reflect"),
    Case("pad", lambda x: mb.pad(x=x, pad=[0, 3], mode="replicate"), lambda: [rand(2, 4)],
         lambda x: np.pad(x, [(0, 0), (0, 3)], mode="edge"), name="replicate"),
    Case("shape", lambda x: mb.shape(x=mb.add(x=x, y=x)), lambda: [rand(2, 3, 4)], lambda x: np.array(x.shape),
         dtypes=("fp32",), extra_ops=()),
    Case("fill", lambda s: mb.fill(shape=s, value=2.5), lambda: [np.array([2, 3], np.int32)], lambda s: np.full((2, 3), 2.5),
         dtypes=("fp32",)),
    Case("fill_like", lambda x: mb.fill_like(ref_tensor=x, value=-1.0), lambda: [rand(2, 3)], lambda x: np.full((2, 3), -1.0),
         dtypes=("fp32",)),
    Case("range_1d", lambda e: mb.range_1d(end=mb.squeeze(x=e), start=1, step=2), lambda: [np.array([8], np.int32)],
         lambda e: np.arange(1, 8, 2), dtypes=("fp32",)),
    Case("band_part", lambda x: mb.band_part(x=x, lower=1, upper=0), lambda: [rand(2, 4, 5)], lambda x: np.tril(x) - np.tril(x, -2)),
    Case("cumsum", lambda x: mb.cumsum(x=x, axis=1), lambda: [rand(2, 5)], lambda x: np.cumsum(x, 1)),
    Case("cumsum", lambda x: mb.cumsum(x=x, axis=0, exclusive=True, reverse=True), lambda: [rand(4, 2)],
         lambda x: np.cumsum(x[::-1], 0)[::-1] - x, name="exclusive_reverse"),
    Case("one_hot", lambda i, d: mb.one_hot(indices=i, one_hot_vector_size=mb.squeeze(x=d), axis=0, on_value=3.0, off_value=-1.0),
         lambda: [np.array([0, 2, 1], np.int32), np.array([4], np.int32)],
         lambda i, d: np.where(np.eye(4)[i].T > 0, 3.0, -1.0), dtypes=("fp32",)),
    Case("topk", lambda x: mb.topk(x=x, k=2, axis=1), lambda: [rand(3, 6)],
         lambda x: [np.sort(x, 1)[:, ::-1][:, :2], np.argsort(-x, 1)[:, :2]]),
    Case("topk", lambda x: mb.topk(x=x, k=3, axis=0, ascending=True), lambda: [rand(5, 2)],
         lambda x: [np.sort(x, 0)[:3], np.argsort(x, 0)[:3]], name="ascending"),
    Case("argsort", lambda x: mb.argsort(x=x, axis=-1), lambda: [rand(3, 6)], lambda x: np.argsort(-x, -1)),
    Case("non_zero", lambda x: mb.non_zero(x=x), lambda: [np.array([[0, 1.5, 0], [2, 0, 3]], np.float32)],
         lambda x: np.transpose(np.nonzero(x))),
    Case("depth_to_space", lambda x: mb.depth_to_space(x=x, block_size=2), lambda: [rand(1, 8, 2, 3)],
         # TensorFlow DCR layout, written out: out[n, c, h*b + i, w*b + j] = x[n, (i*b + j)*C + c, h, w]
         lambda x: x.reshape(1, 2, 2, 2, 2, 3).transpose(0, 3, 4, 1, 5, 2).reshape(1, 2, 4, 6)),
    Case("space_to_depth", lambda x: mb.space_to_depth(x=x, block_size=2), lambda: [rand(1, 2, 4, 6)],
         lambda x: x.reshape(1, 2, 2, 2, 3, 2).transpose(0, 3, 5, 1, 2, 4).reshape(1, 8, 2, 3)),
    Case("pixel_shuffle", lambda x: mb.pixel_shuffle(x=x, upscale_factor=2), lambda: [rand(1, 8, 2, 3)],
         lambda x: F.pixel_shuffle(t(x), 2).numpy()),
    Case("pixel_unshuffle", lambda x: mb.pixel_unshuffle(x=x, downscale_factor=np.uint32(2)), lambda: [rand(1, 2, 4, 6)],
         lambda x: F.pixel_unshuffle(t(x), 2).numpy()),
    Case("slice_update", lambda x, u: mb.slice_update(x=x, update=u, begin=[1, 0], end=[3, 4], stride=[1, 2]),
         lambda: [rand(4, 5), rand(2, 2)], lambda x, u: _slice_update_ref(x, u)),
    # gathers
    Case("gather", lambda x, i: mb.gather(x=x, indices=i, axis=1), lambda: [rand(3, 5, 2), np.array([[4, -1], [0, 2]], np.int32)],
         lambda x, i: np.take(x, i, axis=1)),
    Case("gather", lambda x, i: mb.gather(x=x, indices=i, axis=1, batch_dims=1),
         lambda: [rand(2, 5, 3), np.array([[1, 4, 0], [3, 3, -1]], np.int32)],
         lambda x, i: np.stack([np.take(x[b], i[b], axis=0) for b in range(2)]), name="batch_dims"),
    Case("gather_along_axis", lambda x, i: mb.gather_along_axis(x=x, indices=i, axis=0),
         lambda: [rand(4, 3), np.array([[3, 0, 1], [2, 2, -4]], np.int32)], lambda x, i: np.take_along_axis(x, i, axis=0)),
    Case("gather_nd", lambda x, i: mb.gather_nd(x=x, indices=i), lambda: [rand(3, 4, 5), np.array([[0, 1], [2, 3], [1, -1]], np.int32)],
         lambda x, i: np.stack([x[a, b] for a, b in i])),
    Case("gather_nd", lambda x, i: mb.gather_nd(x=x, indices=i, batch_dims=1),
         lambda: [rand(2, 4, 5), np.array([[[1], [3]], [[0], [2]]], np.int32)],
         lambda x, i: np.stack([x[b][i[b, :, 0]] for b in range(2)]), name="batch_dims"),
    # resizing
    Case("upsample_nearest_neighbor", lambda x: mb.upsample_nearest_neighbor(x=x, scale_factor_height=2, scale_factor_width=3),
         lambda: [rand(1, 2, 3, 4)], lambda x: F.interpolate(t(x), scale_factor=(2, 3), mode="nearest").numpy()),
    Case("upsample_nearest_neighbor", lambda x: mb.upsample_nearest_neighbor(x=x, scale_factor_height=1.5, scale_factor_width=1.5),
         lambda: [rand(1, 2, 4, 4)],
         lambda x: F.interpolate(t(x), scale_factor=1.5, mode="nearest", recompute_scale_factor=False).numpy(), name="fractional"),
    Case("resize_nearest_neighbor", lambda x: mb.resize_nearest_neighbor(x=x, target_size_height=5, target_size_width=2),
         lambda: [rand(2, 3, 4)], lambda x: F.interpolate(t(x)[None], size=(5, 2), mode="nearest")[0].numpy()),
    Case("upsample_bilinear", lambda x: mb.upsample_bilinear(x=x, scale_factor_height=2, scale_factor_width=2, align_corners=True),
         lambda: [rand(1, 2, 3, 4)], lambda x: F.interpolate(t(x), scale_factor=2, mode="bilinear", align_corners=True).numpy()),
    Case("upsample_bilinear", lambda x: mb.upsample_bilinear(x=x, scale_factor_height=2, scale_factor_width=2, align_corners=False),
         lambda: [rand(1, 2, 3, 4)], lambda x: F.interpolate(t(x), scale_factor=2, mode="bilinear", align_corners=False).numpy(),
         name="half_pixel"),
    Case("resize_bilinear", lambda x: mb.resize_bilinear(x=x, target_size_height=5, target_size_width=7, sampling_mode="UNALIGN_CORNERS"),
         lambda: [rand(1, 2, 3, 4)], lambda x: F.interpolate(t(x), size=(5, 7), mode="bilinear", align_corners=False).numpy()),
]


def _slice_update_ref(x, u):
    y = x.copy()
    y[1:3, 0:4:2] = u
    return y


def _prepare(case: Case, dtype: str):
    arrays = case.inputs()
    if dtype == "fp16":
        arrays = [a.astype(np.float16) if a.dtype == np.float32 else a for a in arrays]
    return arrays


def _assert_matches(outputs, reference, dtype: str, tol16: float):
    refs = reference if isinstance(reference, list) else [reference]
    assert len(outputs) == len(refs)
    for out, ref in zip(outputs, refs):
        ref = np.asarray(ref)
        assert out.shape == ref.shape, (out.shape, ref.shape)
        if ref.dtype == bool or out.dtype == bool or not np.issubdtype(out.dtype, np.floating):
            np.testing.assert_array_equal(out, ref)
        elif dtype == "fp16":
            # exact mode stores fp16 results: representable in fp16 and within its rounding
            np.testing.assert_array_equal(out, out.astype(np.float16).astype(np.float64))
            np.testing.assert_allclose(out, ref, rtol=tol16, atol=tol16)
        else:
            np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


PARAMS = [pytest.param(case, dtype, id=f"{case.id}-{dtype}") for case in CASES for dtype in case.dtypes]


@pytest.mark.parametrize("case,dtype", PARAMS)
def test_op_matches_reference(case: Case, dtype: str):
    arrays = _prepare(case, dtype)
    outputs = run_op(case.body, *arrays)
    reference = case.ref(*[a.astype(np.float64) if a.dtype.kind == "f" else a for a in arrays])
    _assert_matches(outputs, reference, dtype, case.tol16)


SINGLE_OP_FP16 = [pytest.param(case, id=case.id) for case in CASES if "fp16" in case.dtypes and not case.extra_ops]


@pytest.mark.parametrize("case", SINGLE_OP_FP16)
def test_exact_mode_is_fp32_compute_rounded_once(case: Case):
    """Exact mode runs some ops on fp16 storage (HALF_NATIVE_OPS) and upcasts the rest: either way
    each fp16 result must be the op computed in fp32 from the fp16 inputs, rounded to fp16 once.
    The fp32 computation is fast mode with fp32 compute (no rounding at all); softmax and
    reductions may differ by 1 ulp (summation order)."""
    arrays = _prepare(case, "fp16")
    exact = run_op(case.body, *arrays)
    fp32 = run_op(case.body, *arrays, mode="fast", fast_dtype="fp32")
    for got, full in zip(exact, fp32):
        if not np.issubdtype(got.dtype, np.floating):
            np.testing.assert_array_equal(got, full)
            continue
        once = full.astype(np.float16)
        if np.array_equal(got.astype(np.float16), once, equal_nan=True):
            continue
        assert case.op in ("softmax", "reduce_mean", "reduce_sum", "reduce_log_sum_exp"), case.id
        ulp = np.spacing(np.abs(once).astype(np.float16)).astype(np.float64)
        assert np.max(np.abs(got - once.astype(np.float64)) / ulp) <= 1.0


FAST_CASES = [case for case in CASES if case.op in {"conv", "linear", "layer_norm", "softmax", "gelu", "matmul", "einsum"}]


@pytest.mark.parametrize("case", FAST_CASES[:8], ids=[c.id for c in FAST_CASES[:8]])
def test_fast_mode_runs_fp16_ops_in_bf16_and_keeps_fp32_ops_exact(case: Case, monkeypatch):
    monkeypatch.setattr(compiler, "SMALL", 0)  # these tensors are tiny: keep none of them in fp32
    arrays16 = _prepare(case, "fp16")
    reference = case.ref(*[a.astype(np.float64) for a in arrays16])
    out16 = run_op(case.body, *arrays16, mode="fast", fast_dtype="bf16")[0]
    np.testing.assert_allclose(out16, reference, rtol=3e-2, atol=3e-2 * np.abs(reference).max())
    assert not np.allclose(out16, reference, rtol=1e-4, atol=1e-4)  # it really ran in bf16
    arrays32 = _prepare(case, "fp32")
    out32 = run_op(case.body, *arrays32, mode="fast", fast_dtype="bf16")[0]
    np.testing.assert_allclose(out32, case.ref(*[a.astype(np.float64) for a in arrays32]), rtol=2e-5, atol=2e-5)


def test_fast_mode_keeps_small_values_in_fp32():
    """sin(t * f) for a timestep near 1000: bf16 (8-bit mantissa) gets the phase wrong by ~1 rad;
    small tensors therefore stay fp32 in fast mode, big ones run in bf16 (and meet at a cast)."""
    freqs = np.exp(-np.log(10000) * np.arange(160) / 160).astype(np.float16)
    t = np.array([[999.0], [21.0]], np.float16)
    big = rand(1, 8, 64, 64).astype(np.float16)  # 32768 elements: above compiler.SMALL

    def body(t, x):
        emb = mb.sin(x=mb.mul(x=t, y=freqs))  # (2, 160)
        proj = mb.reduce_mean(x=emb, axes=[0, 1], keep_dims=True)  # a small value ...
        return emb, mb.add(x=x, y=mb.reshape(x=proj, shape=[1, 1, 1, 1]))  # ... meeting a big one

    emb, out = run_op(body, t, big, mode="fast", fast_dtype="bf16")
    ref_emb = np.sin(t.astype(np.float64) * freqs.astype(np.float64))
    np.testing.assert_allclose(emb, ref_emb, atol=2e-3)
    np.testing.assert_allclose(out, big.astype(np.float64) + ref_emb.mean(), rtol=1e-2, atol=1e-2)

    def is_bf16(a):
        return np.array_equal(a, torch.from_numpy(a).bfloat16().double().numpy())

    assert is_bf16(out) and not is_bf16(emb)


def test_every_registered_op_has_a_case():
    covered = {case.op for case in CASES if case.dtypes} | {op for case in CASES for op in case.extra_ops}
    covered |= {"constexpr_affine_dequantize", "constexpr_blockwise_shift_scale", "constexpr_cast",
                "constexpr_lut_to_dense", "constexpr_lut_to_sparse", "constexpr_sparse_blockwise_shift_scale",
                "constexpr_sparse_to_dense"}  # tested in test_mil_compression.py
    assert set(supported_ops()) - covered == set()


@pytest.mark.parametrize("mode", ["DEFAULT", "STRICT_ALIGN_CORNERS", "ALIGN_CORNERS", "OFFSET_CORNERS", "UNALIGN_CORNERS"])
def test_resize_bilinear_grid_matches_mil_documentation(mode):
    # Grid points documented in coremltools' resize_bilinear docstring for Xin = 2.
    documented = {
        5: {"UNALIGN_CORNERS": [0.0, 0.1, 0.5, 0.9, 1.0], "STRICT_ALIGN_CORNERS": [0.0, 0.25, 0.5, 0.75, 1.0],
            "ALIGN_CORNERS": [0.0, 0.25, 0.5, 0.75, 1.0], "DEFAULT": [0.0, 0.4, 0.8, 1.0, 1.0],
            "OFFSET_CORNERS": [0.1, 0.3, 0.5, 0.7, 0.9]},
        6: {"UNALIGN_CORNERS": [0.0, 0.0, 1 / 3, 2 / 3, 1.0, 1.0], "STRICT_ALIGN_CORNERS": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
            "ALIGN_CORNERS": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0], "DEFAULT": [0.0, 1 / 3, 2 / 3, 1.0, 1.0, 1.0],
            "OFFSET_CORNERS": [1 / 12, 0.25, 5 / 12, 7 / 12, 0.75, 11 / 12]},
    }
    for size_out, grids in documented.items():
        np.testing.assert_allclose(grid_points(2, size_out, mode).numpy(), grids[mode], atol=1e-9)
        # An input holding its own coordinates (0, 1) resizes to exactly the grid.
        x = np.array([[[0.0, 1.0], [0.0, 1.0]]], np.float32)
        (out,) = run_op(lambda v: mb.resize_bilinear(x=v, target_size_height=2, target_size_width=size_out, sampling_mode=mode), x)
        np.testing.assert_allclose(out[0, 0], grids[mode], atol=1e-6)
