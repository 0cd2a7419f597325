"""fp32 references from modules that hold fp16 weights, without an fp32 copy of the model.

The parity gate's reference is the upstream module computing in fp32 with the weights the
package stores. Casting the module (`module.float()`, and back) holds an fp32 copy of every
weight: 3.4 GB for the SD 1.5 UNet, the largest allocation of a conversion. `fp32_compute()`
gets the same numbers from the fp16 weights in place: while active, every torch function sees
its fp16 tensor arguments upcast to fp32 (exact: fp16 values are fp32 values) and every request
for fp16 (`.to(torch.float16)`, `.half()`, a `dtype=` argument) as one for fp32. That is what
the module computes after `.float()`, including where its code casts activations to a
parameter's dtype (diffusers' VAE decoder does); only one layer's weights exist in fp32 at a
time. tests/test_gate.py compares it with `.float()` on the tiny models.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator


def _mode_class():
    import torch
    from torch.overrides import TorchFunctionMode

    half = torch.float16

    def up(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.float() if value.dtype == half else value
        if value is half:
            return torch.float32
        if isinstance(value, (list, tuple)):
            return type(value)(up(v) for v in value)
        if isinstance(value, dict):
            return {k: up(v) for k, v in value.items()}
        return value

    class FP32Compute(TorchFunctionMode):
        def __init__(self, every: Callable[[], None] | None):
            super().__init__()
            self.every, self.calls = every, 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if self.every is not None:
                self.calls += 1
                if self.calls % CALLBACK_CALLS == 0:
                    self.every()
            if func is torch.Tensor.half:
                func, args = torch.Tensor.float, args[:1]
            return func(*up(args), **up(kwargs or {}))

    return FP32Compute


CALLBACK_CALLS = 256  # torch calls between `every` callbacks (a UNet forward makes a few thousand)


@contextlib.contextmanager
def fp32_compute(every: Callable[[], None] | None = None) -> Iterator[None]:
    """Run the block as if every fp16 tensor and dtype were fp32 (see the module docstring).
    `every`: called every CALLBACK_CALLS torch calls (the conversion re-balances its threads with
    the gate worker there: a reference takes tens of seconds)."""
    with _mode_class()(every):
        yield
