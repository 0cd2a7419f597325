"""What a model is and what would run where, without loading its weights (`coreml-sd info`)."""

from __future__ import annotations

from typing import Any

from coreml_sd.backends import LoadOptions
from coreml_sd.backends.selection import BackendRequest, plan_components


def model_report(source, request: BackendRequest, options: LoadOptions) -> dict[str, Any]:
    """A JSON-ready description: facts, the manifest of a converted folder, and per component the
    backend that would run it, where, and what it would fall back from (and why)."""
    info = source.info
    width, height = info.sizes[0] if info.sizes else (info.sample_size, info.sample_size)
    f = info.vae_scale_factor
    report: dict[str, Any] = {
        "name": info.name, "kind": info.kind, "path": str(info.path), "family": info.family,
        "prediction_type": info.prediction_type, "width": width, "height": height,
        "latent_shape": [info.latent_channels, height // f, width // f], "vae_scale_factor": f,
        "scaling_factor": info.scaling_factor, "text_hidden_size": info.text_hidden_size, "hash": info.hash,
        "scheduler": info.scheduler.to_dict(),
    }
    if source.packages is not None:
        report["manifest"] = source.packages.manifest.to_dict()
    elif info.path.is_file():
        report["size_bytes"] = info.path.stat().st_size
    report["backend"] = request.text
    report["compute_units"] = options.compute_units
    report["components"] = {c: r.to_dict() for c, r in plan_components(source, request, options).items()}
    return report


def _fallback_text(component: dict) -> str | None:
    skipped = component["fell_back"]
    if not skipped:
        return None
    why = skipped[0]["reason"] if len(skipped) == 1 else "; ".join(f"{s['backend']}: {s['reason']}" for s in skipped)
    return f"would fall back to {component['backend']}: {why}"


def render_text(report: dict[str, Any]) -> str:
    """The report as a few aligned lines for a terminal."""
    lines = [f"{report['name']}  ({report['kind']} model, {report['path']})",
             f"  family       {report['family']}, {report['prediction_type']} prediction",
             f"  size         {report['width']}x{report['height']} pixels, latents "
             f"{'x'.join(map(str, report['latent_shape']))}, text embedding {report['text_hidden_size']}",
             f"  hash         {report['hash'] or '-'}"]
    m = report.get("manifest")
    if m:
        lines += _manifest_lines(m)
    lines.append(f"runs (--backend {report['backend']}, --compute-units {report['compute_units']}):")
    for name, c in report["components"].items():
        lines.append(f"  {name:<13} {c['runs_on']}")
        note = _fallback_text(c)
        if note:
            lines.append(f"  {'':<13} {note}")
    return "\n".join(lines)


def _manifest_lines(m: dict[str, Any]) -> list[str]:
    src = m.get("source") or {}
    parity = m.get("parity") or {}
    figures = ", ".join(f"{k} {v.get('min_psnr_db')} dB" for k, v in (parity.get("components") or {}).items())
    sha = str(src.get("sha256", "-"))[:16]
    lines = [f"  converted    {m['attention']} attention, {m['weights']} weights, {m['precision']} programs, "
             f"UNet batch {m['batch']}, min target {m['min_target']}, {m.get('created') or '?'}",
             f"  source       {src.get('path', '-')} ({src.get('kind', '?')}, sha256 {sha}...)"]
    mods = {k: v for k, v in (src.get("modifiers") or {}).items() if v}
    if mods:
        lines.append(f"  baked in     {', '.join(f'{k}: {v}' for k, v in mods.items())}")
    if figures:
        lines.append(f"  parity       {figures} (>= {parity.get('threshold_db')} dB, {parity.get('executor')})")
    for name, p in m["components"].items():
        lines.append(f"  {name:<13} {p['package']}  {p['size_bytes'] / 2**20:.1f} MiB  {p['weights']}"
                     + (f"  compiled {p['compiled']}" if p.get("compiled") else ""))
    for name, p in (m.get("controlnets") or {}).items():  # --controlnet NAME picks one
        lines.append(f"  {'controlnet':<13} {p['package']}  {p['size_bytes'] / 2**20:.1f} MiB  {p['weights']}  from "
                     f"{p['source'].get('name')} ({p['source'].get('family') or 'non-standard size'})")
    return lines
