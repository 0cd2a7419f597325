"""Prompts to `Conditioning`: each text encoder of the family, then the family's extra UNet inputs.

`PromptEncoder` reads a prompt in AUTOMATIC1111's syntax (emphasis, long prompts in 75-token
chunks, BREAK, prompt editing and alternation: `prompt_syntax`, `prompt_chunks`) and runs it
through every text encoder of the family (each with its own tokenizer: SDXL's second pads with
"!"), giving their encodings side by side: the context (hidden states concatenated on the channel
axis, diffusers' order) and the pooled output of the encoder the family marks `pooled`, per
stretch of the sampling (`Scheduled`). `conditioning` adds the extra inputs the family declares, each
from its provider (`coreml_sd.families.PROVIDERS`), for one request's image size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

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


@dataclass(frozen=True)
class Scheduled:
    """A prompt's conditioning over the denoiser calls, AUTOMATIC1111's prompt editing and
    alternation: [(last call, value)]; a prompt without either has one entry."""

    entries: tuple[tuple[int, Any], ...]

    def at(self, calls_done: int):
        from coreml_sd.prompt_syntax import schedule_index

        return self.entries[schedule_index(list(self.entries), calls_done)][1]

    def map(self, fn: Callable[[Any], Any]) -> "Scheduled":
        return Scheduled(tuple((end, fn(v)) for end, v in self.entries))

    @staticmethod
    def rows(parts: Sequence["Scheduled"], combine: Callable[[list], Any]) -> "Scheduled":
        """Rows side by side: at every end point of any part, `combine` of each part's value there."""
        ends = sorted({end for p in parts for end, _ in p.entries})
        return Scheduled(tuple((end, combine([p.at(end) for p in parts])) for end in ends))


@dataclass(frozen=True)
class PromptOptions:
    """How prompts are read: AUTOMATIC1111's emphasis mode, clip skip and prompt-editing timelines."""

    emphasis: str = "Original"
    clip_skip: int = 1
    old_timelines: bool = False


class PromptEncoder:
    """Prompts in AUTOMATIC1111's syntax through every text encoder of a family (see the module doc).

    Each distinct 77-token chunk is encoded once per encoder; a prompt's scheduled variants are
    encoded together, as A1111 does, so they have the same number of chunks.
    """

    def __init__(self, family: Family, encoders: Mapping[str, Any], tokenizers: Mapping[str, Any],
                 options: PromptOptions = PromptOptions()):
        from coreml_sd.prompt_chunks import check_emphasis

        check_emphasis(options.emphasis)
        if options.clip_skip < 1:
            raise InputError(f"clip skip must be 1 or more; got {options.clip_skip}")
        self.family, self.encoders, self.tokenizers, self.options = family, encoders, tokenizers, options
        self._cache: dict[tuple[str, bytes], TextEncoding] = {}

    def _chunk(self, component: str, ids: np.ndarray) -> TextEncoding:
        key = (component, ids.tobytes())
        if key not in self._cache:
            kwargs = {"clip_skip": self.options.clip_skip} if self.options.clip_skip != 1 else {}
            self._cache[key] = self.encoders[component].encode(ids.reshape(1, -1), **kwargs)
        return self._cache[key]

    def encode(self, text: str, steps: int, *, negative: bool = False) -> Scheduled:
        """The prompt's TextEncoding(s) over `steps` denoiser calls."""
        from coreml_sd.prompt_chunks import encode_texts, tokenize_weighted
        from coreml_sd.prompt_syntax import prompt_schedule

        schedule = prompt_schedule(text, steps, old_timelines=self.options.old_timelines)
        texts = [t for _, t in schedule]
        hiddens, pooled = [], None
        for spec in self.family.text_encoders:
            tok = self.tokenizers[spec.component]
            hiddens.append(encode_texts(lambda ids, c=spec.component: self._chunk(c, ids).hidden, tok, texts,
                                        emphasis=self.options.emphasis))
            if spec.pooled:  # the pooled output of each text's first chunk (A1111's)
                firsts = [tokenize_weighted(tok, t, emphasis=self.options.emphasis).ids[0] for t in texts]
                pooled = arrays.concat([self._chunk(spec.component, ids).pooled for ids in firsts])
        context = arrays.concat(hiddens, axis=-1) if len(hiddens) > 1 else hiddens[0]
        if negative and self.family.zero_empty_negative and text == "":
            context, pooled = context * 0.0, None if pooled is None else pooled * 0.0
        return Scheduled(tuple((end, TextEncoding(context[i:i + 1], None if pooled is None else pooled[i:i + 1]))
                               for i, (end, _) in enumerate(schedule)))

    def token_counts(self, text: str) -> list[int]:
        """Prompt tokens per 75-token chunk (the first text encoder's tokenization)."""
        from coreml_sd.prompt_chunks import tokenize_weighted

        tok = self.tokenizers[self.family.text_encoders[0].component]
        return list(tokenize_weighted(tok, text, emphasis=self.options.emphasis).token_counts)


def pad_context(encoding: TextEncoding, tokens: int, empty: TextEncoding) -> TextEncoding:
    """`encoding` with its context grown to `tokens` by appending the empty prompt's chunks
    (AUTOMATIC1111's padding of the shorter of prompt and negative prompt)."""
    have = encoding.hidden.shape[1]
    if have == tokens:
        return encoding
    if have > tokens or (tokens - have) % empty.hidden.shape[1]:
        raise InputError(f"cannot pad a context of {have} tokens to {tokens}")
    blocks = [empty.hidden] * ((tokens - have) // empty.hidden.shape[1])
    return TextEncoding(arrays.concat([encoding.hidden, *blocks], axis=1), encoding.pooled)


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
