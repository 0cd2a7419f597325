"""Build a rewritten module from an upstream one: same parameter names, strict, without copies.

The only change to a weight is its shape: a linear layer's (out, in) weight becomes the
(out, in, 1, 1) weight of the 1x1 convolution that replaces it — a view of the same storage.
The rewritten module is created on the meta device and takes the upstream tensors by assignment,
so a UNet's weights exist once in memory, whatever their dtype.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

from coreml_sd.errors import ModelError


def map_tensor(key: str, tensor: torch.Tensor, expected: torch.Size) -> torch.Tensor:
    """`tensor` in the shape the rewrite expects, or a ModelError naming the key and both shapes."""
    if tuple(tensor.shape) == tuple(expected):
        return tensor
    if tensor.ndim == 2 and tuple(expected) == (*tensor.shape, 1, 1):
        return tensor.reshape(expected)  # linear (out, in) -> 1x1 conv (out, in, 1, 1)
    raise ModelError(f"weight {key}: expected shape {tuple(expected)}, found {tuple(tensor.shape)}")


def load_rewrite(build: Callable[[], nn.Module], state: Mapping[str, torch.Tensor], *, what: str) -> nn.Module:
    """Instantiate `build()` on the meta device and load `state` into it strictly, by assignment."""
    with torch.device("meta"):
        module = build()
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelError(
            f"{what}: the weights do not match the architecture: "
            + (f"missing {_few(missing)}; " if missing else "")
            + (f"unexpected {_few(unexpected)}" if unexpected else "")
        )
    mapped = {k: map_tensor(k, state[k], expected[k].shape) for k in expected}
    module.load_state_dict(mapped, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def _few(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return f"{shown} (+{len(keys) - n} more)" if len(keys) > n else shown


def with_prefix(state: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The entries of `state` whose key starts with one of `prefixes` (keys unchanged)."""
    return {k: v for k, v in state.items() if k.startswith(prefixes)}


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
