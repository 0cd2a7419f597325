"""Pre-packed convolution and linear weights for torch on x86/Arm CPUs (oneDNN).

Eager torch hands oneDNN a plain (O, I, kH, kW) weight on every call, and oneDNN re-lays it out
into its blocked format each time: for an SD UNet in bf16 that reorder costs about as much as
the convolution itself. Packing each weight once at load, then calling oneDNN's pointwise
convolution/linear kernels (the same ones torch's inductor uses after freezing) gives the same
results to rounding (oneDNN may pick another accumulation order) at roughly twice the speed for
these layers (benchmarks/bench_torch_step.py). The plain weights are released afterwards,
so memory does not double. Only for inference on CPU; skipped (with a log line) where this torch
build lacks the kernels.
"""

from __future__ import annotations

import logging
import types

import torch
from torch import nn

log = logging.getLogger(__name__)


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise") \
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _conv_forward(self, x):
    if x.dtype != self._packed_dtype or x.dim() != 4:
        raise TypeError(f"{self._packed_name}: packed for {self._packed_dtype} 4-D input, got {x.dtype} {x.dim()}-D")
    return torch.ops.mkldnn._convolution_pointwise(
        x.contiguous(), self._packed_weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
        "none", [], "")


def _linear_forward(self, x):
    if x.dtype != self._packed_dtype:
        raise TypeError(f"{self._packed_name}: packed for {self._packed_dtype} input, got {x.dtype}")
    return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight, self.bias, "none", [], "")


def _release(module: nn.Module) -> None:
    # Keep a 0-element parameter of the same dtype so `module.dtype`-style queries still answer.
    module.weight = nn.Parameter(module.weight.new_empty(0), requires_grad=False)


def prepack(model: nn.Module) -> int:
    """Pack every Conv2d (zero padding, numeric padding) and Linear of `model` in place; return how many."""
    if not available():
        log.info("oneDNN pointwise kernels are not in this torch build: CPU weights stay unpacked")
        return 0
    count = 0
    with torch.no_grad():
        for name, m in model.named_modules():
            dtype = getattr(getattr(m, "weight", None), "dtype", None)
            if dtype not in (torch.float32, torch.bfloat16) or getattr(m, "weight").device.type != "cpu":
                continue
            if type(m) is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str):
                m._packed_weight = torch._C._nn.mkldnn_reorder_conv2d_weight(
                    m.weight.detach().to_mkldnn(), list(m.padding), list(m.stride), list(m.dilation), m.groups)
                m.forward = types.MethodType(_conv_forward, m)
            elif type(m) is nn.Linear:
                m._packed_weight = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), None)
                m.forward = types.MethodType(_linear_forward, m)
            else:
                continue
            m._packed_dtype, m._packed_name = dtype, name
            _release(m)
            count += 1
    return count
