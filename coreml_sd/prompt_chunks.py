"""Weighted prompts of any length, encoded as AUTOMATIC1111 does (`modules/sd_hijack_clip.py`).

A prompt's emphasis runs (`prompt_syntax.parse_attention`) are tokenized run by run and packed into
chunks of 75 tokens. When a chunk is full and a comma came within its last 20 tokens, the tokens
after that comma move to the next chunk, so a phrase is not cut in two; `BREAK` closes a chunk
early. A textual-inversion trigger word's vectors are never split across chunks. Each chunk is
encoded on its own as BOS + 75 tokens (padded) + EOS, the outputs are concatenated (a context of
77·k tokens), and the weights are applied to the encoder output ("Original" emphasis: multiply,
then restore the mean of the unweighted output).

The text encoder is any callable `encode_chunk(ids (1, 77) int64) -> (1, 77, C)` (numpy array or
torch tensor), so this works on every backend; clip skip is the encoder's business.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from coreml_sd import arrays
from coreml_sd.errors import InputError, choices_text
from coreml_sd.prompt_syntax import is_break, parse_attention, prompt_schedule

CHUNK_TOKENS = 75  # prompt tokens per chunk; with BOS and EOS the encoder's 77
COMMA_BACKTRACK = 20  # AUTOMATIC1111's default "comma_padding_backtrack"
# AUTOMATIC1111's emphasis modes: Original (weights, mean restored), No norm (weights only),
# Ignore (brackets parsed, weights not applied), None (brackets are plain text).
EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")

EncodeChunk = Callable[[np.ndarray], object]


@dataclass(frozen=True)
class PromptChunks:
    """One prompt as chunks: `ids` (k, 77) int64 and `weights` (k, 77) float32 (1 at BOS, EOS
    and padding), and the number of prompt tokens in each chunk."""

    ids: np.ndarray
    weights: np.ndarray
    token_counts: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.token_counts)


def check_emphasis(mode: str) -> str:
    if mode not in EMPHASIS_MODES:
        raise InputError(f"unknown emphasis mode {mode!r}; valid modes: {choices_text(EMPHASIS_MODES)}")
    return mode


def tokenize_weighted(tokenizer, text: str, *, emphasis: str = "Original",
                      comma_backtrack: int = COMMA_BACKTRACK) -> PromptChunks:
    """`text` as 77-token chunks with per-token weights (AUTOMATIC1111's `tokenize_line`)."""
    check_emphasis(emphasis)
    runs = [(text, 1.0)] if emphasis == "None" else parse_attention(text)
    comma = tokenizer.encoder.get(",</w>")
    chunks = _pack(((None if is_break(p, w) else tokenizer.encode_units(p), w) for p, w in runs),
                   comma, comma_backtrack)
    ids = np.stack([_chunk_ids(tokenizer, tokens) for tokens, _ in chunks]).astype(np.int64)
    weights = np.stack([[1.0, *ws, *[1.0] * (CHUNK_TOKENS + 1 - len(ws))] for _, ws in chunks])
    return PromptChunks(ids, weights.astype(np.float32), tuple(len(tokens) for tokens, _ in chunks))


def _pack(runs, comma: int | None, backtrack: int) -> list[tuple[list[int], list[float]]]:
    """Token units of weighted runs (None: a BREAK) packed into chunks of at most 75 tokens."""
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close(moved: int = 0):
        # Ends the current chunk, carrying its last `moved` tokens over to the next one.
        nonlocal tokens, weights, last_comma
        cut = len(tokens) - moved
        chunks.append((tokens[:cut], weights[:cut]))
        tokens, weights, last_comma = tokens[cut:], weights[cut:], -1

    for units, weight in runs:
        if units is None:
            close()
            continue
        for unit in units:
            if len(unit) > CHUNK_TOKENS:
                raise InputError(f"an embedding of {len(unit)} vectors cannot fit in a chunk of {CHUNK_TOKENS} tokens")
            if unit == [comma]:
                last_comma = len(tokens)
            elif backtrack and len(tokens) == CHUNK_TOKENS and last_comma != -1 \
                    and len(tokens) - last_comma <= backtrack:
                close(moved=len(tokens) - last_comma - 1)  # the words after the comma start the next chunk
            if len(tokens) == CHUNK_TOKENS or len(tokens) + len(unit) > CHUNK_TOKENS:
                close()  # (an embedding's vectors are never split across chunks)
            tokens += unit
            weights += [weight] * len(unit)
    if tokens or not chunks:
        close()
    return chunks


def _chunk_ids(tokenizer, tokens: list[int]) -> list[int]:
    ids = [tokenizer.bos_id, *tokens, *[tokenizer.eos_id] * (CHUNK_TOKENS + 1 - len(tokens))]
    if tokenizer.pad_id != tokenizer.eos_id:  # SD 2.x: padding after the first EOS
        first_eos = ids.index(tokenizer.eos_id)
        ids[first_eos + 1:] = [tokenizer.pad_id] * (len(ids) - first_eos - 1)
    return ids


def apply_emphasis(hidden, weights, mode: str = "Original"):
    """Weights (B, T) applied to encoder output `hidden` (B, T, C), numpy or torch.

    "Original": multiply each token's vector by its weight, then scale everything so the mean over
    the whole batch is that of the unweighted output (AUTOMATIC1111's `EmphasisOriginal`).
    """
    check_emphasis(mode)
    if mode in ("Ignore", "None"):
        return hidden
    w = np.asarray(arrays.to_numpy(weights), dtype=np.float32)[..., None]
    weighted = hidden * (arrays.like(w, hidden) if arrays.is_torch(hidden) else w.astype(hidden.dtype))
    if mode == "No norm":
        return weighted
    return weighted * (hidden.mean() / weighted.mean())


def encode_texts(encode_chunk: EncodeChunk, tokenizer, texts: Sequence[str], *, emphasis: str = "Original",
                 comma_backtrack: int = COMMA_BACKTRACK):
    """Texts encoded together as AUTOMATIC1111 encodes one batch: (B, 77·k, C), k the most chunks.

    Texts with fewer chunks get empty-prompt chunks, and the emphasis mean is restored over the
    batch's chunk, both as in AUTOMATIC1111 (which encodes a prompt's edited variants together).
    """
    chunked = [tokenize_weighted(tokenizer, t, emphasis=emphasis, comma_backtrack=comma_backtrack) for t in texts]
    empty = tokenize_weighted(tokenizer, "", emphasis="None")
    cache: dict[bytes, object] = {}

    def encode(ids: np.ndarray):
        key = ids.tobytes()
        if key not in cache:
            cache[key] = encode_chunk(ids[None])
        return cache[key]

    columns = []
    for i in range(max(c.count for c in chunked)):
        parts = [c if i < c.count else empty for c in chunked]
        j = [i if i < c.count else 0 for c in chunked]
        hidden = arrays.concat([encode(p.ids[k]) for p, k in zip(parts, j)])
        weights = np.stack([p.weights[k] for p, k in zip(parts, j)])
        columns.append(apply_emphasis(hidden, weights, emphasis))
    return arrays.concat(columns, axis=1)


def encode_weighted(encode_chunk: EncodeChunk, tokenizer, text: str, *, emphasis: str = "Original",
                    comma_backtrack: int = COMMA_BACKTRACK):
    """One prompt's conditioning (1, 77·k, C), with emphasis, long-prompt chunks and BREAK."""
    return encode_texts(encode_chunk, tokenizer, [text], emphasis=emphasis, comma_backtrack=comma_backtrack)


def encode_prompt_pair(encode_chunk: EncodeChunk, tokenizer, prompt: str, negative_prompt: str, *,
                       emphasis: str = "Original", comma_backtrack: int = COMMA_BACKTRACK):
    """(cond, uncond), each (1, 77·k, C) with the same k: the shorter padded with the empty prompt's
    conditioning, so one UNet batch takes both (prompts without editing or alternation)."""
    def encode(text: str):
        return encode_weighted(encode_chunk, tokenizer, text, emphasis=emphasis, comma_backtrack=comma_backtrack)

    cond, uncond = encode(prompt), encode(negative_prompt)
    if cond.shape[1] == uncond.shape[1]:
        return cond, uncond
    return pad_to_same_length(cond, uncond, encode(""))


def encode_prompt_schedule(encode_chunk: EncodeChunk, tokenizer, prompt: str, steps: int, *,
                           emphasis: str = "Original", comma_backtrack: int = COMMA_BACKTRACK,
                           old_timelines: bool = False) -> list[tuple[int, object]]:
    """[(end_step, conditioning (1, 77·k, C)), ...] for a prompt with editing / alternation.

    AUTOMATIC1111's `get_learned_conditioning` for one prompt: the schedule's texts are encoded
    together (so all have the same k). Pick the entry for a denoiser call with
    `prompt_syntax.schedule_index`.
    """
    schedule = prompt_schedule(prompt, steps, old_timelines=old_timelines)
    hidden = encode_texts(encode_chunk, tokenizer, [text for _, text in schedule], emphasis=emphasis,
                          comma_backtrack=comma_backtrack)
    return [(end, hidden[i:i + 1]) for i, (end, _) in enumerate(schedule)]


def pad_to_same_length(cond, uncond, empty):
    """Prompt and negative conditioning made the same length by appending the empty prompt's
    conditioning `empty` (1, 77, C) to the shorter (AUTOMATIC1111's "Pad prompt/negative prompt")."""
    repeats = (cond.shape[1] - uncond.shape[1]) // empty.shape[1]
    if repeats < 0:
        cond = _append(cond, empty, -repeats)
    elif repeats > 0:
        uncond = _append(uncond, empty, repeats)
    return cond, uncond


def _append(hidden, empty, repeats: int):
    block = arrays.concat([empty] * hidden.shape[0])  # (B, 77, C)
    return arrays.concat([hidden, *[block] * repeats], axis=1)
