"""Textual-inversion embeddings: a trigger word that stands for N learned token vectors.

Formats read (safely, see `safeload`):
* AUTOMATIC1111 `.pt`: `{"string_to_param": {"*": (N, D)}, "name": ..., "step": ...}` (early files
  keep the vectors in a torch `ParameterDict`, read as inert state);
* AUTOMATIC1111 `.safetensors`: `{"emb_params": (N, D)}`;
* diffusers `learned_embeds.bin` / `.safetensors`: `{"<token>": (D,) or (N, D)}`.

As in AUTOMATIC1111 the trigger word is the file name without extension. The vectors get token
ids past the vocabulary (`vocab_size + k`); the tokenizer maps the word to them and the text
encoder's token embedding is extended with the vectors, so nothing else in the model changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coreml_sd.checkpoint.safeload import InertObject, load_tensor_file, sha256_file
from coreml_sd.errors import ModelError

TEXT_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL"}


@dataclass(frozen=True)
class Embedding:
    name: str  # the trigger word
    vectors: Any  # torch.Tensor (N, D), float32
    path: Path
    hash: str  # sha256[:12], as AUTOMATIC1111's "TI hashes"

    @property
    def num_vectors(self) -> int:
        return int(self.vectors.shape[0])


def load_embedding(path: str | Path) -> Embedding:
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"embedding not found: {path} (expected a .pt, .bin or .safetensors file)")
    obj, _ = load_tensor_file(path)
    vectors = _vectors(obj, path)
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ModelError(f"{path}: embedding vectors have shape {tuple(vectors.shape)}; expected (N, width)")
    return Embedding(path.stem, vectors.detach().to(torch.float32).clone(), path, sha256_file(path)[:12])


def _vectors(obj: Any, path: Path):
    import torch

    if not isinstance(obj, dict):
        raise ModelError(f"{path} is not an embedding: expected a dict, found {type(obj).__name__}")
    if {"clip_l", "clip_g"} & set(obj):
        raise ModelError(f"{path} is an SDXL embedding (clip_l/clip_g); only SD 1.x and SD 2.x are supported")
    if isinstance(obj.get("emb_params"), torch.Tensor):
        return obj["emb_params"]
    params = obj.get("string_to_param")
    if isinstance(params, InertObject):  # a pickled torch ParameterDict
        params = dict(params.state.get("_parameters", {}))
    if isinstance(params, dict) and params:
        return next(iter(params.values()))
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:  # diffusers: {"<token>": vectors}
        return next(iter(tensors.values()))
    raise ModelError(f"{path} is not a textual-inversion embedding: expected emb_params, string_to_param "
                     f"or a single token tensor; found keys {sorted(map(str, obj))[:6]}")


def check_width(embedding: Embedding, text_width: int) -> None:
    width = int(embedding.vectors.shape[1])
    if width != text_width:
        raise ModelError(
            f"embedding {embedding.path.name} is {width} wide ({TEXT_WIDTHS.get(width, 'unknown family')}); "
            f"this model's text encoder is {text_width} wide ({TEXT_WIDTHS.get(text_width, 'unknown family')})"
        )


def assign_ids(embeddings: list[Embedding], vocab_size: int) -> dict[str, list[int]]:
    """Token ids past the vocabulary for each embedding's vectors, in order."""
    out, next_id = {}, vocab_size
    for emb in embeddings:
        out[emb.name] = list(range(next_id, next_id + emb.num_vectors))
        next_id += emb.num_vectors
    return out


def extend_text_encoder(text_encoder, embeddings: list[Embedding]) -> None:
    """Append the embeddings' vectors to the token embedding, in `assign_ids` order."""
    import torch

    old = text_encoder.get_input_embeddings()
    if not embeddings:
        return
    for emb in embeddings:
        check_width(emb, old.embedding_dim)
    extra = torch.cat([e.vectors for e in embeddings]).to(old.weight.dtype).to(old.weight.device)
    new = torch.nn.Embedding.from_pretrained(torch.cat([old.weight.detach(), extra]), freeze=True)
    text_encoder.set_input_embeddings(new)
    text_encoder.config.vocab_size = new.num_embeddings
