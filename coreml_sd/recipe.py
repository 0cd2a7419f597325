"""Generation recipes read back from images ("PNG Info"): AUTOMATIC1111 / Forge, Easy Diffusion, ours.

Where the parameters are:

* AUTOMATIC1111, Forge and coreml-sd write one text ("infotext": prompt lines, a
  `Negative prompt:` line, then `Key: value, ...`) into a PNG `parameters` text chunk, or into the
  EXIF UserComment of JPEG/WebP files (piexif's "UNICODE" encoding: an 8-byte prefix, UTF-16).
* Easy Diffusion ("embed" metadata) writes one PNG text chunk per field (`prompt`, `seed`,
  `num_inference_steps`, ...; or the display names `Prompt`, `Seed`, `Steps`, ... when its text
  format is also chosen), and JSON in the EXIF UserComment of JPEG/WebP files. Its sidecar `.txt`
  and `.json` files are read too.

The result is a `Recipe`: options for `generate` (names as the library uses them; sampler and
schedule names as the tool wrote them, for the sampler module to resolve) and warnings for what
cannot be honoured. Nothing here raises on malformed metadata except `InputError` for a file
that cannot be read or holds no parameters at all.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coreml_sd.errors import InputError

_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286

# AUTOMATIC1111's schedule types: (label, name, aliases) in its order; a sampler name may end with
# one ("DPM++ 2M Karras", written before schedule types were a separate field).
SCHEDULE_TYPES = (
    ("Automatic", "automatic", ()), ("Uniform", "uniform", ()), ("Karras", "karras", ()),
    ("Exponential", "exponential", ()), ("Polyexponential", "polyexponential", ()),
    ("SGM Uniform", "sgm_uniform", ("SGMUniform",)), ("KL Optimal", "kl_optimal", ()),
    ("Align Your Steps", "align_your_steps", ()), ("Simple", "simple", ()), ("Normal", "normal", ()),
    ("DDIM", "ddim", ()), ("Beta", "beta", ()),
)
# Fields that do not change the image (or that the options already carry).
_NEUTRAL_KEYS = {"Prompt", "Negative prompt", "Version", "Batch size", "Batch pos", "Backend", "Schedule type",
                 "Sampler", "Model", "Model hash", "Size", "Pad conds", "Old prompt editing timelines", "RNG"}


@dataclass(frozen=True)
class Recipe:
    """`options` for generate, `warnings` about what cannot be honoured, and what was read."""

    options: dict[str, Any]
    warnings: tuple[str, ...]
    source: str  # "infotext" (AUTOMATIC1111, Forge, coreml-sd) or "easydiffusion"
    fields: dict[str, Any] = field(default_factory=dict)  # the parameters as the file has them
    model: str | None = None
    model_hash: str | None = None
    networks: tuple[tuple[str, str, str], ...] = ()  # (kind, name, multiplier) from <lora:name:0.8> tags

    def to_dict(self) -> dict:
        return {"source": self.source, "options": self.options, "warnings": list(self.warnings),
                "model": self.model, "model_hash": self.model_hash,
                "networks": [{"kind": k, "name": n, "multiplier": m} for k, n, m in self.networks],
                "fields": self.fields}


# ---------------------------------------------------------------------------------------------
# Reading the metadata out of a file


def read_metadata(path: str | Path) -> tuple[str, Any]:
    """("infotext", text) or ("easydiffusion", dict) from an image or a sidecar .txt/.json file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such file: {path}; expected an image (PNG, JPEG, WebP) or a .txt/.json recipe")
    if path.suffix.lower() in (".txt", ".json"):
        text = path.read_text(encoding="utf-8", errors="replace")
        return _from_text(text, str(path), json_only=path.suffix.lower() == ".json")
    text_chunks, comment = _image_metadata(path)
    if "parameters" in text_chunks:
        return "infotext", text_chunks["parameters"]
    ed = _easydiffusion_fields(text_chunks)
    if ed:
        return "easydiffusion", ed
    if comment and comment.strip():
        return _from_text(comment, str(path))
    raise InputError(f"{path} holds no generation parameters (no PNG 'parameters' or Easy Diffusion text chunks, "
                     f"no EXIF UserComment)")


def _image_metadata(path: Path) -> tuple[dict[str, str], str | None]:
    """The PNG text chunks and the decoded EXIF UserComment of an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            try:
                im.load()  # PNG text chunks after the image data are read only with it
            except OSError:
                pass  # a truncated image can still carry its metadata
            chunks = {k: v for k, v in getattr(im, "text", im.info).items() if isinstance(v, str)}
            raw = im.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"cannot read {path} as an image: {exc}") from None
    return chunks, (decode_user_comment(raw) if raw else None)


def decode_user_comment(raw: bytes | str) -> str:
    """An EXIF UserComment's text: the 8-byte character-code prefix, then the text (EXIF 2.3, 4.6.5)."""
    if isinstance(raw, str):
        return raw.rstrip("\x00")
    prefix, body = raw[:8], raw[8:]
    if prefix == b"UNICODE\x00":
        if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
            text = body.decode("utf-16", errors="replace")
        else:  # piexif (AUTOMATIC1111) writes big-endian; some tools write little-endian without a BOM
            little = body[1::2].count(0) > body[0::2].count(0)
            text = body.decode("utf-16-le" if little else "utf-16-be", errors="replace")
    elif prefix == b"ASCII\x00\x00\x00":
        text = body.decode("ascii", errors="replace")
    elif prefix == b"JIS\x00\x00\x00\x00\x00":
        text = body.decode("shift_jis", errors="replace")
    elif prefix == b"\x00" * 8:
        text = body.decode("utf-8", errors="replace")
    else:
        text = raw.decode("utf-8", errors="replace")
    return text.rstrip("\x00")


def _from_text(text: str, where: str, json_only: bool = False) -> tuple[str, Any]:
    stripped = text.strip()
    if stripped.startswith("{") or json_only:
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: metadata looks like JSON but does not parse: {exc}") from None
        if not isinstance(data, dict):
            raise InputError(f"{where}: JSON metadata is a {type(data).__name__}, expected an object")
        return "easydiffusion", data
    ed = _easydiffusion_text(stripped)
    return ("easydiffusion", ed) if ed else ("infotext", text)


# ---------------------------------------------------------------------------------------------
# AUTOMATIC1111 infotext

_PARAM = re.compile(r'\s*(\w[\w \-/+]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


def parse_infotext(text: str) -> dict[str, str]:
    """AUTOMATIC1111's `parse_generation_parameters`, without the UI defaults: every field as text,
    with "Prompt" and "Negative prompt". The last line holds the fields if it has 3 or more."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines, last = [*lines, last], ""
    prompt, negative, in_negative = [], [], False
    for line in (line.strip() for line in lines):
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    fields = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        fields[key] = _unquote(value.strip())
    return fields


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            return value
        return decoded if isinstance(decoded, str) else value
    return value


def recipe_from_infotext(text: str, *, model_hash: str | None = None, model_name: str | None = None) -> Recipe:
    """A recipe from AUTOMATIC1111 / Forge / coreml-sd parameters text."""
    fields = parse_infotext(text)
    options, warnings = {}, []
    prompt, nets = _strip_networks(fields["Prompt"])
    negative, neg_nets = _strip_networks(fields["Negative prompt"])
    options.update(prompt=prompt, negative_prompt=negative)
    _infotext_numbers(fields, options, warnings)
    if any(k.startswith("Hires") for k in fields):
        options.pop("denoising_strength", None)  # it is the hires pass's, which is not run
    _infotext_sampler(fields, options)
    _infotext_compat(fields, options, warnings)
    warnings += _network_warnings(nets + neg_nets, fields)
    if re.search(r"\bAND\b", prompt):
        warnings.append("the prompt joins sub-prompts with AND (AUTOMATIC1111's composable diffusion), which "
                        "coreml-sd does not do: it is read as the word \"and\"")
    warnings += _model_warnings(fields.get("Model"), fields.get("Model hash"), model_name, model_hash)
    warnings += _unhonoured(fields)
    return Recipe(options, tuple(warnings), "infotext", fields, fields.get("Model"), fields.get("Model hash"),
                  tuple(nets + neg_nets))


# (infotext key, option, type)
_NUMBERS = (("Steps", "steps", int), ("CFG scale", "guidance_scale", float), ("Seed", "seed", int),
            ("Clip skip", "clip_skip", int), ("Denoising strength", "denoising_strength", float),
            ("ENSD", "eta_noise_seed_delta", int), ("Eta noise seed delta", "eta_noise_seed_delta", int),
            ("Eta", "eta", float))


def _infotext_numbers(fields: dict, options: dict, warnings: list) -> None:
    for key, option, kind in _NUMBERS:
        if key in fields:
            value = _number(fields[key], kind, key, warnings)
            if value is not None:
                options[option] = value
    if "Size" in fields:
        match = re.fullmatch(r"(\d+)x(\d+)", fields["Size"].strip())
        if match:
            options["width"], options["height"] = int(match.group(1)), int(match.group(2))
        else:
            warnings.append(f"Size: {fields['Size']!r} is not WIDTHxHEIGHT; the size is not taken")
    if "Emphasis" in fields:
        options["emphasis"] = fields["Emphasis"]


def _number(text, kind, key: str, warnings: list):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        try:  # "20.0" for an integer field
            as_float = float(text)
            value = int(as_float) if kind is int and as_float.is_integer() else None
        except (TypeError, ValueError):
            value = None
    if value is None:
        warnings.append(f"{key}: {str(text)!r} is not {'an integer' if kind is int else 'a number'}; not taken")
    return value


def split_sampler(sampler: str, schedule_label: str | None = None) -> tuple[str, str | None]:
    """("DPM++ 2M", "karras") from "DPM++ 2M Karras", as AUTOMATIC1111's `get_sampler_and_scheduler`
    reads old names; the schedule is AUTOMATIC1111's schedule-type name (or as written, lower case)."""
    schedule = _schedule_name(schedule_label) if schedule_label else None
    name = sampler.strip()
    for label, ident, aliases in SCHEDULE_TYPES:
        for option in (label, ident, *aliases):
            if name.endswith(" " + option):
                name, schedule = name[: -len(option) - 1], ident
                break
    return name, schedule


def _schedule_name(label: str) -> str:
    for known, ident, aliases in SCHEDULE_TYPES:
        if label in (known, ident, *aliases):
            return ident
    return label.strip().lower().replace(" ", "_")


def _infotext_sampler(fields: dict, options: dict) -> None:
    if "Sampler" in fields:
        sampler, schedule = split_sampler(fields["Sampler"], fields.get("Schedule type"))
        options["sampler"] = sampler
        if schedule:
            options["schedule"] = schedule
    elif "Schedule type" in fields:
        options["schedule"] = _schedule_name(fields["Schedule type"])


def _version(text: str | None) -> tuple[int, ...] | None:
    match = re.search(r"v(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return tuple(int(g or 0) for g in match.groups()) if match else None


def _infotext_compat(fields: dict, options: dict, warnings: list) -> None:
    """Options AUTOMATIC1111 sets from fields or, for older versions, from the Version field."""
    old = _version(fields.get("Version"))
    if fields.get("Old prompt editing timelines") == "True" or (old and old < (1, 6, 0) and "[" in fields["Prompt"]):
        options["old_timelines"] = True
    if fields.get("Pad conds") == "True":
        options["pad_conds"] = True
    if fields.get("Pad conds v0") == "True" or (old and old < (1, 6, 0) and options.get("sampler") in ("DDIM", "PLMS")):
        warnings.append("made with AUTOMATIC1111's old DDIM/PLMS padding of the negative prompt (\"Pad conds v0\"), "
                        "which is not reproduced")
    rng = fields.get("RNG", "GPU")
    if rng != "CPU":
        warnings.append(f"made with AUTOMATIC1111's {rng} noise (\"RNG: {rng}\"{', its default' if 'RNG' not in fields else ''}); "
                        f"coreml-sd draws its initial noise as \"RNG: CPU\" does, so the same seed gives another image")


def _strip_networks(prompt: str) -> tuple[str, list[tuple[str, str, str]]]:
    """The prompt without <lora:name:0.8>-style tags (AUTOMATIC1111 removes them before encoding)."""
    found = []

    def take(match):
        name, *rest = match.group(2).split(":")
        found.append((match.group(1), name, rest[0] if rest else "1"))
        return ""

    return _EXTRA_NETWORK.sub(take, prompt), found


def _network_warnings(networks: list, fields: dict) -> list[str]:
    out = [f"the prompt uses {kind} {name!r} at {mult}; it was removed from the prompt: load it with "
           f"--{'hypernetwork' if kind == 'hypernet' else 'lora'} FILE:{mult}" for kind, name, mult in networks]
    if "Hypernet" in fields:
        out.append(f"made with hypernetwork {fields['Hypernet']!r} at {fields.get('Hypernet strength', '1')}; "
                   "load it with --hypernetwork")
    return out


def _model_warnings(recipe_name, recipe_hash, model_name, model_hash) -> list[str]:
    """Whether the recipe's model is the current one: by AUTOMATIC1111's short hash (sha256[:10]) where
    both are known, else by name. Nothing to say when no current model is given."""
    if model_name is None and model_hash is None:
        return []
    wanted = (recipe_hash or "").strip().lower()
    if len(wanted) == 10 and model_hash:
        if model_hash.strip().lower()[:10] == wanted:
            return []
        return [(f"the recipe was made with model {recipe_name or '?'} [{wanted}], not the current model "
                 f"{model_name or '?'} [{model_hash[:10]}]: the image will differ")]
    if recipe_name and model_name and recipe_name != model_name:
        return [f"the recipe was made with model {recipe_name!r}, not the current model {model_name!r}"]
    if wanted:
        why = ("it is AUTOMATIC1111's old 8-digit hash" if len(wanted) != 10
               else "the current model's hash is not known")
        return [f"the recipe's model {recipe_name or '?'} [{wanted}] cannot be checked against the current model: {why}"]
    return []


def _unhonoured(fields: dict) -> list[str]:
    taken = {k for k, _, _ in _NUMBERS} | {"Emphasis", "Hypernet", "Hypernet strength", "Pad conds v0"}
    hires = [k for k in fields if k.startswith("Hires") or k == "First pass size"]
    out = []
    if hires:
        out.append("made with hires fix (" + ", ".join(hires) + "): not supported; the image is generated at "
                   "the first-pass size" + (" and 'Denoising strength' belongs to the hires pass" if
                                            "Denoising strength" in fields else ""))
    rest = [k for k in fields if k not in _NEUTRAL_KEYS | taken and k not in hires]
    if rest:
        out.append("ignored (an extension's or a setting coreml-sd does not have): "
                   + "; ".join(f"{k}: {fields[k]}" for k in rest))
    return out


# ---------------------------------------------------------------------------------------------
# Easy Diffusion

# Its display names (the "txt" metadata format) -> its request field names.
_ED_DISPLAY = {
    "Prompt": "prompt", "Negative Prompt": "negative_prompt", "Seed": "seed",
    "Stable Diffusion model": "use_stable_diffusion_model", "Clip Skip": "clip_skip",
    "ControlNet model": "use_controlnet_model", "ControlNet Filter": "control_filter_to_apply",
    "VAE model": "use_vae_model", "Sampler": "sampler_name", "Scheduler": "scheduler_name", "Width": "width",
    "Height": "height", "Steps": "num_inference_steps", "Guidance Scale": "guidance_scale",
    "Prompt Strength": "prompt_strength", "LoRA model": "use_lora_model", "LoRA Strength": "lora_alpha",
    "Hypernetwork model": "use_hypernetwork_model", "Hypernetwork Strength": "hypernetwork_strength",
    "Embedding models": "use_embeddings_model", "Seamless Tiling": "tiling",
    "Use Face Correction": "use_face_correction", "Use Upscaling": "use_upscale", "Upscale By": "upscale_amount",
    "Latent Upscaler Steps": "latent_upscaler_steps",
}
_ED_MARKERS = {"num_inference_steps", "use_stable_diffusion_model", "guidance_scale", "sampler_name"}
_ED_OPTIONS = (("prompt", "prompt", str), ("negative_prompt", "negative_prompt", str), ("seed", "seed", int),
               ("num_inference_steps", "steps", int), ("guidance_scale", "guidance_scale", float),
               ("width", "width", int), ("height", "height", int), ("prompt_strength", "denoising_strength", float))
# Fields that change the image but that a recipe cannot load by itself.
_ED_UNHONOURED = {"use_vae_model": "VAE", "use_hypernetwork_model": "hypernetwork", "use_lora_model": "LoRA",
                  "use_controlnet_model": "ControlNet", "control_filter_to_apply": "ControlNet filter",
                  "tiling": "seamless tiling", "use_face_correction": "face correction",
                  "use_upscale": "upscaling", "use_embeddings_model": "embeddings",
                  "use_embedding_models": "embeddings"}


def _easydiffusion_fields(chunks: dict[str, str]) -> dict[str, str] | None:
    named = {_ED_DISPLAY.get(k, k): v for k, v in chunks.items()}
    return named if "prompt" in named and named.keys() & _ED_MARKERS else None


def _easydiffusion_text(text: str) -> dict[str, str] | None:
    """Easy Diffusion's "txt" sidecar: one "Display Name: value" line per field."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if not sep or key not in _ED_DISPLAY:
            return None
        fields[_ED_DISPLAY[key]] = value
    return fields if "prompt" in fields and fields.keys() & _ED_MARKERS else None


def recipe_from_easydiffusion(meta: dict, *, model_name: str | None = None) -> Recipe:
    """A recipe from Easy Diffusion's metadata (field names or its display names)."""
    fields = {_ED_DISPLAY.get(k, k): v for k, v in meta.items()}
    options, warnings = {}, []
    for key, option, kind in _ED_OPTIONS:
        if kind is str and key in fields:
            options[option] = "" if fields[key] is None else str(fields[key])
        elif kind is not str and _given(fields.get(key)):
            value = _number(fields[key], kind, key, warnings)
            if value is not None:
                options[option] = value
    if _given(fields.get("sampler_name")):
        options["sampler"] = str(fields["sampler_name"])
    if _given(fields.get("scheduler_name")):
        options["schedule"] = _schedule_name(str(fields["scheduler_name"]))
    if "clip_skip" in fields:
        options["clip_skip"] = _ed_clip_skip(fields["clip_skip"], warnings)
    model = fields.get("use_stable_diffusion_model")
    model = str(model) if _given(model) else None
    warnings += _model_warnings(model, None, model_name, None)
    warnings += [f"made with {what} {fields[k]!r}: not loaded by the recipe" for k, what in _ED_UNHONOURED.items()
                 if _given(fields.get(k))]
    return Recipe(options, tuple(warnings), "easydiffusion", fields, model)


def _given(value) -> bool:
    """Whether an Easy Diffusion field is set (it writes unset ones as None, "None" or False)."""
    if value is None or value is False:
        return False
    if isinstance(value, str):
        return value.strip() not in ("", "None", "none", "null", "False", "false")
    return not isinstance(value, (list, tuple, dict)) or bool(value)


def _ed_clip_skip(value, warnings: list) -> int:
    """Easy Diffusion's clip skip is a checkbox (skip one layer = AUTOMATIC1111's "Clip skip: 2")."""
    if value in (True, "True", "true"):
        return 2
    if value in (False, "False", "false", None, "None", ""):
        return 1
    number = _number(value, int, "clip_skip", warnings)
    return number if number is not None else 1


# ---------------------------------------------------------------------------------------------
# Entry points


def read_recipe(path: str | Path, *, model_hash: str | None = None, model_name: str | None = None) -> Recipe:
    """The recipe in an image or sidecar file; warnings compare it with the current model when given."""
    kind, value = read_metadata(path)
    if kind == "easydiffusion":
        return recipe_from_easydiffusion(value, model_name=model_name)
    return recipe_from_infotext(value, model_hash=model_hash, model_name=model_name)


def recipe_options(path: str | Path, *, model_hash: str | None = None,
                   model_name: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """(generate options, warnings) for `generate --recipe IMAGE`."""
    recipe = read_recipe(path, model_hash=model_hash, model_name=model_name)
    return dict(recipe.options), list(recipe.warnings)


def merge_options(recipe: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """Recipe options overridden by the options the user gave (those not None)."""
    return {**recipe, **{k: v for k, v in given.items() if v is not None}}
