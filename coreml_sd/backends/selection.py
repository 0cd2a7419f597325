"""Which backend runs which component: `--backend` parsed, resolved with fallback, and loaded.

The `--backend` value (`BACKEND_HELP` says the same to users):

    auto                      the default: for a converted model folder coreml -> mil -> torch
                              (torch only when the manifest's source model still exists); for a
                              diffusers folder, a checkpoint or the built-in model: torch
    coreml                    one backend for every component; an error if it cannot run here
    coreml,mil,torch          a fallback order for every component
    unet=coreml,text_encoder=torch
                              per component (text_encoder, unet, vae_decoder, controlnet ...); a component's
                              fallback order is written with "/" (unet=coreml/mil); components not
                              named take the bare names given (mil,unet=coreml: the rest on mil),
                              or auto

A single backend named for a component is a demand: if it cannot run, that is an error with the
reason, never a silent substitute. Where a fallback order (or auto) lets a component fall back —
the backend cannot run here (no Core ML runtime off macOS, no torch weights), or its load failed
(a package Core ML cannot load on the requested compute units) — one WARNING line on the
`coreml_sd` logger says which components fell back, from what, to what, and why.

`plan_components` answers "what would run where" without loading weights (`coreml-sd info`);
`load_components` loads, eagerly, or just in time with `reduce_memory` (each component loaded
when first used and freed when the pipeline is done with it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from coreml_sd.backends import Components, Fallback, LoadOptions, Loaded, backend_names, get_backend
from coreml_sd.backends.interop import ArrayKind, at_boundary
from coreml_sd.components import KINDS
from coreml_sd.errors import BackendUnavailable, CoreMLSDError, InputError, choices_text
from coreml_sd.memory import release_memory

log = logging.getLogger("coreml_sd")

AUTO = "auto"
BACKEND_HELP = (
    "auto (default): a converted folder runs on coreml, else mil, else torch; any other model on torch. "
    "One name (coreml, mil, torch): every component there, or an error. A comma list (coreml,mil): a "
    "fallback order. Per component (text_encoder, text_encoder_2, unet, vae_decoder, vae_encoder, "
    "controlled_unet, controlnet): "
    "unet=coreml/mil,text_encoder=torch ('/' separates one component's fallbacks; components not named take "
    "the plain names given, or auto).")


@dataclass(frozen=True)
class BackendRequest:
    """Per component, the backends to try in order (("auto",) = decided by the model)."""

    chains: dict[str, tuple[str, ...]]
    text: str = AUTO

    def strict(self, component: str) -> bool:
        chain = self.chains[component]
        return len(chain) == 1 and chain[0] != AUTO


def _chain(text: str, where: str, sep: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(sep))
    valid = (AUTO, *backend_names())
    for n in names:
        if n not in valid:
            raise InputError(f"--backend {where}: unknown backend {n!r}; valid: {choices_text(valid)}")
    if AUTO in names and len(names) > 1:
        raise InputError(f"--backend {where}: auto stands alone (it is a fallback order itself)")
    if len(set(names)) != len(names):
        raise InputError(f"--backend {where}: a backend is named twice")
    return names


def parse_backend(text: str) -> BackendRequest:
    """Parse a `--backend` value (see the module docstring); errors name the part that is wrong."""
    text = (text or AUTO).strip()
    default: list[str] = []
    per: dict[str, tuple[str, ...]] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            raise InputError(f"--backend {text!r}: empty entry; write e.g. coreml,mil or unet=coreml")
        if "=" not in part:
            default.append(part)
            continue
        component, _, value = (s.strip() for s in part.partition("="))
        if component not in KINDS:
            raise InputError(f"--backend {part!r}: unknown component {component!r}; valid: {choices_text(KINDS)}")
        if component in per:
            raise InputError(f"--backend {text!r}: {component} is given twice")
        per[component] = _chain(value, part, "/")
    base = _chain(",".join(default), text, ",") if default else (AUTO,)
    return BackendRequest({c: per.get(c, base) for c in KINDS}, text)


def auto_chain(source) -> tuple[str, ...]:
    """auto: coreml -> mil -> torch for a model with packages (torch where its source exists); else torch."""
    if source.packages is not None:
        return ("coreml", "mil") + (("torch",) if source.torch_unavailable() is None else ())
    return ("torch",)


# -- planning (no weights loaded) ---------------------------------------------------------------
@dataclass
class Resolution:
    """How one component's chain resolves here, before loading: each backend's availability, asked once."""

    component: str
    chain: tuple[str, ...]  # what will be tried, in order (auto expanded)
    strict: bool
    skipped: list[Fallback] = field(default_factory=list)  # ruled out here, before the first runnable one
    runnable: list[str] = field(default_factory=list)  # backends that can run it here, in order
    where: str = ""  # the first runnable one's description (planning only)

    @property
    def backend(self) -> str | None:
        return self.runnable[0] if self.runnable else None

    def to_dict(self) -> dict:
        return {"backend": self.backend, "runs_on": self.where, "chain": list(self.chain),
                "fell_back": [f.to_dict() for f in self.skipped]}


def resolve(source, component: str, request: BackendRequest, options: LoadOptions, *,
            describe: bool = False) -> Resolution:
    chain = request.chains[component]
    res = Resolution(component, auto_chain(source) if chain == (AUTO,) else chain, request.strict(component))
    for name in res.chain:
        backend = get_backend(name)
        reason = backend.unavailable_reason(source, component, options)
        if reason is None and describe and not res.runnable:
            try:
                res.where = backend.describe(source, component, options)
            except CoreMLSDError as exc:  # e.g. a device torch does not see
                reason = str(exc)
        if reason is None:
            res.runnable.append(name)
            continue
        if res.strict:
            raise BackendUnavailable(f"--backend {request.text}: {name} cannot run the {component} here: {reason}"
                                     + _alternatives(name))
        if not res.runnable:
            res.skipped.append(Fallback(name, reason))
    if not res.runnable:
        raise BackendUnavailable(f"no backend can run the {component}: " + _reasons(res.skipped))
    res.where = res.where or res.backend
    return res


def _alternatives(name: str) -> str:
    others = [b for b in backend_names() if b != name]
    return f" (choose another with --backend: auto, {', '.join(others)}, or a fallback order like {name},{others[0]})"


def _reasons(skipped: Sequence[Fallback]) -> str:
    return "; ".join(f"{f.backend}: {f.reason}" for f in skipped)


def plan_components(source, request: BackendRequest, options: LoadOptions,
                    names: Sequence[str] | None = None) -> dict[str, Resolution]:
    """Per component, where it would run and what it would fall back from (loads no weights)."""
    names = names or source.info.spec.component_names
    return {c: resolve(source, c, request, options, describe=True) for c in names}


def fallback_line(components: list[str], skipped: Sequence[Fallback], final: str) -> str:
    why = skipped[0].reason if len(skipped) == 1 else _reasons(skipped)
    return f"{', '.join(components)} fell back from {skipped[0].backend} to {final}: {why}"


def log_fallbacks(events: dict[str, tuple[list[Fallback], str]]) -> None:
    """One WARNING line per distinct fallback, naming every component it applies to."""
    grouped: dict[tuple, list[str]] = {}
    for component, (skipped, final) in events.items():
        if skipped:
            key = (tuple((f.backend, f.reason) for f in skipped), final)
            grouped.setdefault(key, []).append(component)
    for (skipped, final), components in grouped.items():
        log.warning(fallback_line(components, [Fallback(*f) for f in skipped], final))


# -- loading: the one route ---------------------------------------------------------------------
def _load_one(source, res: Resolution, options: LoadOptions, shared: dict) -> tuple[Loaded, list[Fallback], str]:
    """Load a resolved component down its runnable backends: (loaded, what it fell back from, backend)."""
    skipped = list(res.skipped)
    for name in res.runnable:
        try:
            return get_backend(name).load(source, res.component, options, shared), skipped, name
        except CoreMLSDError as exc:
            if res.strict:
                raise
            skipped.append(Fallback(name, f"loading failed: {exc}"))
    raise BackendUnavailable(f"no backend could load the {res.component}: " + _reasons(skipped))


class Loader:
    """Loads components of one source on one request: eagerly, just in time, or later on demand."""

    def __init__(self, source, request: BackendRequest, options: LoadOptions, *, reduce_memory: bool = False):
        self.source, self.request, self.options, self.reduce_memory = source, request, options, reduce_memory
        self.shared: dict = {}
        self.components: Components | None = None

    def load(self, names: Sequence[str]) -> Components:
        plan = {c: resolve(self.source, c, self.request, self.options) for c in names}
        loop = _array_kind(plan["unet"].backend, self.options) if "unet" in plan else None
        comps = Components(parts={}, asarray=None, load_more=self.load_more, load_other=self.load_other)
        self.components = comps
        if self.reduce_memory:
            log_fallbacks({c: (r.skipped, r.backend) for c, r in plan.items()})  # known now: said once, here
            for c, r in plan.items():
                comps.parts[c] = JustInTime(c, self._loader(r), loop, comps)
                comps.runs_on[c], comps.backends[c] = f"{r.backend} (loaded when used)", r.backend
                comps.fallbacks[c] = list(r.skipped)
        else:
            events = {}
            loaded = {}
            for c, r in plan.items():
                loaded[c], skipped, final = _load_one(self.source, r, self.options, self.shared)
                events[c] = (skipped, final)
                comps.backends[c], comps.fallbacks[c], comps.runs_on[c] = final, skipped, loaded[c].runs_on
            log_fallbacks(events)
            loop = loop or next(iter(loaded.values())).array
            comps.parts.update({c: at_boundary(l.component, native=l.array, loop=loop) for c, l in loaded.items()})
            self._keep_torch_modules(comps)
        comps.asarray = loop.asarray if loop is not None else (lambda a: a)
        self.loop = loop
        return comps

    def _loader(self, res: Resolution, source=None, key: str | None = None) -> Callable[[], Loaded]:
        source, key = source or self.source, key or res.component

        def load() -> Loaded:
            # Fresh shared state per load: nothing of another component is kept alive.
            loaded, skipped, final = _load_one(source, res, self.options, {})
            if final != res.backend:  # a load failed: a fallback not announced yet
                log_fallbacks({key: (skipped, final)})
                self.components.fallbacks[key] = skipped
                self.components.backends[key] = final
            return loaded

        return load

    def load_other(self, source, component: str, key: str):
        """A component of another source (a ControlNet file beside the model) on this load's request,
        options and array kind, kept as `key` in the components (just in time with reduce_memory)."""
        res = resolve(source, component, self.request, self.options)
        comps = self.components
        if self.reduce_memory:
            comps.runs_on[key], comps.backends[key] = f"{res.backend} (loaded when used)", res.backend
            comps.fallbacks[key] = list(res.skipped)
            log_fallbacks({key: (res.skipped, res.backend)})
            comps.parts[key] = JustInTime(key, self._loader(res, source, key), self.loop, comps)
            return comps.parts[key]
        loaded, skipped, final = _load_one(source, res, self.options, {})
        log_fallbacks({key: (skipped, final)})
        comps.backends[key], comps.fallbacks[key], comps.runs_on[key] = final, skipped, loaded.runs_on
        comps.parts[key] = at_boundary(loaded.component, native=loaded.array, loop=self.loop or loaded.array)
        return comps.parts[key]

    def load_more(self, name: str):
        """A component the first load did not include (e.g. the VAE encoder for an init image)."""
        res = resolve(self.source, name, self.request, self.options)
        comps = self.components
        if self.reduce_memory:
            comps.runs_on[name], comps.backends[name] = f"{res.backend} (loaded when used)", res.backend
            comps.fallbacks[name] = list(res.skipped)
            return JustInTime(name, self._loader(res), self.loop, comps)
        loaded, skipped, final = _load_one(self.source, res, self.options, self.shared)
        log_fallbacks({name: (skipped, final)})
        comps.backends[name], comps.fallbacks[name], comps.runs_on[name] = final, skipped, loaded.runs_on
        self._keep_torch_modules(comps)
        return at_boundary(loaded.component, native=loaded.array, loop=self.loop or loaded.array)

    def _keep_torch_modules(self, comps: Components) -> None:
        """Keep only the torch modules that loaded components run on (the rest is freed now and
        loaded again if a later component needs it)."""
        mods = self.shared.get("torch_modules")
        if mods is None:
            return
        used = {KINDS[c].torch_module or c for c, b in comps.backends.items() if b == "torch" and c in KINDS}
        if not used:
            self.shared.pop("torch_modules")
            return
        for attr in ("text_encoder", "text_encoder_2", "unet"):
            if attr not in used:
                setattr(mods, attr, None)
        if not used & {"vae_decoder", "vae_encoder"}:
            mods.vae = None


def load_components(source, request: BackendRequest, options: LoadOptions = LoadOptions(), *,
                    names: Sequence[str] | None = None, reduce_memory: bool = False) -> Components:
    """The components `names` (default: what text-to-image needs of this model's family) for `request`."""
    return Loader(source, request, options, reduce_memory=reduce_memory).load(
        tuple(names or source.info.spec.component_names))


class JustInTime:
    """A component loaded at its first use and freed by `release()` (--reduce-memory)."""

    def __init__(self, component: str, load: Callable[[], Loaded], loop: ArrayKind, comps: Components):
        self.component, self._load, self.loop, self._comps = component, load, loop, comps
        self._loaded: Any = None

    @property
    def loaded(self) -> Any:
        """The component (loading it now if it is not loaded)."""
        if self._loaded is None:
            got = self._load()
            self._comps.runs_on[self.component] = got.runs_on
            self._loaded = at_boundary(got.component, native=got.array, loop=self.loop or got.array)
        return self._loaded

    @property
    def is_loaded(self) -> bool:
        return self._loaded is not None

    def release(self) -> None:
        if self._loaded is not None:
            self._loaded = None
            release_memory()

    @property
    def batch_size(self):
        return getattr(self.loaded, "batch_size", None)

    def encode(self, *args, **kwargs):
        return self.loaded.encode(*args, **kwargs)

    def predict(self, *args):
        return self.loaded.predict(*args)

    def decode(self, *args):
        return self.loaded.decode(*args)

    def residuals(self, *args):
        return self.loaded.residuals(*args)


def _array_kind(backend: str, options: LoadOptions) -> ArrayKind:
    """The array kind `backend` computes on, known without loading (numpy for Core ML, else torch)."""
    from coreml_sd.backends.interop import NUMPY, torch_kind

    if backend == "coreml":
        return NUMPY
    from coreml_sd.devices import resolve_device

    return torch_kind(resolve_device(options.device))
