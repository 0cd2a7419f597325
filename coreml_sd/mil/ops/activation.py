"""Activations (coremltools `ops/defs/iOS15/activation.py`, iOS17 variants take the same inputs).

`prelu` and `softplus_parametric` carry one parameter per channel (axis 1); `gelu` has three modes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from coreml_sd.mil.registry import OpView, register_op

GELU_MODES = ("EXACT", "TANH_APPROXIMATION", "SIGMOID_APPROXIMATION")


@register_op("relu")
def relu(op: OpView):
    return op.kernel(torch.relu, "x")


@register_op("relu6")
def relu6(op: OpView):
    return op.kernel(lambda x: torch.clamp(x, 0.0, 6.0), "x")


@register_op("sigmoid")
def sigmoid(op: OpView):
    return op.kernel(torch.sigmoid, "x")


@register_op("silu")
def silu(op: OpView):
    return op.kernel(F.silu, "x")


@register_op("softsign")
def softsign(op: OpView):
    return op.kernel(F.softsign, "x")


@register_op("softplus")
def softplus(op: OpView):
    return op.kernel(F.softplus, "x")


@register_op("gelu")
def gelu(op: OpView):
    mode = op.const_str("mode", "EXACT")
    if mode == "EXACT":
        return op.kernel(F.gelu, "x")
    if mode == "TANH_APPROXIMATION":
        return op.kernel(lambda x: F.gelu(x, approximate="tanh"), "x")
    if mode == "SIGMOID_APPROXIMATION":
        # in fp32 and rounded once, like every gelu (exact mode runs gelu on fp16 storage)
        return op.kernel(lambda x: (x.float() * torch.sigmoid(1.702 * x.float())).to(x.dtype), "x")
    raise op.error(f"gelu mode {mode!r} is unknown; valid: {', '.join(GELU_MODES)}")


@register_op("softmax")
def softmax(op: OpView):
    axis = op.const_int("axis", -1)
    return op.kernel(lambda x: torch.softmax(x, dim=axis), "x")


@register_op("leaky_relu")
def leaky_relu(op: OpView):
    alpha = op.const_float("alpha")
    return op.kernel(lambda x: torch.where(x >= 0, x, x * alpha), "x")


@register_op("elu")
def elu(op: OpView):
    alpha = op.const_float("alpha")
    return op.kernel(lambda x: torch.where(x > 0, x, alpha * torch.expm1(x)), "x")


@register_op("thresholded_relu")
def thresholded_relu(op: OpView):
    alpha = op.const_float("alpha")
    return op.kernel(lambda x: torch.where(x >= alpha, x, torch.zeros_like(x)), "x")


@register_op("clamped_relu")
def clamped_relu(op: OpView):
    alpha, beta = op.const_float("alpha"), op.const_float("beta")
    return op.kernel(lambda x: torch.clamp(torch.where(x >= 0, x, alpha * x), max=beta), "x")


@register_op("linear_activation")
def linear_activation(op: OpView):
    alpha, beta = op.const_float("alpha"), op.const_float("beta")
    return op.kernel(lambda x: x * alpha + beta, "x")


@register_op("scaled_tanh")
def scaled_tanh(op: OpView):
    alpha, beta = op.const_float("alpha"), op.const_float("beta")
    return op.kernel(lambda x: alpha * torch.tanh(beta * x), "x")


@register_op("sigmoid_hard")
def sigmoid_hard(op: OpView):
    alpha, beta = op.const_float("alpha"), op.const_float("beta")
    return op.kernel(lambda x: torch.clamp(alpha * x + beta, 0.0, 1.0), "x")


def _per_channel(param: torch.Tensor, rank: int) -> torch.Tensor:
    # (C,) -> (1, C, 1, ...) to broadcast along axis 1 of a rank-`rank` tensor.
    return param.reshape((1, -1) + (1,) * (rank - 2))


@register_op("prelu")
def prelu(op: OpView):
    rank = op.rank("x")
    return op.kernel(lambda x, a: torch.where(x > 0, x, x * _per_channel(a, rank)), "x", "alpha")


@register_op("softplus_parametric")
def softplus_parametric(op: OpView):
    rank = op.rank("x")

    def run(x, alpha, beta):
        return _per_channel(alpha, rank) * F.softplus(x * _per_channel(beta, rank))

    return op.kernel(run, "x", "alpha", "beta")

