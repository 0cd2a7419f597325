"""Range checks for `generate`'s numbers, so a bad value is a usage error (exit 2) before any model loads.

The bounds and why:
* `--num-images` at most 100: AUTOMATIC1111's batch count stops there too; a larger run is a
  script's job, and a billion requested images once grew to 8.5 GB before producing one.
* `--batch-size` at most 64: every image of a batch is in the UNet at once.
* `--steps` at most 1000: the model's noise schedule has 1000 training timesteps; more steps only
  repeat them (AUTOMATIC1111's slider ends at 150).
* `--seed`: image i uses seed + i, and seeds are 64-bit, so seed + num_images - 1 must be < 2**64;
  -1 means a random seed, as in AUTOMATIC1111 and Easy Diffusion.
* floats (`--guidance-scale`) must be finite: NaN or inf guidance gives a black or unguided image.
"""

from __future__ import annotations

import math

import click

MAX_NUM_IMAGES = 100
MAX_BATCH_SIZE = 64
MAX_STEPS = 1000
MAX_SEED = 2**64 - 1
RANDOM_SEED = -1


def finite_float(ctx, param, value):
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"must be a finite number; got {value}")
    return value


def seed_value(ctx, param, value):
    """-1 (random) becomes None; anything else must be a 64-bit seed."""
    if value is None or value == RANDOM_SEED:
        return None
    if not 0 <= value <= MAX_SEED:
        raise click.BadParameter(f"must be -1 (random) or between 0 and 2**64-1 ({MAX_SEED}); got {value}")
    return value


def check_seed_range(seed: int | None, num_images: int) -> None:
    """Image i uses seed + i: the last one must still be a 64-bit seed."""
    if seed is not None and seed + num_images - 1 > MAX_SEED:
        raise click.BadParameter(
            f"seed {seed} with {num_images} images needs seeds up to {seed + num_images - 1}, past 2**64-1; "
            f"use a seed of at most {MAX_SEED - num_images + 1}", param_hint="'--seed'")


def threads_option(command):
    """Decorator: --threads N (default: chosen by model size and machine load, coreml_sd.threads)."""
    return click.option("--threads", type=click.IntRange(1, 1024), default=None,
                        help="CPU threads for torch (torch and mil backends). Default: 1 for small models, else "
                             "the physical cores the machine's load leaves idle.")(command)
