"""Torch kernels for MIL ops; importing this package registers them all."""

from coreml_sd.mil.ops import (  # noqa: F401
    activation,
    constexpr,
    conv,
    elementwise,
    gather,
    image,
    linear,
    normalization,
    reduction,
    tensor,
)
