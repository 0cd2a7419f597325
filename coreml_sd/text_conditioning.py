"""Prompts to `Conditioning`: each text encoder of the family, then the family's extra UNet inputs.

`encode_text` tokenizes a prompt for every text encoder of the family (each with its own
tokenizer: SDXL's second pads with "!") and returns their encodings side by side: the context
(hidden states concatenated on the channel axis, diffusers' order) and the pooled output of the
encoder the family marks `pooled`. `conditioning` adds the extra inputs the family declares, each
from its provider (`coreml_sd.families.PROVIDERS`), for one request's image size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from coreml_sd import arrays
from coreml_sd.conditioning import Conditioning, TextEncoding
from coreml_sd.errors import InputError
from coreml_sd.families import Family


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's micro-conditioning, in pixels as (height, width); A1111's defaults: the original size is
    the target size and the crop starts at the corner."""

    original: tuple[int, int]
    target: tuple[int, int]
    crop: tuple[int, int] = (0, 0)  # top, left
    aesthetic_score: float = 6.0  # the refiner's; the negative prompt gets negative_aesthetic_score
    negative_aesthetic_score: float = 2.5

    @classmethod
    def for_size(cls, width: int, height: int) -> "SizeConditioning":
        return cls(original=(height, width), target=(height, width))


def encode_text(family: Family, encoders: Mapping[str, Any], tokenizers: Mapping[str, Any], text: str, *,
                negative: bool = False) -> TextEncoding:
    """One prompt through every text encoder of `family`: (context (1, 77, sum C), pooled (1, P) | None)."""
    outs = []
    for spec in family.text_encoders:
        ids = np.asarray([tokenizers[spec.component](text)], dtype=np.int64)
        outs.append((spec, encoders[spec.component].encode(ids)))
    context = arrays.concat([o.hidden for _, o in outs], axis=-1) if len(outs) > 1 else outs[0][1].hidden
    pooled = next((o.pooled for spec, o in outs if spec.pooled), None)
    if negative and family.zero_empty_negative and text == "":
        context = context * 0.0
        pooled = None if pooled is None else pooled * 0.0
    return TextEncoding(context, pooled)


def _time_ids(size: SizeConditioning, negative: bool) -> list[float]:
    return [*size.original, *size.crop, *size.target]


def _aesthetic_time_ids(size: SizeConditioning, negative: bool) -> list[float]:
    score = size.negative_aesthetic_score if negative else size.aesthetic_score
    return [*size.original, *size.crop, score]


EXTRA_PROVIDERS: dict[str, Callable[[SizeConditioning, bool], list[float]]] = {
    "time_ids": _time_ids, "aesthetic_time_ids": _aesthetic_time_ids,
}


def conditioning(family: Family, encoding: TextEncoding, size: SizeConditioning, *, negative: bool = False) -> Conditioning:
    """The UNet conditioning of one encoded prompt (1 row) for an image of `size`."""
    extra = {}
    for item in family.extra_inputs:
        if item.provider == "pooled":
            if encoding.pooled is None:
                raise InputError(f"family {family.name}: the UNet input {item.name} needs a pooled text "
                                 f"embedding, and no text encoder gave one")
            extra[item.name] = encoding.pooled
        else:
            values = np.asarray([EXTRA_PROVIDERS[item.provider](size, negative)], dtype=np.float32)
            extra[item.name] = arrays.like(values, encoding.hidden) if arrays.is_torch(encoding.hidden) else values
    return Conditioning(context=encoding.hidden, pooled=encoding.pooled, extra=extra)
