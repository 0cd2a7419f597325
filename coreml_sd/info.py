"""What a model is and what would run where, without loading its weights (`coreml-sd info`), and
what a Core ML folder contains, whoever converted it (`coreml-sd info` and `coreml-sd models`)."""

from __future__ import annotations

from typing import Any

from coreml_sd.components import entry_component

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
    report["sizes"] = [f"{w}x{h}" for w, h in info.sizes] if info.sizes else None
    if source.packages is not None:
        report["manifest"] = source.packages.manifest.to_dict()
        report["contents"] = folder_contents(source.packages)
        facts = getattr(source.packages, "facts", None) or {}
        if facts:
            report["facts"] = {k: f.to_dict() for k, f in facts.items()}
    elif info.path.is_file():
        report["size_bytes"] = info.path.stat().st_size
    report["backend"] = request.text
    report["compute_units"] = options.compute_units
    report["components"] = {c: r.to_dict() for c, r in plan_components(source, request, options).items()}
    return report


def folder_contents(packages) -> dict[str, Any]:
    """What a Core ML model folder holds: per component its model (package/compiled), interface,
    weights and size; the sizes it takes, compression, chunking, ControlNet support, other models,
    and who converted it."""
    m = packages.manifest
    components = {}
    for entry, p in m.components.items():
        components[entry] = {"path": p.package, "compiled": p.compiled, "aliases": list(p.aliases),
                             "weights": p.weights, "size_bytes": p.size_bytes,
                             "inputs": [t.describe() for t in p.inputs], "outputs": [t.describe() for t in p.outputs]}
    extra = packages.contents()
    controlled = next((e for e in m.components if entry_component(e) == "controlled_unet"), None)
    residuals = [t.name for t in (m.components[controlled].inputs if controlled else ())
                 if t.name.startswith("additional_residual_")]
    return {
        "converted_by": (m.source or {}).get("tool") or ("coreml-sd " + m.tools.get("coreml_sd", "")).strip(),
        "layout": m.layout,
        "sizes": [f"{w}x{h}" for w, h in m.all_sizes],
        "size_flexibility": "enumerated" if len(m.all_sizes) > 1 else "fixed",
        "compression": {k: v["weights"] for k, v in components.items()},
        "chunked_unet": m.chunked,
        "controlnet": {"unet_takes_residuals": len(residuals),
                       "controlled_unet": m.components[controlled].package if controlled else None,
                       "controlnets": sorted(set(m.controlnets) | set(extra["controlnets"]))},
        "other_models": extra["extras"],
        "components": components,
    }


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
    if report.get("sizes") and len(report["sizes"]) > 1:
        lines.append(f"  sizes        {', '.join(report['sizes'])} (enumerated: any other size is refused)")
    m = report.get("manifest")
    if m and report.get("facts"):
        lines += _foreign_lines(report)
    elif m:
        lines += _manifest_lines(m)
    if report.get("contents"):
        lines += contents_lines(report["contents"])
    lines.append(f"runs (--backend {report['backend']}, --compute-units {report['compute_units']}):")
    for name, c in report["components"].items():
        lines.append(f"  {name:<13} {c['runs_on']}")
        note = _fallback_text(c)
        if note:
            lines.append(f"  {'':<13} {note}")
    return "\n".join(lines)


def _foreign_lines(report: dict[str, Any]) -> list[str]:
    """A folder without our manifest: each fact and how it is known (read / inferred / assumed)."""
    lines = [f"  converted by {report['contents']['converted_by']} (no coreml-sd manifest: facts below were read, "
             "inferred from the models, or assumed)"]
    for name, fact in report["facts"].items():
        value = fact["value"] if not isinstance(fact["value"], dict) else "(see --json)"
        lines.append(f"  {name:<17}{str(value):<24} {fact['how']}: {fact['from']}")
    return lines


def contents_lines(c: dict[str, Any]) -> list[str]:
    """The folder's models, sizes, compression, chunking and ControlNet support as text."""
    control = c["controlnet"]
    if control["controlled_unet"] or control["unet_takes_residuals"]:
        cn = (f"yes ({control['controlled_unet'] or 'the UNet'} takes {control['unet_takes_residuals'] or 'the'} "
              f"residuals; ControlNets: {', '.join(control['controlnets']) or 'none in the folder'})")
    else:
        cn = "no ControlNet-ready UNet" + (f" (ControlNets {', '.join(control['controlnets'])})"
                                            if control["controlnets"] else "")
    lines = [f"  contains     {len(c['components'])} models ({c['layout']} layout), sizes "
             f"{', '.join(c['sizes'])} ({c['size_flexibility']}), UNet "
             f"{'in 2 chunks' if c['chunked_unet'] else 'in one model'}",
             f"  controlnet   {cn}"]
    if c["other_models"]:
        lines.append(f"  also         {', '.join(f'{k} ({v})' for k, v in c['other_models'].items())} (not run here)")
    for name, comp in c["components"].items():
        ins = "; ".join(comp["inputs"])
        lines.append(f"  {name:<13}{comp['path']}  {comp['size_bytes'] / 2**20:.1f} MiB  {comp['weights']}"
                     + (f"  compiled {comp['compiled']}" if comp["compiled"] not in (None, comp["path"]) else "")
                     + f"  <- {ins}")
    return lines


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
    for name, p in (m.get("controlnets") or {}).items():  # --controlnet NAME picks one
        lines.append(f"  {'controlnet':<13} {p['package']}  {p['size_bytes'] / 2**20:.1f} MiB  {p['weights']}  from "
                     f"{p['source'].get('name')} ({p['source'].get('family') or 'non-standard size'})")
    return lines


def model_summary(source) -> dict[str, Any]:
    """A short description of a model for `coreml-sd models`: what it is and, for a Core ML folder,
    what it contains (whoever converted it)."""
    info = source.info
    out: dict[str, Any] = {"name": info.name, "kind": info.kind, "path": str(info.path), "family": info.family,
                           "prediction_type": info.prediction_type,
                           "sizes": [f"{w}x{h}" for w, h in info.sizes] if info.sizes else None}
    if source.packages is not None:
        out["contents"] = folder_contents(source.packages)
        facts = source.packages.facts
        out["inferred"] = sorted(k for k, f in facts.items() if f.how == "inferred")
        out["assumed"] = sorted(k for k, f in facts.items() if f.how == "assumed")
    return out


def render_summary(entry: dict[str, Any]) -> str:
    sizes = ", ".join(entry["sizes"]) if entry.get("sizes") else "any size"
    lines = [f"{entry['name']}  ({entry['kind']} model, {entry['path']})",
             f"  family       {entry['family']}, {entry['prediction_type']} prediction; {sizes}"]
    if entry.get("contents"):
        lines.append(f"  converted by {entry['contents']['converted_by'] or '?'}")
        lines += contents_lines(entry["contents"])
        if entry.get("assumed"):
            lines.append(f"  assumed      {', '.join(entry['assumed'])} (no manifest; see coreml-sd info)")
    return "\n".join(lines)
