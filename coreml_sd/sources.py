"""Opening a model: recognise what is at a path and return its model source.

`open_model(path)` dispatches to the source kinds (each in its own module, all implementing
`coreml_sd.model_source.ModelSource`): a converted Core ML folder (`manifest.json`), a folder of
Core ML models another tool wrote (no manifest: `foreign_folder.py`), a diffusers
folder (`model_index.json`), a single-file checkpoint (.safetensors/.ckpt/.pt), or the built-in
model (no path, or the name `builtin`/`digits`). Modifiers (VAE, LoRA, embeddings, hypernetworks,
prediction type) wrap any source with torch weights; a converted folder has them baked in.
"""

from __future__ import annotations

from pathlib import Path

from coreml_sd.errors import ModelError
from coreml_sd.model_source import ModelSource
from coreml_sd.paths import describe_input

BUILTIN = "builtin"
BUILTIN_NAMES = (BUILTIN, "digits")


def builtin_checkpoint() -> Path:
    """The built-in model: a tiny SD-architecture model of handwritten digits (training/train_digits.py),
    one original-layout checkpoint with its config beside it (`<stem>.coreml-sd.json`)."""
    from importlib import resources

    return Path(str(resources.files("coreml_sd") / "data" / "builtin" / "digits.safetensors"))


def open_model(path: str | Path | None = None, *, vae: str | Path | None = None, loras=(), embeddings=(),
               hypernetworks=(), prediction_type: str | None = None, config=None, ema: bool = False) -> ModelSource:
    """Recognise the model at `path` and return its source; a one-line error otherwise.

    `path`: a converted folder, a diffusers folder or a single-file checkpoint. The modifiers work
    on sources with torch weights: `vae` a replacement VAE file, `loras` paths or (path, strength)
    pairs, `embeddings` textual-inversion files, `hypernetworks` (path, strength) pairs,
    `prediction_type` to override the model's. `config` (single files only): the architecture of a
    non-standard file, see `coreml_sd.checkpoint.config`; `ema`: use a checkpoint's EMA weights.
    None, "builtin" or "digits": the built-in model, opened like a community checkpoint.
    """
    from coreml_sd.checkpoint.source import CHECKPOINT_SUFFIXES, SingleFileCheckpoint, with_modifiers

    if path is None or str(path) in BUILTIN_NAMES:
        path = builtin_checkpoint()
    p = Path(path).expanduser()
    problem = describe_input(p)  # a missing path, a symlink loop, a FIFO, ... each said as what it is
    if problem:
        raise ModelError(f"model not found: {problem} (expected a converted Core ML model folder, a diffusers model "
                         f"folder or a .safetensors/.ckpt file; without --model the built-in model is used)")
    modifiers = dict(vae=vae, loras=loras, embeddings=embeddings, hypernetworks=hypernetworks,
                     prediction_type=prediction_type)
    from coreml_sd.model_folder import is_converted_folder, is_core_ml_folder

    if is_converted_folder(p):
        return _converted_folder(p, **modifiers)
    if is_core_ml_folder(p):  # Apple's, Guernika's, Mochi Diffusion's folders: no manifest
        from coreml_sd.foreign_folder import open_foreign

        return open_foreign(p, **modifiers)
    if p.is_dir() and (p / "model_index.json").is_file():
        from coreml_sd.diffusers_folder import DiffusersFolder

        source = DiffusersFolder(p)
    elif p.is_file() and p.suffix.lower() in CHECKPOINT_SUFFIXES:
        source = SingleFileCheckpoint(p, config=config, prediction_type=prediction_type, ema=ema)
    else:
        found = "a folder without model_index.json" if p.is_dir() else f"a file ({p.suffix or 'no extension'})"
        raise ModelError(f"{p} is not a model: expected a diffusers model folder (with model_index.json), a "
                         f"converted model folder (with manifest.json), a folder of Core ML models (TextEncoder, "
                         f"Unet, VAEDecoder ... .mlpackage/.mlmodelc, or Apple's Stable_Diffusion_version_* names) "
                         f"or a {'/'.join(CHECKPOINT_SUFFIXES)} checkpoint, found {found}")
    return with_modifiers(source, **modifiers)


def _converted_folder(path: Path, **modifiers) -> ModelSource:
    """A folder written by `coreml-sd convert` (its VAE, LoRAs and embeddings are already baked in).
    Its torch weights, where wanted, are its recorded source, opened again through `open_model`."""
    from coreml_sd.model_folder import ConvertedModel

    given = [k for k, v in modifiers.items() if v]
    if given:
        raise ModelError(f"{path} is a converted model: {', '.join(given)} cannot be applied to it; pass them to "
                         f"`coreml-sd convert` instead")
    return ConvertedModel(path, reopen=open_model)


def model_paths(paths) -> list[Path]:
    """The models at `paths`: a path that is a model stands for itself, a folder that is not for the
    models inside it (as `coreml-sd serve --models-dir` lists them)."""
    from coreml_sd.serve.catalog import folder_kind, scan

    out: list[Path] = []
    for path in map(Path, paths):
        if path.is_file() or folder_kind(path):
            out.append(path)
        else:
            out += [e.path for e in scan(path) if e.path is not None]
    return out
