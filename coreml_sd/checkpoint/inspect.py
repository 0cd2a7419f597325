"""`coreml-sd checkpoint inspect` and `to-safetensors`: describe a tensor file, convert a pickle once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from coreml_sd.checkpoint import detect
from coreml_sd.checkpoint.config import as_config, sidecar_path
from coreml_sd.checkpoint.safeload import (
    SAFETENSORS,
    flat_state_dict,
    load_pickle,
    own_memory,
    sha256_file,
    sniff,
    tensor_shapes,
)
from coreml_sd.errors import ModelError
from coreml_sd.outputs import check_output_dir

FORMAT_NAMES = {SAFETENSORS: "safetensors", "torch-zip": "pickle (torch zip)", "pickle": "pickle (legacy torch)"}


def inspect_file(path: str | Path, *, probe: bool = True) -> dict[str, Any]:
    """What a file is, as a JSON-able dict. SD 2.x files are probed for their prediction type."""
    path = Path(path).expanduser()
    fmt = sniff(path)
    shapes, metadata = tensor_shapes(path)
    det = detect.classify(shapes)
    report: dict[str, Any] = {
        "file": str(path), "format": FORMAT_NAMES[fmt], "size_bytes": path.stat().st_size, "kind": det.kind,
        "family": det.family, "dtype": det.dtype, "tensors": len(shapes),
        "parameters": dict(det.params), "sha256": sha256_file(path),
    }
    report["hash"] = report["sha256"][:10]
    if det.kind == "model":
        report.update(has_unet=det.has_unet, has_vae=det.has_vae, has_text_encoder=det.has_text_encoder,
                      has_ema=det.has_ema, text_encoder=det.text_encoder, context_dim=det.context_dim,
                      in_channels=det.in_channels, prediction_type=_prediction_type(path, det, probe))
        try:
            detect.require_model(det, path)
            report["supported"], report["problem"] = True, None
        except ModelError as exc:
            report["supported"], report["problem"] = False, str(exc)
    if det.kind == "controlnet":
        report.update(controlnet_report(path, det, shapes))
    if det.kind == "unknown":
        report["found"] = det.found
    if metadata:
        report["metadata"] = {k: (v if len(v) < 200 else v[:200] + "...") for k, v in metadata.items()}
    return report


def controlnet_report(path: Path, det: detect.Detection, shapes) -> dict[str, Any]:
    """What a ControlNet file is made for, and whether it opens (its config known, not a "diff" file)."""
    from coreml_sd.checkpoint import controlnet_keymap
    from coreml_sd.controlnet_source import ControlNetFile

    out: dict[str, Any] = {"context_dim": det.context_dim, "block_widths": list(det.block_widths),
                           "in_channels": det.in_channels,
                           "layout": {"": "top-level keys (extracted)", controlnet_keymap.DIFFUSERS: "diffusers names"}
                           .get(det.layout, f"{det.layout}*"),
                           "residuals": None}
    try:
        cn = ControlNetFile(path, shapes=shapes, detection=det)
        out["residuals"] = controlnet_keymap.residual_count(cn.config)
        out["family"], out["supported"], out["problem"] = cn.family, True, None
    except ModelError as exc:
        out["supported"], out["problem"] = False, str(exc)
    return out


def _prediction_type(path: Path, det: detect.Detection, probe: bool) -> str | None:
    from coreml_sd.families import get_family, variants_of

    if sidecar_path(path).is_file():
        return as_config(sidecar_path(path)).scheduler.prediction_type
    if det.family is None or not det.standard or not det.has_unet:
        return None
    kinds = {v.prediction_type for v in variants_of(get_family(det.family))}
    if len(kinds) == 1:  # the family's files all predict the same (no variant to tell apart)
        return kinds.pop()
    if not probe:
        return f"unknown ({' or '.join(sorted(kinds))})"
    from coreml_sd.checkpoint.source import SingleFileCheckpoint

    return SingleFileCheckpoint(path).info.prediction_type


def describe(report: dict[str, Any]) -> str:
    """The report as aligned `key: value` lines for people."""
    lines = []
    for key, value in report.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {_count(v) if isinstance(v, int) else v}" for k, v in value.items())
        elif key == "size_bytes":
            key, value = "size", f"{value / 1e9:.2f} GB" if value > 1e8 else f"{value / 1e6:.2f} MB"
        lines.append(f"{key.replace('_', ' ')}: {value}")
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else str(n)


def to_safetensors(path: str | Path, output: str | Path | None = None, *, overwrite: bool = False) -> Path:
    """Convert a pickled checkpoint, LoRA or embedding to .safetensors (safely loaded; written atomically).

    Embeddings become AUTOMATIC1111's safetensors form (`emb_params`). Hypernetworks have no
    safetensors form that AUTOMATIC1111 reads, so they are refused.
    """
    path = Path(path).expanduser()
    if sniff(path) == SAFETENSORS:
        raise ModelError(f"{path} is already a safetensors file")
    out = Path(output).expanduser() if output else path.with_suffix(".safetensors")
    if out.exists() and not overwrite:
        raise ModelError(f"{out} exists; choose another output or remove it first")
    check_output_dir(out.parent)  # before the (long) load: a missing or read-only folder fails now
    obj = load_pickle(path)
    tensors = _tensors_for_safetensors(obj, path)
    _write_safetensors(tensors, out, {"format": "pt", "converted_from": path.name}, overwrite=overwrite)
    return out


def _write_safetensors(tensors: dict[str, Any], out: Path, metadata: dict[str, str], *, overwrite: bool) -> None:
    """Write under a hidden temporary name, give it the umask's mode (safetensors creates files 0600),
    then publish it: never over a file that appeared meanwhile unless `overwrite`."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from coreml_sd.outputs import default_file_mode, output_errors, publish, remove_stale_partials, temporary_name

    with output_errors("the safetensors file", out, library_errors=(SafetensorError,)):
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(out.parent)
        tmp = temporary_name(out)
        try:
            save_file(tensors, str(tmp), metadata=metadata)
            os.chmod(tmp, default_file_mode())
            if overwrite:
                os.replace(tmp, out)
            else:
                try:
                    publish(tmp, out)
                except FileExistsError:
                    raise ModelError(f"{out} appeared while converting; choose another output or remove it first") \
                        from None
        finally:
            tmp.unlink(missing_ok=True)


def _tensors_for_safetensors(obj: Any, path: Path) -> dict[str, Any]:
    from coreml_sd.checkpoint.embeddings import _vectors

    if isinstance(obj, dict) and any(isinstance(k, int) for k in obj):
        raise ModelError(f"{path} is a hypernetwork; AUTOMATIC1111 reads hypernetworks only as .pt, keep it so")
    if isinstance(obj, dict) and ("string_to_param" in obj or "emb_params" in obj):
        return {"emb_params": _vectors(obj, path).detach().contiguous().clone()}
    sd = flat_state_dict(obj, path)
    if not sd:
        raise ModelError(f"{path} holds no tensors to convert")
    return own_memory(sd)
