"""ControlNets converted to Core ML, in the layout of Apple's Swift `StableDiffusion` package.

    controlnet/<Name>.mlpackage   sample (B, 4, h, w), timestep (B,), encoder_hidden_states (B, C, 1, 77),
                                  controlnet_cond (B, 3, H, W) in [0, 1] (fp16 in the program)
                                  -> additional_residual_0..N (fp32), down blocks then middle block, unscaled
    ControlledUnet.mlpackage      the Unet's inputs + additional_residual_0..N -> noise_pred
                                  (ControlledUnetChunk1/2 with --chunk-unet)

`<Name>` is the name Apple's converter derives (`components.controlnet_package_name`), B the
model's UNet batch. Each package goes through the same steps as the model's: the Neural-Engine
rewrite (`conversion/ane/controlnet.py`, the UNet rewrite's input half), compression with
`--weights`, and the parity gate against diffusers' ControlNetModel (at conditioning scale 1) or
UNet2DConditionModel (with seeded residuals) computing in fp32. A ControlNet that pools its
residuals (shuffle) is converted without the pooling, which the runtime applies (as to the torch one).

`add_controlnet(folder, file)` adds one to an already converted folder without converting the rest:
everything is written and checked in a hidden staging folder inside it, then moved in, and the
manifest, rewritten last, is the commit point; a failure leaves the folder as it was.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from conversion.convert import (CONTROLNET_KEY, TEXT_LENGTH, Case, ConversionError, ConvertOptions, Converter, Shapes,
                                _compile_all, _dequantized_reference, _parity_key, _verify, convert_unet, in_fp32,
                                release_memory, unet_extra_inputs)
from conversion.export import TensorIO
from conversion.progress import StageRecord, StageTimer

log = logging.getLogger(__name__)


def open_controlnets(specs: Sequence[Any], base) -> list:
    """The ControlNets to convert with `base` (a ModelSource): opened, checked to fit it, named uniquely."""
    from coreml_sd.controlnet_source import ControlNetSource, check_fit, open_controlnet_model

    nets = []
    for spec in specs:
        if isinstance(spec, ControlNetSource):
            source = spec
        else:
            model = open_controlnet_model(spec)
            source = ControlNetSource(model.info(), model=model)
        check_fit(source.info, base.info)
        if source.torch_unavailable():
            raise ConversionError(f"ControlNet {source.info.name}: {source.torch_unavailable()}")
        nets.append(source)
    names = [n.info.package_name for n in nets]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConversionError(f"two ControlNets would both be controlnet/{twice[0]}.mlpackage; rename one file")
    return nets


def controlnet_record(net) -> dict[str, Any]:
    """Where a converted ControlNet came from (to reopen it for torch, to recognise its file again)."""
    from conversion.convert import source_sha256

    path = Path(net.model.path if net.model is not None else net.info.path)
    return {"name": net.info.name, "path": str(path.absolute()), "kind": net.info.kind,
            "sha256": source_sha256(path), "hash": net.info.hash, "family": net.info.family}


@contextlib.contextmanager
def _unpooled(module):
    """diffusers' ControlNetModel without its spatial pooling (global_pool_conditions), which the runtime does."""
    pooled = bool(module.config.get("global_pool_conditions", False))
    if pooled:
        module.register_to_config(global_pool_conditions=False)
    try:
        yield module
    finally:
        if pooled:
            module.register_to_config(global_pool_conditions=True)


def convert_controlnet(conv: Converter, net, shapes: Shapes) -> None:
    """controlnet/<Name>.mlpackage for `net` (a ControlNetSource), through the parity gate."""
    from conversion.ane import controlnet_from_diffusers
    from conversion.ane.config import ControlNetConfig
    from conversion.verify import controlnet_case

    name = net.info.package_name
    key = CONTROLNET_KEY + name
    with conv.timer(key, "load"):
        module = net.torch_modules(device="cpu", dtype=conv.options.torch_dtype).controlnet
    config = ControlNetConfig.from_diffusers(module.config)  # refuses what the rewrite cannot do, early
    b, latent, p = shapes.batch, shapes.latent, conv.options.precision
    extras = unet_extra_inputs(conv.source, ControlNetConfig.unet_part(module.config), b)
    image = (config.conditioning_channels, shapes.height, shapes.width)
    with conv.timer(key, "reference"), in_fp32(module, conv.options), _unpooled(module):
        case = Case("", *controlnet_case(module, batch=b, latent_shape=latent, image_shape=image,
                                         context_dim=shapes.text_hidden, extra=extras))
    rewrite = controlnet_from_diffusers(module, attention=conv.options.attention)
    del module
    release_memory()
    ins = [TensorIO("sample", (b, *latent), p), TensorIO("timestep", (b,), p),
           TensorIO("encoder_hidden_states", (b, shapes.text_hidden, 1, TEXT_LENGTH), p),
           TensorIO("controlnet_cond", (b, *image), p), *(TensorIO(e.name, e.shape, p) for e in extras)]
    outs = [TensorIO(k, tuple(v.shape), "fp32") for k, v in case.refs.items()]
    _, dense = conv.export(key, rewrite, lambda ops, *xs: list(rewrite(*xs, ops=ops)), ins, outs)
    deq = _dequantized_reference(conv, key, rewrite, dense, [case])
    del rewrite
    release_memory()
    _verify(conv, key, [key], [case], deq)
    conv.controlnets[name] = (controlnet_record(net), dict(net.info.config))


# -- adding one to a converted folder -------------------------------------------------------------
@dataclass
class AddResult:
    path: Path
    name: str  # the package name (controlnet/<name>.mlpackage)
    added: list[str]  # package paths written, relative to the folder
    parity: dict = field(default_factory=dict)
    stages: list[StageRecord] = field(default_factory=list)


def add_controlnet(folder: str | Path, controlnet: Any, *, force: bool = False, compile: bool = False,
                   on_stage: Callable[[StageRecord], None] | None = None) -> AddResult:
    """Convert `controlnet` (a file or diffusers folder) into the converted model `folder`, with the
    folder's own options (size, batch, attention, weights, precision); its ControlledUnet too if the
    folder has none yet (from the model's recorded source). The rest is not touched."""
    import torch

    from coreml_sd.model_folder import ConvertedModel
    from coreml_sd.sources import open_model

    folder = Path(folder).expanduser()
    model = ConvertedModel(folder, reopen=open_model, partial=True)
    m = model.manifest
    (net,) = open_controlnets([controlnet], model)
    name = net.info.package_name
    if name in m.controlnets and not force:
        raise ConversionError(f"{folder} already holds ControlNet {name} (from {m.controlnets[name].source.get('path')}); "
                              f"--force replaces it")
    needs_unet = not m.has("controlled_unet")
    if needs_unet and model.torch_unavailable():
        raise ConversionError(f"{folder} has no ControlledUnet yet, and converting one needs the model's source: "
                              f"{model.torch_unavailable()}. Convert the model again with --controlnet")
    if len(m.all_sizes) > 1:
        raise ConversionError(f"{folder} takes several sizes ({', '.join(f'{w}x{h}' for w, h in m.all_sizes)}); a "
                              "ControlledUnet's residual inputs would all be flexible, which Core ML takes only from "
                              "iOS 18 / macOS 15 on: convert a single-size folder for ControlNet")
    if m.prompt_chunks > 1:
        raise ConversionError(f"{folder} takes prompts of up to {m.prompt_chunks} chunks; ControlNets take a 77-token "
                              "context: convert the model with --max-prompt-chunks 1 for ControlNet")
    options = ConvertOptions(attention=m.attention, width=m.width, height=m.height, batch=m.batch, weights=m.weights,
                             precision=m.precision, chunk_unet=m.chunked, min_target=m.min_target, compile=compile,
                             components=(), layout=m.layout)
    options.validate()
    timer = StageTimer(on_stage)
    staging = folder / f".add-controlnet-{name}-{os.getpid()}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        conv = Converter(model, staging, options, timer)
        f = m.vae_scale_factor
        shapes = Shapes(((m.width, m.height),), f, m.latent_channels, m.batch, m.text_hidden_size)
        with torch.no_grad():
            if needs_unet:
                _convert_controlled_unet(conv, model, shapes)
            convert_controlnet(conv, net, shapes)
        if compile:
            _compile_all(conv)
        added = _commit(folder, staging, conv, m)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return AddResult(folder, name, added, {k: v.to_dict() for k, v in conv.parity.items()}, timer.records)


def _convert_controlled_unet(conv: Converter, model, shapes: Shapes) -> None:
    with conv.timer("controlled_unet", "load"):
        mods = model.torch_modules(device="cpu", dtype=conv.options.torch_dtype)
    mods.text_encoder = mods.text_encoder_2 = mods.vae = None
    release_memory()
    convert_unet(conv, mods, shapes, "controlled_unet")
    del mods
    release_memory()


def _commit(folder: Path, staging: Path, conv: Converter, manifest) -> list[str]:
    """Move the new packages in (a replaced one aside first), then write the manifest: the commit point."""
    from coreml_sd.model_folder import ControlNetPackage, package_hash

    measured = {k: replace(v, psnr_db=round(conv.parity[_parity_key(k)].min_psnr_db, 2),
                           sha256=package_hash(staging / v.package))
                for k, v in conv.packages.items()}
    components = dict(manifest.components)
    controlnets = dict(manifest.controlnets)
    for key, info in measured.items():
        if key.startswith(CONTROLNET_KEY):
            name = key[len(CONTROLNET_KEY):]
            controlnets[name] = ControlNetPackage(info, *conv.controlnets[name])
        else:
            components[key] = info
    parity = dict(manifest.parity)
    parity["components"] = {**dict(parity.get("components") or {}),
                            **{k: v.to_dict() for k, v in conv.parity.items()}}
    updated = replace(manifest, components=components, controlnets=controlnets, parity=parity)
    updated.validate()
    moved = [p for info in measured.values() for p in (info.package, info.compiled, *info.aliases) if p]
    aside, done = staging / ".replaced", []
    try:
        for rel in moved:
            target = folder / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                (aside / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(target, aside / rel)
            done.append(rel)
            os.replace(staging / rel, target)
        updated.write(staging)
        os.replace(staging / "manifest.json", folder / "manifest.json")
    except BaseException:
        _roll_back(folder, aside, done)
        raise
    return moved


def _roll_back(folder: Path, aside: Path, done: list[str]) -> None:
    """Undo `_commit`'s moves: the new packages out, the replaced ones back."""
    for rel in reversed(done):
        shutil.rmtree(folder / rel, ignore_errors=True)
        if (aside / rel).exists():
            os.replace(aside / rel, folder / rel)


__all__ = ["AddResult", "add_controlnet", "controlnet_record", "convert_controlnet", "open_controlnets"]
