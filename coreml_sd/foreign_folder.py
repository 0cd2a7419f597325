"""Folders of Core ML models that other tools wrote: opened without coreml-sd's manifest.

Apple's converter (`torch2coreml`: Swift resource names or its Python pipeline's names, see
`coreml_sd.apple_layouts`), Guernika's converter and the folders Mochi Diffusion users download
carry no `manifest.json`, often only compiled `.mlmodelc` models. `ForeignFolder` recognises
their models by name, reads what the models say about themselves (`coreml_sd.model_description`:
tensor names, shapes, dtypes, enumerated sizes, op counts, user metadata) and builds the
`Manifest` a converted folder would have, marking each fact:

* **read** from a metadata file or a model's own metadata (Guernika writes `prediction_type`,
  `scaling_factor`, `attention_implementation` ... into each model's user metadata, and may put a
  `guernika.json` beside them — GuernikaKit `Unet.swift`, `Decoder.swift`; our own packages
  carry `coreml_sd.attention` and `coreml_sd.weights`);
* **inferred** from the models: the family (from the registry, `families.match_packages`: the
  text encoders present, the UNet's context width, extra inputs and input channels), image sizes
  (latent shape x the VAE factor, every enumerated shape), batch, attention layout (einsum ops:
  split-einsum, the way Mochi Diffusion and GuernikaKit tell), weight compression (palettizing
  or quantizing ops), input precision, token length, minimum OS (specification version);
* **assumed** from the defaults Apple's Swift pipeline uses when a folder says nothing: its
  scheduler (PNDM over SD's scaled-linear betas 0.00085-0.012 of 1000 steps, steps offset 1,
  epsilon prediction: `Scheduler.swift`), which is the family's shipped scheduler config; the
  latent scaling factor of the family (0.18215; 0.13025 for SDXL, the Swift CLI's `--xl`
  value); CLIP's tokenizer files (bundled) where the folder has none; `--prediction-type`
  overrides the prediction type.

`info` prints the facts with how each is known.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from coreml_sd.apple_layouts import (CONTROLNET_DIR, PACKAGE, controlnet_name, parse_python_name, swift_entry)
from coreml_sd.components import KINDS, PACKAGE_NAMES, TensorSpec
from coreml_sd.errors import ModelError, choices_text
from coreml_sd.families import get_family, match_packages
from coreml_sd.model_folder import TOKENIZER_FILES, ConvertedModel, Manifest, PackageInfo
from coreml_sd.tokenizer import TokenizerFiles, bundled_files

READ, INFERRED, ASSUMED = "read", "inferred", "assumed"
GUERNIKA_FILE = "guernika.json"
RUNNABLE = tuple(PACKAGE_NAMES)  # entries coreml-sd runs: text encoders, unet (or chunks), VAE parts
UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")
# UNet inputs that are not conditioning: ControlNet residuals (Apple: additional_residual_N;
# Guernika/diffusers: down_block_res_samples_N, mid_block_res_sample), T2I adapters.
CONTROL_PREFIXES = ("additional_residual_", "down_block_res_samples", "mid_block_res_sample", "adapter_res_samples")
# Specification version -> the oldest OS that loads it (coremltools' AvailableTarget).
SPEC_TARGETS = {7: "macOS13", 8: "macOS14", 9: "macOS15", 10: "macOS26"}


@dataclass(frozen=True)
class Fact:
    """One fact of a foreign folder and how it is known."""

    value: Any
    how: str  # read | inferred | assumed
    source: str  # where it comes from, in words

    def to_dict(self) -> dict:
        return {"value": self.value, "how": self.how, "from": self.source}


@dataclass(frozen=True)
class ModelFiles:
    """One model of the folder: its package and/or compiled model (paths relative to the folder)."""

    entry: str
    package: str | None = None
    compiled: str | None = None

    @property
    def primary(self) -> str:
        return self.package or self.compiled


@dataclass
class FolderScan:
    """What a folder holds, by name only (nothing is read)."""

    path: Path
    models: dict[str, ModelFiles] = field(default_factory=dict)  # entry -> files
    controlnets: dict[str, str] = field(default_factory=dict)  # name -> relative path
    layouts: set[str] = field(default_factory=set)  # swift, python
    versions: set[str] = field(default_factory=set)  # Apple Python names' model versions


# -- recognising ----------------------------------------------------------------------------------
def recognised_entries(path: Path) -> list[str]:
    """Entries of the Core ML models in `path` that coreml-sd runs, by their names (cheap)."""
    try:
        names = [p.name for p in Path(path).iterdir() if p.is_dir()]
    except OSError:
        return []
    found = [swift_entry(n) for n in names] + [(parse_python_name(n) or (None, None))[1] for n in names]
    return sorted({e for e in found if e in RUNNABLE})


def scan_folder(path: Path) -> FolderScan:
    scan = FolderScan(Path(path))
    for child in sorted(Path(path).iterdir()):
        if not child.is_dir():
            continue
        entry, python = swift_entry(child.name), parse_python_name(child.name)
        if python is not None:
            scan.versions.add(python[0])
            entry = python[1]
        if entry is not None:
            scan.layouts.add("python" if python else "swift")
            _add(scan, entry, child)
        elif controlnet_name(child.name):
            scan.controlnets[controlnet_name(child.name)] = child.name
        elif child.name == CONTROLNET_DIR:
            scan.controlnets.update({m.name.rsplit(".", 1)[0]: f"{CONTROLNET_DIR}/{m.name}"
                                     for m in sorted(child.iterdir()) if m.suffix in (".mlmodelc", PACKAGE)})
    if len(scan.versions) > 1:
        raise ModelError(f"{path} holds the models of several Apple-converted models "
                         f"({choices_text(sorted(scan.versions))}); put each in its own folder")
    return scan


def _add(scan: FolderScan, entry: str, child: Path) -> None:
    """Keep a package and a compiled model of one entry together; the first of each kind wins (a
    `--layout both` folder names one package twice)."""
    have = scan.models.get(entry, ModelFiles(entry))
    if child.suffix == PACKAGE and have.package is None:
        have = replace(have, package=child.name)
    elif child.suffix != PACKAGE and have.compiled is None:
        have = replace(have, compiled=child.name)
    scan.models[entry] = have


# -- the source -----------------------------------------------------------------------------------
class ForeignFolder(ConvertedModel):
    """A folder of another tool's Core ML models as a model source (see the module docstring)."""

    def __init__(self, path: Path, *, prediction_type: str | None = None, partial: bool = False):
        from coreml_sd.model_description import describe_model

        path = Path(path)
        scan = scan_folder(path)
        runnable = {e: f for e, f in scan.models.items() if e in RUNNABLE}
        if not runnable:
            raise ModelError(f"{path}: no Core ML model coreml-sd runs (TextEncoder, Unet, VAEDecoder ... as "
                             f".mlpackage or .mlmodelc); found {choices_text(sorted(scan.models)) or 'none'}")
        described = {e: describe_model(path / f.primary) for e, f in runnable.items()}
        manifest, facts, tokenizer = infer(scan, described, prediction_type=prediction_type)
        self.scan, self.descriptions, self.facts = scan, described, facts
        self._open(path, manifest, tokenizer, reopen=None, partial=partial, what="Core ML model folder")

    def torch_unavailable(self) -> str | None:
        return (f"{self.path.name} was converted by another tool and records no source model; the torch backend "
                "needs one (open the original checkpoint or diffusers folder instead)")

    def contents(self) -> dict[str, Any]:
        """What the folder holds beyond the models coreml-sd runs (info / models)."""
        return {"extras": {e: f.primary for e, f in self.scan.models.items() if e not in RUNNABLE},
                "controlnets": dict(self.scan.controlnets)}


def infer(scan: FolderScan, described: Mapping[str, Any], *,
          prediction_type: str | None = None) -> tuple[Manifest, dict[str, Fact], TokenizerFiles]:
    """The manifest a converted folder would have, the facts behind it, and the tokenizer files."""
    facts: dict[str, Fact] = {}
    guernika = _guernika_metadata(scan.path, described)
    unet = described.get("unet") or described.get("unet_chunk1")
    family = _family(described, unet, guernika, prediction_type, facts)
    spec = get_family(family)
    sizes, batch, vae_factor, latent_channels = _geometry(described, unet, facts)
    scheduler = _scheduler(family, guernika, prediction_type, facts)
    scaling = _scaling_factor(spec, guernika, facts)
    tokenizer = _tokenizer(scan, facts)
    components = {e: _package_info(scan.models[e], d) for e, d in described.items()}
    manifest = Manifest(
        name=_name(scan, guernika), family=family, scheduler=scheduler, width=sizes[0][0], height=sizes[0][1],
        sizes=[list(s) for s in sizes], batch=batch, latent_channels=latent_channels, vae_scale_factor=vae_factor,
        scaling_factor=scaling, text_hidden_size=_context_width(described, unet, facts),
        attention=_attention(unet or next(iter(described.values())), facts), weights=_weights(unet, described, facts),
        precision=_precision(unet, facts), min_target=_min_target(unet or next(iter(described.values())), facts),
        components=components, pad_token=spec.text_encoders[0].pad_token,
        max_length=_max_length(described, unet, facts),
        source={"path": None, "kind": "foreign", "tool": _tool(scan, described, guernika),
                "layout": "+".join(sorted(scan.layouts))},
        layout="both" if scan.layouts == {"swift", "python"} else next(iter(scan.layouts)),
    )
    manifest.validate(str(scan.path))
    return manifest, facts, tokenizer


# -- the facts, one function each ----------------------------------------------------------------
def _family(described, unet, guernika: dict, prediction_type, facts) -> str:
    encoders = [e for e in described if KINDS.get(e) and KINDS[e].role == "text_encoder"]
    extras, channels, context = None, None, None
    if unet is not None:
        extras = {s.name: (s.shape[1] if len(s.shape) > 1 else 1) for s in unet.inputs
                  if s.name not in (*UNET_INPUTS, "timestep_cond") and not s.name.startswith(CONTROL_PREFIXES)}
        sample = unet.input("sample")
        channels = sample.shape[1] if sample is not None else None
        context = _context(unet)
    wanted = prediction_type or guernika.get("prediction_type")
    family, standard = match_packages(encoders, context, extras, in_channels=channels, prediction_type=wanted)
    what = (f"text encoders {', '.join(encoders) or 'none'}; UNet context width {context}, extra inputs "
            f"{', '.join(f'{k} ({v})' for k, v in (extras or {}).items()) or 'none'}, {channels} input channels")
    facts["family"] = Fact(family.name, INFERRED, what + ("" if standard else " (not a full-size width)"))
    return family.name


def _context(unet) -> int | None:
    spec = unet.input("encoder_hidden_states")
    if spec is None:
        return None
    return spec.shape[1] if len(spec.shape) == 4 else spec.shape[-1]  # (B, C, 1, S) or (B, S, C)


def _context_width(described, unet, facts) -> int:
    if unet is not None and _context(unet):
        width = _context(unet)
        facts["text_hidden_size"] = Fact(width, INFERRED, "UNet input encoder_hidden_states")
        return width
    encoder = described.get("text_encoder") or described.get("text_encoder_2")
    out = next((s for s in encoder.outputs if s.name in ("last_hidden_state", "hidden_embeds")), encoder.outputs[0])
    facts["text_hidden_size"] = Fact(out.shape[-1], INFERRED, f"text encoder output {out.name}")
    return out.shape[-1]


def _geometry(described, unet, facts) -> tuple[list[tuple[int, int]], int, int, int]:
    """(sizes in pixels, UNet batch, VAE factor, latent channels)."""
    decoder, encoder = described.get("vae_decoder"), described.get("vae_encoder")
    factor, why = 8, None
    if decoder is not None and _fixed_hw(decoder.input("z")) and _fixed_hw(decoder.output("image")):
        factor, why = decoder.output("image").shape[2] // decoder.input("z").shape[2], "VAEDecoder z -> image"
    elif encoder is not None and _fixed_hw(encoder.input("x")) and _fixed_hw(encoder.output("latent")):
        factor, why = encoder.input("x").shape[2] // encoder.output("latent").shape[2], "VAEEncoder x -> latent"
    facts["vae_scale_factor"] = Fact(factor, INFERRED if why else ASSUMED, why or "SD's VAE (no fixed VAE shapes)")
    latent_input = (unet, "sample") if unet is not None else (decoder, "z") if decoder is not None else (None, None)
    latents, where = _latent_sizes(*latent_input)
    sizes = [(w * factor, h * factor) for h, w in latents] or [(512, 512)]
    facts["sizes"] = Fact([list(s) for s in sizes], INFERRED if latents else ASSUMED,
                          f"{where} x {factor}" if latents else "no model with a latent input")
    batch = unet.input("sample").shape[0] if unet is not None and unet.input("sample") else 1
    facts["batch"] = Fact(batch, INFERRED if unet is not None else ASSUMED, "UNet input sample")
    channels = (decoder.input("z").shape[1] if decoder is not None and decoder.input("z") is not None
                else min(4, unet.input("sample").shape[1]) if unet is not None else 4)
    facts["latent_channels"] = Fact(channels, INFERRED, "VAEDecoder input z" if decoder is not None else "UNet sample")
    return sizes, batch, factor, channels


def _fixed_hw(spec: TensorSpec | None) -> bool:
    return spec is not None and len(spec.shape) == 4 and None not in spec.shape[2:]


def _latent_sizes(model, name: str) -> tuple[list[tuple[int, int]], str]:
    """(h, w) of the latents a model's input takes: every enumerated shape, else its (default) shape."""
    if model is None:
        return [], ""
    if name in model.shapes:
        return [tuple(s[2:4]) for s in model.shapes[name]], f"{model.path.name} {name} (enumerated shapes)"
    spec = model.input(name)
    if name in model.ranges:
        bounds = model.ranges[name]
        default = _default_shape(model, name)
        return [tuple(default[2:4])], (f"{model.path.name} {name}: a ranged input ({bounds[2][0]}-{bounds[2][1]} x "
                                       f"{bounds[3][0]}-{bounds[3][1]} latents); only its default is offered")
    if spec is None or not _fixed_hw(spec):
        return [], ""
    return [tuple(spec.shape[2:4])], f"{model.path.name} input {name} {tuple(spec.shape)}"


def _default_shape(model, name: str) -> tuple:
    return model.defaults.get(name) or tuple(lo for lo, _ in model.ranges[name])


def _scheduler(family: str, guernika: dict, prediction_type, facts):
    from coreml_sd.checkpoint.config import shipped_scheduler
    from coreml_sd.config import SchedulerConfig

    spec = get_family(family)
    base = shipped_scheduler(spec.config) if spec.config else SchedulerConfig()
    # Apple's Swift PNDM scheduler spaces its steps "leading" with offset 1 (and diffusers writes
    # that into a PNDM config it saves): the schedule Apple-converted folders were made to run with.
    base = replace(base, timestep_spacing=base.timestep_spacing or "leading", steps_offset=base.steps_offset or 1)
    read = {k: guernika[k] for k in ("timestep_spacing", "steps_offset", "set_alpha_to_one") if k in guernika}
    scheduler = replace(base, **read)
    facts["scheduler"] = Fact(scheduler.to_dict(), READ if read else ASSUMED,
                              ("Guernika metadata " + ", ".join(read) + "; the rest " if read else "")
                              + f"the {family} family's noise schedule with the spacing of Apple's Swift pipeline "
                                "(PNDM: scaled-linear betas 0.00085-0.012, leading steps, offset 1)")
    kind = prediction_type or guernika.get("prediction_type") or spec.prediction_type
    how = ("given (--prediction-type)", READ) if prediction_type else (
        ("Guernika metadata", READ) if guernika.get("prediction_type") else
        (f"the {family} family's default (Apple's Swift pipeline: epsilon)", ASSUMED))
    facts["prediction_type"] = Fact(kind, how[1], how[0])
    return replace(scheduler, prediction_type=kind)


def _scaling_factor(spec, guernika: dict, facts) -> float:
    if "scaling_factor" in guernika:
        facts["scaling_factor"] = Fact(guernika["scaling_factor"], READ, "the VAE's metadata (scaling_factor)")
        return guernika["scaling_factor"]
    facts["scaling_factor"] = Fact(spec.scaling_factor, ASSUMED, f"the {spec.name} family's (Apple's Swift pipeline "
                                                                 "uses 0.18215, 0.13025 for SDXL)")
    return spec.scaling_factor


def _attention(model, facts) -> str:
    meta = model.user_metadata
    for key, who in (("coreml_sd.attention", "coreml-sd metadata"), ("attention_implementation", "Guernika metadata")):
        if meta.get(key):
            value = {"SPLIT_EINSUM": "split_einsum", "SPLIT_EINSUM_V2": "split_einsum_v2",
                     "ORIGINAL": "original"}.get(meta[key], meta[key])
            facts["attention"] = Fact(value, READ, f"{model.path.name} {who}")
            return value
    ops = model.op_counts
    value = "split_einsum" if ops.get("einsum") else "original"
    why = (f"{ops.get('einsum', 0)} einsum ops (split-einsum, for the Neural Engine; v1 and v2 are not told apart)"
           if ops.get("einsum") else f"no einsum ops ({ops.get('matmul', 0)} matmul)")
    facts["attention"] = Fact(value, INFERRED, f"{model.path.name}: {why}")
    return value


def _compression(model) -> str:
    if model is None:
        return "fp16"
    if model.user_metadata.get("coreml_sd.weights"):
        return model.user_metadata["coreml_sd.weights"]
    ops = model.op_counts
    if ops.get("constexpr_lut_to_dense"):
        return f"palettize-{model.lut_bits[0]}" if len(model.lut_bits) == 1 else "palettized"
    if ops.get("constexpr_affine_dequantize") or ops.get("constexpr_blockwise_shift_scale"):
        return "int8"
    if ops.get("constexpr_sparse_to_dense"):
        return "sparse"
    return "fp16"


def _weights(unet, described, facts) -> str:
    model = unet or next(iter(described.values()))
    value = _compression(model)
    how = READ if model.user_metadata.get("coreml_sd.weights") else INFERRED
    facts["weights"] = Fact(value, how, f"{model.path.name}: "
                            + ("palettizing (lookup-table) ops" if value.startswith("palett") else
                               "quantized-weight ops" if value == "int8" else
                               "its metadata" if model.user_metadata.get("coreml_sd.weights") else
                               "no weight-decompression ops"))
    return value


def _precision(unet, facts) -> str:
    if unet is None or unet.input("sample") is None:
        facts["precision"] = Fact("fp16", ASSUMED, "no UNet")
        return "fp16"
    dtype = unet.input("sample").dtype
    value = "fp32" if dtype == "fp32" else "fp16"
    facts["precision"] = Fact(value, INFERRED, f"UNet input sample is {dtype}")
    return value


def _min_target(model, facts) -> str:
    version = model.specification_version
    value = SPEC_TARGETS.get(version, f"specification {version}")
    facts["min_target"] = Fact(value, INFERRED, f"{model.path.name} specification version {version}")
    return value


def _max_length(described, unet, facts) -> int:
    encoder = described.get("text_encoder") or described.get("text_encoder_2")
    ids = encoder.input("input_ids") if encoder is not None else None
    if ids is not None and ids.shape[-1]:
        facts["max_length"] = Fact(ids.shape[-1], INFERRED, "text encoder input input_ids")
        return ids.shape[-1]
    length = unet.input("encoder_hidden_states").shape[-1] if unet is not None else 77
    facts["max_length"] = Fact(length, INFERRED if unet is not None else ASSUMED, "UNet encoder_hidden_states")
    return length


def _tokenizer(scan: FolderScan, facts) -> TokenizerFiles:
    """vocab.json and merges.txt: the folder's, the text encoder's folder's (Guernika), else CLIP's."""
    places = [scan.path] + [scan.path / f.compiled for e, f in scan.models.items()
                            if e.startswith("text_encoder") and f.compiled]
    for place in places:
        if all((place / name).is_file() for name in TOKENIZER_FILES):
            facts["tokenizer"] = Fact(str(place), READ, "vocab.json and merges.txt in the folder")
            return TokenizerFiles(place / "vocab.json", place / "merges.txt")
    facts["tokenizer"] = Fact("bundled CLIP BPE", ASSUMED, "the folder has no vocab.json/merges.txt; SD's text "
                                                           "encoders use CLIP's")
    return bundled_files()


def _package_info(files: ModelFiles, description) -> PackageInfo:
    return PackageInfo(package=files.primary, inputs=description.inputs, outputs=description.outputs,
                       weights=_compression(description), size_bytes=description.size_bytes,
                       compiled=files.compiled)


def _guernika_metadata(path: Path, described) -> dict[str, Any]:
    """Facts Guernika records: guernika.json beside the models, and its keys in the models' metadata."""
    from coreml_sd.config import read_json

    out: dict[str, Any] = {}
    for model in described.values():
        meta = model.user_metadata
        for key in ("prediction_type", "timestep_spacing"):
            if meta.get(key):
                out[key] = meta[key]
        if meta.get("steps_offset", "").isdigit():
            out["steps_offset"] = int(meta["steps_offset"])
        if meta.get("set_alpha_to_one") in ("true", "false"):
            out["set_alpha_to_one"] = meta["set_alpha_to_one"] == "true"
        if meta.get("scaling_factor"):
            try:
                out["scaling_factor"] = float(meta["scaling_factor"])
            except ValueError:
                pass
        if meta.get("converter_version"):
            out["converter_version"] = meta["converter_version"]
        if meta.get("identifier"):
            out.setdefault("identifier", meta["identifier"])
    if (path / GUERNIKA_FILE).is_file():
        data = read_json(path / GUERNIKA_FILE)
        out.update({k: data[k] for k in ("identifier", "converter_version", "prediction_type") if data.get(k)})
        out["guernika.json"] = True
    return out


def _tool(scan: FolderScan, described, guernika: dict) -> str:
    if any(m.user_metadata.get("coreml_sd.component") for m in described.values()):
        return "coreml-sd (its manifest.json is missing)"
    if guernika.get("converter_version") or guernika.get("guernika.json"):
        return f"Guernika Model Converter {guernika.get('converter_version', '')}".strip()
    if "python" in scan.layouts:
        return "Apple ml-stable-diffusion torch2coreml (Python pipeline names)"
    return "Apple ml-stable-diffusion layout (torch2coreml, Mochi Diffusion downloads, ...)"


def _name(scan: FolderScan, guernika: dict) -> str:
    if scan.versions:
        return next(iter(scan.versions))
    return str(guernika.get("identifier") or scan.path.name)


def open_foreign(path: Path, *, prediction_type: str | None = None, **unsupported) -> ForeignFolder:
    """`open_model`'s route for a Core ML folder without a manifest (modifiers need torch weights)."""
    given = [k for k, v in unsupported.items() if v]
    if given:
        raise ModelError(f"{path} is a folder of Core ML models: {', '.join(given)} cannot be applied to it (that "
                         "needs the model's torch weights: open the original checkpoint instead)")
    return ForeignFolder(path, prediction_type=prediction_type)
