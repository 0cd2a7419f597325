"""Textual-inversion embeddings: a trigger word that stands for N learned token vectors.

Formats read (safely, see `safeload`):
* AUTOMATIC1111 `.pt`: `{"string_to_param": {"*": (N, D)}, "name": ..., "step": ...}` (early files
  keep the vectors in a torch `ParameterDict`, read as inert state);
* AUTOMATIC1111 `.safetensors`: `{"emb_params": (N, D)}`;
* diffusers `learned_embeds.bin` / `.safetensors`: `{"<token>": (D,) or (N, D)}`;
* SDXL (A1111, kohya): `{"clip_l": (N, 768), "clip_g": (N, 1280)}`, one set of vectors per text
  encoder (`TextEncoderSpec.embedding_key` says which encoder takes which).

As in AUTOMATIC1111 the trigger word is the file name without extension. The vectors get token
ids past the vocabulary (`vocab_size + k`); the tokenizer maps the word to them and the text
encoder's token embedding is extended with the vectors, so nothing else in the model changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from coreml_sd.checkpoint.safeload import InertObject, load_tensor_file, sha256_file
from coreml_sd.errors import ModelError

TEXT_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL"}
PER_ENCODER_KEYS = ("clip_l", "clip_g")  # SDXL embeddings' keys, in text-encoder order


@dataclass(frozen=True)
class Embedding:
    name: str  # the trigger word
    vectors: Any  # torch.Tensor (N, D), float32
    path: Path
    hash: str  # sha256[:12], as AUTOMATIC1111's "TI hashes"
    per_encoder: Mapping[str, Any] | None = None  # SDXL: {"clip_l": (N, 768), "clip_g": (N, 1280)}

    @property
    def num_vectors(self) -> int:
        return int(self.vectors.shape[0])

    def vectors_for(self, spec) -> Any:
        """The vectors the text encoder of `spec` (a TextEncoderSpec) takes."""
        if spec.embedding_key is None:
            if self.per_encoder:
                raise ModelError(f"{self.path.name} is an SDXL embedding ({'/'.join(self.per_encoder)}); this model's "
                                 f"text encoder takes an SD 1.x/2.x embedding (one set of vectors)")
            return self.vectors
        if not self.per_encoder or spec.embedding_key not in self.per_encoder:
            width = int(self.vectors.shape[1])
            raise ModelError(f"embedding {self.path.name} holds one set of vectors, {width} wide "
                             f"({TEXT_WIDTHS.get(width, 'unknown family')}); this model's {spec.component} takes the "
                             f"{spec.embedding_key} vectors of an SDXL embedding")
        return self.per_encoder[spec.embedding_key]


def load_embedding(path: str | Path) -> Embedding:
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"embedding not found: {path} (expected a .pt, .bin or .safetensors file)")
    obj, _ = load_tensor_file(path)
    if isinstance(obj, dict) and set(obj) & set(PER_ENCODER_KEYS):
        parts = {k: _matrix(obj[k], path) for k in PER_ENCODER_KEYS if k in obj}
        if len({int(v.shape[0]) for v in parts.values()}) > 1:
            raise ModelError(f"{path}: its text encoders' vectors differ in number: "
                             + ", ".join(f"{k} {tuple(v.shape)}" for k, v in parts.items()))
        return Embedding(path.stem, next(iter(parts.values())), path, sha256_file(path)[:12], per_encoder=parts)
    return Embedding(path.stem, _matrix(_vectors(obj, path), path), path, sha256_file(path)[:12])


def _matrix(vectors, path: Path):
    """(N, width) float32 vectors (a single (width,) vector is N = 1)."""
    import torch

    if not isinstance(vectors, torch.Tensor):
        raise ModelError(f"{path}: expected a tensor of embedding vectors, found {type(vectors).__name__}")
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ModelError(f"{path}: embedding vectors have shape {tuple(vectors.shape)}; expected (N, width)")
    return vectors.detach().to(torch.float32).clone()


def _vectors(obj: Any, path: Path):
    import torch

    if not isinstance(obj, dict):
        raise ModelError(f"{path} is not an embedding: expected a dict, found {type(obj).__name__}")
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


def check_fits(embedding: Embedding, family, text_width: int) -> None:
    """Whether `embedding` is made for a model of `family` whose context is `text_width` wide: the
    right kind (one set of vectors, or one per text encoder) and, for a single encoder, its width."""
    for spec in family.text_encoders:
        embedding.vectors_for(spec)
    if len(family.text_encoders) == 1 and family.text_encoders[0].embedding_key is None:
        check_width(embedding, text_width)


def check_width(embedding: Embedding, text_width: int, vectors=None) -> None:
    width = int((embedding.vectors if vectors is None else vectors).shape[1])
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


def extend_text_encoder(text_encoder, embeddings: list[Embedding], spec=None) -> None:
    """Append the embeddings' vectors (those `spec`'s encoder takes, for per-encoder files) to the
    token embedding, in `assign_ids` order."""
    import torch

    old = text_encoder.get_input_embeddings()
    if not embeddings:
        return
    parts = [e.vectors if spec is None else e.vectors_for(spec) for e in embeddings]
    for emb, vectors in zip(embeddings, parts):
        check_width(emb, old.embedding_dim, vectors)
    extra = torch.cat(parts).to(old.weight.dtype).to(old.weight.device)
    new = torch.nn.Embedding.from_pretrained(torch.cat([old.weight.detach(), extra]), freeze=True)
    text_encoder.set_input_embeddings(new)
    text_encoder.config.vocab_size = new.num_embeddings
