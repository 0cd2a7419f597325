"""The models a client may pick: the built-in model and what lies under --models-dir.

A client names a model by the `title` this catalog lists (A1111's `sd_model_checkpoint`); a title
is only ever looked up here, never joined to a path, so no name a client sends can reach a file
the operator did not put in the models folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from coreml_sd.errors import InputError

BUILTIN_TITLE = "builtin"
MAX_DEPTH = 4  # folders below --models-dir that are searched


@dataclass(frozen=True)
class ModelEntry:
    title: str  # what clients send back: "builtin", "sd15/model.safetensors", "cyberrealistic"
    model_name: str  # the title without folders and extension, as A1111 lists it
    kind: str  # "builtin" | "coreml" | "diffusers" | "checkpoint"
    path: Path | None  # None for the built-in model

    @property
    def load_path(self) -> str | None:
        return None if self.path is None else str(self.path)


def folder_kind(path: Path) -> str | None:
    from coreml_sd.model_folder import is_converted_folder, is_core_ml_folder

    if is_converted_folder(path) or is_core_ml_folder(path):  # ours, or another tool's Core ML models
        return "coreml"
    if (path / "model_index.json").is_file():
        return "diffusers"
    return None


def scan(models_dir: Path | None) -> list[ModelEntry]:
    """The built-in model, then every converted folder, diffusers folder and checkpoint file under
    `models_dir` (sorted by title); a model folder's own files are not listed again."""
    entries = [ModelEntry(BUILTIN_TITLE, BUILTIN_TITLE, "builtin", None)]
    if models_dir is None:
        return entries
    from coreml_sd.checkpoint.source import CHECKPOINT_SUFFIXES

    root = Path(models_dir).expanduser()
    if not root.is_dir():
        raise InputError(f"--models-dir {root} is not a folder")
    found = []
    for folder, dirs, files in os.walk(root):  # symlinked folders are listed when they are models, not walked
        here = Path(folder)
        depth = len(here.relative_to(root).parts)
        models = [d for d in dirs if folder_kind(here / d)]
        found += [_entry(root, here / d, folder_kind(here / d)) for d in models]
        dirs[:] = sorted(d for d in dirs if d not in models and not d.startswith(".")
                         and not d.endswith((".mlpackage", ".mlmodelc")) and depth < MAX_DEPTH)
        found += [_entry(root, here / f, "checkpoint") for f in files
                  if Path(f).suffix.lower() in CHECKPOINT_SUFFIXES and not f.startswith(".")]
    return entries + sorted(found, key=lambda e: e.title.lower())


def _entry(root: Path, path: Path, kind: str) -> ModelEntry:
    title = path.relative_to(root).as_posix()
    name = path.name if kind != "checkpoint" else path.stem
    return ModelEntry(title, name, kind, path)


def entry_for_path(path: str) -> ModelEntry:
    """The operator's --model given as a path outside the models folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"--model {path}: no such file or folder, and no model of that name under --models-dir")
    kind = folder_kind(p) if p.is_dir() else "checkpoint"
    return ModelEntry(p.name, p.stem if kind == "checkpoint" else p.name, kind or "diffusers", p)


def resolve(entries: list[ModelEntry], name: str) -> ModelEntry:
    """The entry a client means by `name`: a title, a title with A1111's " [hash]" suffix, or a
    model name when only one entry has it."""
    name = strip_hash(name.strip())
    for entry in entries:
        if name == entry.title:
            return entry
    by_name = [e for e in entries if name == e.model_name]
    if len(by_name) == 1:
        return by_name[0]
    titles = ", ".join(e.title for e in entries)
    raise InputError(f"unknown model {name!r}; valid models: {titles}")


def strip_hash(title: str) -> str:
    """'model.safetensors [6ce0161689]' -> 'model.safetensors' (A1111 titles carry the short hash)."""
    if title.endswith("]") and " [" in title:
        return title[:title.rindex(" [")]
    return title
