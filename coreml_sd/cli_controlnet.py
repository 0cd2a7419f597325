"""The ControlNet options of `coreml-sd generate`: unpacked into `coreml_sd.control.ControlUnit`s.

    --controlnet FILE[:WEIGHT] --control-image IMG     repeatable, paired in order
    --control-start / --control-end / --control-mode / --control-preprocessor
                                                      once (every ControlNet) or once per --controlnet
    --control-resize-mode                             every ControlNet's image
"""

from __future__ import annotations

from pathlib import Path

import click

from coreml_sd.control import CONTROL_MODES, DEFAULT_RESIZE, ControlUnit
from coreml_sd.errors import InputError
from coreml_sd.image_input import RESIZE_MODES

OPTION_NAMES = ("controlnets", "control_images", "control_starts", "control_ends", "control_modes",
                "control_preprocessors", "control_resize_mode")


def _model_and_weight(ctx, param, values) -> list[tuple[str, float]]:
    out = []
    for value in values:
        model, sep, weight = value.rpartition(":")
        try:  # FILE:WEIGHT; a path with a colon and no weight (C:\...) stays whole
            out.append((model, float(weight)) if sep and model else (value, 1.0))
        except ValueError:
            out.append((value, 1.0))
    return out


def controlnet_options(command):
    """Decorator: the ControlNet options (see the module docstring)."""
    options = (
        click.option("--controlnet", "controlnets", multiple=True, metavar="FILE[:WEIGHT]",
                     callback=_model_and_weight,
                     help="ControlNet (.pth/.safetensors file, diffusers folder, or the name of one a converted "
                          "model holds), weight default 1. Repeatable: the ControlNets are summed."),
        click.option("--control-image", "control_images", multiple=True,
                     type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="The control map of the --controlnet at the same position (edges, pose, depth ...)."),
        click.option("--control-start", "control_starts", multiple=True, type=click.FloatRange(0, 1),
                     help="A1111's Guidance Start: fraction of the steps before the ControlNet starts (default 0)."),
        click.option("--control-end", "control_ends", multiple=True, type=click.FloatRange(0, 1),
                     help="A1111's Guidance End: fraction of the steps after which it stops (default 1)."),
        click.option("--control-mode", "control_modes", multiple=True,
                     help=f"{', '.join(CONTROL_MODES)} (A1111's Control Mode: Balanced, 'My prompt is more "
                          "important', 'ControlNet is more important' = guess mode). Default balanced."),
        click.option("--control-preprocessor", "control_preprocessors", multiple=True,
                     help="Make the map from the image first: canny, scribble, threshold, invert, none (default)."),
        click.option("--control-resize-mode", type=click.Choice(RESIZE_MODES), default=DEFAULT_RESIZE,
                     show_default=True, help="How control images are fitted to the image size (A1111's "
                                             "Just Resize / Crop and Resize / Resize and Fill)."),
    )
    for option in reversed(options):
        command = option(command)
    return command


def _per_unit(values: tuple, count: int, option: str) -> list:
    if not values:
        return [None] * count
    if len(values) == 1:
        return list(values) * count
    if len(values) != count:
        raise click.UsageError(f"{option} is given {len(values)} times for {count} --controlnet; give it once "
                               f"(for every ControlNet) or once per --controlnet")
    return list(values)


def pop_control_units(options: dict) -> list[ControlUnit]:
    """Remove the ControlNet option values from a command's kwargs and return the units (usage errors exit 2)."""
    values = {name: options.pop(name) for name in OPTION_NAMES}
    nets, images = values["controlnets"], values["control_images"]
    if len(nets) != len(images):
        raise click.UsageError(f"{len(nets)} --controlnet and {len(images)} --control-image: give one image per "
                               f"ControlNet, in the same order")
    n = len(nets)
    starts = _per_unit(values["control_starts"], n, "--control-start")
    ends = _per_unit(values["control_ends"], n, "--control-end")
    modes = _per_unit(values["control_modes"], n, "--control-mode")
    preprocessors = _per_unit(values["control_preprocessors"], n, "--control-preprocessor")
    units = []
    for (model, weight), image, start, end, mode, pre in zip(nets, images, starts, ends, modes, preprocessors):
        unit = ControlUnit(model, image, weight, 0.0 if start is None else start, 1.0 if end is None else end,
                           mode=mode, resize_mode=values["control_resize_mode"], preprocessor=pre or "none")
        try:
            unit.checked(mode="balanced", resize_mode=DEFAULT_RESIZE)
        except InputError as exc:
            raise click.UsageError(str(exc)) from None
        units.append(unit)
    return units
