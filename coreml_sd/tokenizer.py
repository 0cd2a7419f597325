"""CLIP's byte-level BPE tokenizer in pure Python, matching transformers' `CLIPTokenizer`.

Shipped with the vocabulary (coreml_sd/data/clip) so generation works offline and without
transformers. Text is normalised exactly as transformers' (tokenizers-backed) CLIPTokenizer does;
control characters are kept and byte-encoded like any other symbol.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import regex

from coreml_sd.errors import ModelError

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_LENGTH = 77

_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of bytes to printable characters (so BPE never sees whitespace/control)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes)}


_WHITESPACE = regex.compile(r"\s+")


def clean_text(text: str) -> str:
    """Normalise text as transformers' CLIPTokenizer does: NFC, whitespace runs to one space, lower case."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).lower()


@dataclass(frozen=True)
class TokenizerFiles:
    vocab: Path
    merges: Path


def bundled_files() -> TokenizerFiles:
    base = resources.files("coreml_sd") / "data" / "clip"
    return TokenizerFiles(Path(str(base / "vocab.json")), Path(str(base / "merges.txt")))


def read_vocab(path: Path) -> dict[str, int]:
    """vocab.json: a JSON object of token -> id; anything else is a ModelError naming the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            vocab = json.load(fh)
    except OSError as exc:
        raise ModelError(f"cannot read the tokenizer vocabulary {path}: {exc.strerror}") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelError(f"{path} is not a tokenizer vocabulary: expected a JSON object of token -> id "
                         f"({exc})") from None
    if not isinstance(vocab, dict) or not vocab:
        raise ModelError(f"{path} is not a tokenizer vocabulary: expected a JSON object of token -> id, found "
                         f"{'an empty object' if vocab == {} else type(vocab).__name__}")
    bad = next((k for k, v in vocab.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0), None)
    if bad is not None:
        raise ModelError(f"{path} is not a tokenizer vocabulary: token {bad[:40]!r} has id {str(vocab[bad])[:40]}, "
                         f"expected a non-negative integer")
    return vocab


def read_merges(path: Path) -> list[tuple[str, str]]:
    """merges.txt: a `#version` line, then one `left right` pair per line."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().split("\n")
    except OSError as exc:
        raise ModelError(f"cannot read the tokenizer merges {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ModelError(f"{path} is not a BPE merges file: not UTF-8 text ({exc})") from None
    # The first line is a "#version" header; the file ends with a newline.
    merges = [tuple(line.split()) for line in lines[1:] if line and not line.startswith("#version")]
    bad = next((i for i, pair in enumerate(merges) if len(pair) != 2), None)
    if bad is not None:
        raise ModelError(f"{path} is not a BPE merges file: merge {bad + 1} is {' '.join(merges[bad])[:60]!r}, "
                         f"expected two symbols separated by a space")
    return merges


class CLIPTokenizer:
    """`tokenizer(text)` -> 77 ids: BOS, the BPE tokens (truncated), EOS, then padding."""

    def __init__(self, files: TokenizerFiles | None = None, *, pad_token: str = EOS, max_length: int = MAX_LENGTH):
        files = files or bundled_files()
        self.encoder: dict[str, int] = read_vocab(Path(files.vocab))
        self.ranks = {pair: i for i, pair in enumerate(read_merges(Path(files.merges)))}
        self.byte_encoder = _byte_to_unicode()
        for token in (BOS, EOS, pad_token):
            if token not in self.encoder:
                what = "pad token" if token == pad_token else "token"
                raise ModelError(f"{files.vocab}: the {what} {token!r} is not in the vocabulary (a CLIP vocab.json "
                                 f"has {BOS!r} and {EOS!r})")
        self.bos_id = self.encoder[BOS]
        self.eos_id = self.encoder[EOS]
        self.pad_id = self.encoder[pad_token]
        self.max_length = max_length
        self._cache: dict[str, list[str]] = {BOS: [BOS], EOS: [EOS]}

    def _bpe(self, token: str) -> list[str]:
        if token in self._cache:
            return self._cache[token]
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self._cache[token] = word
        return word

    def tokenize(self, text: str) -> list[str]:
        pieces = []
        for match in _PATTERN.findall(clean_text(text)):
            mapped = "".join(self.byte_encoder[b] for b in match.encode("utf-8"))
            pieces.extend(self._bpe(mapped))
        return pieces

    def encode(self, text: str) -> list[int]:
        """Token ids without BOS/EOS or padding (unknown pieces cannot occur with byte-level BPE)."""
        return [i for unit in self.encode_units(text) for i in unit]

    def encode_units(self, text: str) -> list[list[int]]:
        """The ids of `text` in the groups that must stay together: one per BPE token, and one per
        trigger word of a textual-inversion embedding (all its vectors' ids)."""
        triggers = getattr(self, "_triggers", None)
        if not triggers:
            return [[self.encoder[p]] for p in self.tokenize(text)]
        # Trigger words of textual-inversion embeddings become their own ids; the rest is BPE as usual.
        text, units, start = clean_text(text), [], 0
        for match in self._trigger_pattern.finditer(text):
            units += [[self.encoder[p]] for p in self.tokenize(text[start:match.start()])]
            units.append(list(triggers[match.group(0)]))
            start = match.end()
        return units + [[self.encoder[p]] for p in self.tokenize(text[start:])]

    def add_trigger(self, word: str, ids: list[int]) -> None:
        """Make `word` (a whole word, any case) in a prompt stand for `ids`: a textual-inversion embedding's
        vectors, whose ids lie past the vocabulary. A later trigger with the same word replaces it."""
        key = clean_text(word).strip()
        if not key or not ids:
            raise ValueError(f"a trigger needs a word and at least one id; got {word!r} -> {ids!r}")
        self._triggers = {**getattr(self, "_triggers", {}), key: list(ids)}
        words = sorted(self._triggers, key=len, reverse=True)  # longest first: "cat-v2" before "cat"
        self._trigger_pattern = regex.compile(r"(?<![\w])(?:" + "|".join(map(regex.escape, words)) + r")(?![\w])")

    def __call__(self, text: str) -> list[int]:
        ids = self.encode(text)[: self.max_length - 2]
        ids = [self.bos_id, *ids, self.eos_id]
        return ids + [self.pad_id] * (self.max_length - len(ids))
