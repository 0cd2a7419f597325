"""Folders with the interface of Apple's converted Stable Diffusion models, for tests.

Packages converted with Apple's `torch2coreml` cannot be downloaded here. What a folder of them
tells a reader is its models' names and their interface: input and output names, shapes, dtypes
(the tables in DESIGN.md, from Apple's converter and Swift pipeline), plus op types and metadata.
`interface_package` writes a small ML program with exactly such an interface (its outputs are a
cheap function of its inputs; the weights of a real model play no part in what is inferred), and
the `APPLE_*` tables give the published interfaces of SD 1.5 and SDXL packages.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FP16, FP32 = "fp16", "fp32"
# Apple's SD 1.5 package interface (DESIGN.md; Apple's torch2coreml and Swift pipeline), 512x512.
APPLE_SD15 = {
    "text_encoder": ([("input_ids", (1, 77), FP32)],
                     [("last_hidden_state", (1, 77, 768), FP32), ("pooled_outputs", (1, 768), FP32)]),
    "unet": ([("sample", (2, 4, 64, 64), FP16), ("timestep", (2,), FP16),
              ("encoder_hidden_states", (2, 768, 1, 77), FP16)], [("noise_pred", (2, 4, 64, 64), FP32)]),
    "vae_decoder": ([("z", (1, 4, 64, 64), FP16)], [("image", (1, 3, 512, 512), FP32)]),
    "vae_encoder": ([("x", (1, 3, 512, 512), FP32)], [("latent", (1, 8, 64, 64), FP32)]),
}
# ControlNet-ready UNet of SD 1.5: the UNet's inputs and one residual per down-block output and
# the mid block (diffusers' ControlNet: 12 + 1), named additional_residual_N.
SD15_RESIDUALS = [(320, 64)] * 3 + [(320, 32), (640, 32), (640, 32), (640, 16), (1280, 16), (1280, 16)] \
    + [(1280, 8)] * 3 + [(1280, 8)]
APPLE_SD15["controlled_unet"] = (APPLE_SD15["unet"][0] + [(f"additional_residual_{i}", (2, c, s, s), FP16)
                                                           for i, (c, s) in enumerate(SD15_RESIDUALS)],
                                 APPLE_SD15["unet"][1])
# Apple's SDXL base interface, 1024x1024 (StableDiffusionXL+Resources.swift, TextEncoderXL.swift).
APPLE_SDXL = {
    "text_encoder": ([("input_ids", (1, 77), FP32)],
                     [("hidden_embeds", (1, 77, 768), FP32), ("pooled_outputs", (1, 768), FP32)]),
    "text_encoder_2": ([("input_ids", (1, 77), FP32)],
                       [("hidden_embeds", (1, 77, 1280), FP32), ("pooled_outputs", (1, 1280), FP32)]),
    "unet": ([("sample", (2, 4, 128, 128), FP16), ("timestep", (2,), FP16),
              ("encoder_hidden_states", (2, 2048, 1, 77), FP16), ("text_embeds", (2, 1280), FP16),
              ("time_ids", (2, 6), FP16)], [("noise_pred", (2, 4, 128, 128), FP32)]),
    "vae_decoder": ([("z", (1, 4, 128, 128), FP16)], [("image", (1, 3, 1024, 1024), FP32)]),
}


def interface_package(path: Path, inputs, outputs, *, einsum: bool = False, lut: bool = False,
                      metadata: dict | None = None) -> Path:
    """An ML program package at `path` with these (name, shape, dtype) inputs and outputs.

    Every output is the mean of all inputs broadcast to its shape (tile: no large constant);
    `einsum` adds a split-einsum attention product, `lut` a 4-bit palettized weight."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, Program, types

    dtypes = {FP16: types.fp16, FP32: types.fp32}
    placeholders = {name: mb.placeholder(shape=shape, dtype=dtypes[dtype]) for name, shape, dtype in inputs}
    with Function(placeholders, opset_version=ct.target.iOS16) as function:
        total = mb.const(val=np.float32(0))
        for x in function.inputs.values():
            total = mb.add(x=total, y=mb.reduce_mean(x=mb.cast(x=x, dtype="fp32"), keep_dims=False))
        if einsum:
            a = mb.reshape(x=total, shape=[1, 1, 1, 1])
            total = mb.reduce_mean(x=mb.einsum(values=(a, a), equation="bkhc,bchq->bkhq"), keep_dims=False)
        if lut:
            weight = mb.constexpr_lut_to_dense(indices=np.arange(8, dtype=np.uint8),  # 16 indices of 4 bits
                                               lut=np.linspace(-1, 1, 16).astype(np.float16),
                                               shape=np.array([4, 4], dtype=np.uint32))
            total = mb.add(x=total, y=mb.reduce_mean(x=mb.cast(x=weight, dtype="fp32"), keep_dims=False))
        outs = []
        for name, shape, dtype in outputs:
            tiled = mb.tile(x=mb.reshape(x=total, shape=[1] * len(shape)), reps=list(shape))
            outs.append(mb.cast(x=tiled, dtype=dtype, name=name) if dtype != FP32 else mb.identity(x=tiled, name=name))
        function.set_outputs(outs)
    prog = Program()
    prog.add_function("main", function)
    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.macOS13,
                       compute_precision=ct.precision.FLOAT32, skip_model_load=True, package_dir=str(path))
    if metadata:
        from conversion.export import set_package_metadata

        set_package_metadata(path, description="", metadata=metadata)
    del model
    return Path(path)
