"""Single-file checkpoints and the files that modify a model (VAE, LoRA, embeddings, hypernetworks).

Nothing here imports torch at module load; the modules that need it import it inside functions,
so `import coreml_sd` stays light.

    coreml_sd.sources.open_model(path)          a model source (see checkpoint/source.py)
    read_original(path, config)                 diffusers modules from an original-layout file
    write_original_checkpoint(te, unet, vae, path, dtype="fp16"|"fp32", ema=False, fmt="safetensors"|"ckpt")
    config_from_modules(te, unet, vae)          the config that reads such a file back (config.py format)
"""

from __future__ import annotations

from pathlib import Path


def write_original_checkpoint(*args, **kwargs) -> Path:
    """`writer.write_original_checkpoint(text_encoder, unet, vae, path, *, dtype, ema, fmt, ...)`.

    Also accepts the path first with the modules by name — `(path, text_encoder=..., unet=..., vae=...)` —
    and a torch dtype for `dtype`; `fmt` follows the path's extension when not given.
    """
    from coreml_sd.checkpoint import writer

    if len(args) == 1 and isinstance(args[0], (str, Path)) and "path" not in kwargs:
        kwargs["path"], args = args[0], ()
    names = ("text_encoder", "unet", "vae", "path")
    kwargs.update(zip(names, args))
    missing = [n for n in names if n not in kwargs]
    if missing or len(args) > len(names):
        raise TypeError(f"write_original_checkpoint needs {', '.join(names)}; missing {', '.join(missing)}")
    dtype = kwargs.pop("dtype", "fp16")
    kwargs["dtype"] = {"torch.float16": "fp16", "torch.float32": "fp32"}.get(str(dtype), dtype)
    kwargs.setdefault("fmt", "ckpt" if Path(kwargs["path"]).suffix.lower() in (".ckpt", ".pt") else "safetensors")
    return writer.write_original_checkpoint(kwargs.pop("text_encoder"), kwargs.pop("unet"), kwargs.pop("vae"),
                                            kwargs.pop("path"), **kwargs)


def read_original(path, config, **kwargs):
    from coreml_sd.checkpoint.config import as_config
    from coreml_sd.checkpoint.loader import read_original as _read

    return _read(path, as_config(config), **kwargs)


def config_from_modules(text_encoder, unet, vae, **kwargs):
    from coreml_sd.checkpoint.writer import config_from_modules as _config

    return _config(text_encoder, unet, vae, **kwargs)
