"""Reading a result: a markdown table, a PNG chart of the UNet step, and two results compared."""

from __future__ import annotations

import json
from pathlib import Path

from coreml_sd.errors import InputError

# (metric key, what it is): the figures `compare` puts side by side; lower is better for all.
METRICS = (
    ("unet_step.median_s", "UNet step median"),
    ("text_encoder.median_s", "text encoder median"),
    ("vae_decoder.median_s", "VAE decoder median"),
    ("load.cold_s", "load, cold"),
    ("load.warm_s", "load, warm"),
    ("end_to_end.seconds", "end to end"),
    ("few_step.seconds", "few steps, end to end"),
    ("vae_encoder.median_s", "VAE encoder median"),
    ("img2img.seconds", "img2img, end to end"),
    ("memory.peak_rss_gib", "peak RSS"),
)


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def get(entry: dict, key: str):
    """`entry["a"]["b"]` for key "a.b"; None where any part is missing."""
    for part in key.split("."):
        if not isinstance(entry, dict) or entry.get(part) is None:
            return None
        entry = entry[part]
    return entry


def ok_runs(result: dict) -> list[dict]:
    return [r for r in result["runs"] if r["status"] == "ok"]


def baseline_step(result: dict) -> float | None:
    """The diffusers baseline's UNet step median in this result, if it ran."""
    for r in ok_runs(result):
        if r["backend"] == "diffusers":
            return get(r, "unet_step.median_s")
    return None


def _header(result: dict) -> list[str]:
    m, s = result["machine"], result["settings"]
    libs = ", ".join(f"{k} {m[k]}" for k in ("torch", "diffusers", "transformers", "coremltools") if k in m)
    load = result.get("load_average") or {}
    return [
        f"Model: {result['model']['description']}.",
        f"Machine: {m['cpu']} ({m['cpu_count']} cores, {m['memory_gib']} GiB), {m['os']}, accelerator: "
        f"{m['accelerator']}; {libs}.",
        f"Load average (1/5/15 min) before {load.get('before')}, after {load.get('after')}."
        + (f" **Warning: {result['busy']}.**" if result.get("busy") else ""),
        f"Settings: {s['warmup']} warm-up + {s['steps']} timed UNet steps, {s['runs']} timed text-encoder/VAE "
        f"runs, end to end {s['e2e_steps']} {s['sampler']} steps, guidance {s['guidance_scale']}"
        + (f", few steps {s['few_steps']} {s.get('few_step_sampler', 'lcm')} steps, guidance "
           f"{s.get('few_step_guidance', 1.0)}" if s.get("few_steps") else "")
        + (f", img2img at strength {s['img2img_strength']:g}" if s.get("img2img_strength") else "")
        + f", each backend {'in its own process' if s['isolation'] == 'process' else 'in one process'}.",
        "End to end = prompt to image: text encoding, every step and VAE decoding (per step: that time / steps).",
    ]


def markdown_table(result: dict) -> str:
    """One row per run; skipped and failed runs say why."""
    base = baseline_step(result)
    cols = ["backend", "runs on (UNet)", "precision", "attention", "weights", "UNet step median (p10–p90)", "IQR",
            "× diffusers", "text encoder", "VAE decoder", "load cold / warm", "end to end (per step)",
            "few steps, end to end", "img2img (VAE encoder)", "peak RSS"]
    lines = _header(result) + ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["runs"]:
        if r["status"] != "ok":
            cells = [r["label"], f"**{r['status']}**: {r['reason']}"] + [""] * (len(cols) - 2)
        else:
            step = r["unet_step"]
            e2e = r["end_to_end"]
            cells = [
                r["label"], r["runs_on"].get("unet", ""), r["precision"], r["attention"], r["compression"],
                f"{fmt_s(step['median_s'])} ({fmt_s(step['p10_s'])}–{fmt_s(step['p90_s'])})", fmt_s(step["iqr_s"]),
                f"{step['median_s'] / base:.2f}" if base else "–",
                fmt_s(r["text_encoder"]["median_s"]), fmt_s(r["vae_decoder"]["median_s"]),
                f"{fmt_s(r['load']['cold_s'])} / {fmt_s(r['load']['warm_s'])}",
                f"{fmt_s(e2e['seconds'])} ({e2e['steps']} steps, {e2e['width']}x{e2e['height']}; "
                f"{fmt_s(e2e['seconds'] / e2e['steps'])}/step)",
                _few(r.get("few_step")),
                _img2img(r.get("img2img"), r.get("vae_encoder")),
                f"{r['memory']['peak_rss_gib']:.2f} GiB",
            ]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _img2img(run: dict | None, encoder: dict | None) -> str:
    if not run:
        return "–"
    return (f"{fmt_s(run['seconds'])} (strength {run['strength']:g}: {run['unet_steps']} of {run['steps']} steps, "
            f"{run['vs_end_to_end']:.2f}× end to end; encoder {fmt_s(encoder['median_s']) if encoder else '–'})")


def _few(few: dict | None) -> str:
    if not few:
        return "–"
    return f"{fmt_s(few['seconds'])} ({few['steps']} {few['sampler']} steps, guidance {few['guidance_scale']:g})"


def write_chart(result: dict, path: Path) -> Path | None:
    """Horizontal bars of the UNet step median per run, error bars p10–p90. None if nothing ran."""
    runs = ok_runs(result)
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in runs]
    med = [r["unet_step"]["median_s"] for r in runs]
    err = [[m - r["unet_step"]["p10_s"] for m, r in zip(med, runs)],
           [r["unet_step"]["p90_s"] - m for m, r in zip(med, runs)]]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.6 * len(runs)))
    ax.barh(labels, med, xerr=err, capsize=4, color="#4c72b0")
    ax.invert_yaxis()
    for y, m in enumerate(med):
        ax.annotate(fmt_s(m), (m, y), xytext=(6, 6), textcoords="offset points", fontsize=8)
    e2e = runs[0]["end_to_end"]
    ax.set_xlabel("seconds per guided UNet step (batch 2), median; bars p10–p90")
    machine = result["machine"]
    where = machine["cpu"] + ("" if machine["accelerator"] == "none" else f" / {machine['accelerator']}")
    ax.set_title(f"UNet step, {e2e['width']}x{e2e['height']}: {result['model']['name']} on {where}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def read_result(path: Path) -> dict:
    from coreml_sd.bench.runner import SCHEMA

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable benchmark result ({exc})") from exc
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("runs"), list):
        raise InputError(f"{path}: not a coreml-sd benchmark result (expected \"schema\": \"{SCHEMA}\" and runs)")
    return data


def compare(a: dict, b: dict) -> dict:
    """Per run label in both results and per metric: A, B and B/A (below 1: B is faster or smaller)."""
    runs_a = {r["label"]: r for r in ok_runs(a)}
    runs_b = {r["label"]: r for r in ok_runs(b)}
    rows = []
    for label in [k for k in runs_a if k in runs_b]:
        for key, name in METRICS:
            va, vb = get(runs_a[label], key), get(runs_b[label], key)
            if va is not None and vb is not None:
                rows.append({"label": label, "metric": key, "name": name, "a": va, "b": vb,
                             "ratio": vb / va if va else None})
    return {"rows": rows, "only_in_a": sorted(set(runs_a) - set(runs_b)),
            "only_in_b": sorted(set(runs_b) - set(runs_a))}


def compare_text(cmp: dict, name_a: str, name_b: str) -> str:
    lines = [f"B/A per backend and metric (below 1: B is faster or smaller); A = {name_a}, B = {name_b}", "",
             "| backend | metric | A | B | B/A |", "|---|---|---|---|---|"]
    for r in cmp["rows"]:
        unit = (lambda v: f"{v:.2f} GiB") if r["metric"].startswith("memory") else fmt_s
        ratio = "–" if r["ratio"] is None else f"{r['ratio']:.3f}"
        lines.append(f"| {r['label']} | {r['name']} | {unit(r['a'])} | {unit(r['b'])} | {ratio} |")
    for which, labels in (("A", cmp["only_in_a"]), ("B", cmp["only_in_b"])):
        if labels:
            lines.append(f"\nmeasured only in {which}: {', '.join(labels)}")
    return "\n".join(lines) + "\n"
