"""Which backend runs which component: `--backend` parsed, resolved with fallback, and loaded.

The `--backend` value (`BACKEND_HELP` says the same to users):

    auto                      the default: for a converted model folder coreml -> mil -> torch
                              (torch only when the manifest's source model still exists); for a
                              diffusers folder, a checkpoint or the built-in model: torch
    coreml                    one backend for every component; an error if it cannot run here
    coreml,mil,torch          a fallback order for every component
    unet=coreml,text_encoder=torch
                              per component (text_encoder, unet, vae_decoder); a component's
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
from typing import Any, Callable

from coreml_sd.backends import COMPONENTS, Components, LoadOptions, Loaded, backend_names, get_backend
from coreml_sd.backends.interop import ArrayKind, at_boundary
from coreml_sd.errors import BackendUnavailable, CoreMLSDError, InputError, choices_text

log = logging.getLogger("coreml_sd")

AUTO = "auto"
BACKEND_HELP = (
    "auto (default): a converted folder runs on coreml, else mil, else torch; any other model on torch. "
    "One name (coreml, mil, torch): every component there, or an error. A comma list (coreml,mil): a "
    "fallback order. Per component (text_encoder, unet, vae_decoder): unet=coreml/mil,text_encoder=torch "
    "('/' separates one component's fallbacks; components not named take the plain names given, or auto).")


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
        if component not in COMPONENTS:
            raise InputError(f"--backend {part!r}: unknown component {component!r}; valid: {choices_text(COMPONENTS)}")
        if component in per:
            raise InputError(f"--backend {text!r}: {component} is given twice")
        per[component] = _chain(value, part, "/")
    base = _chain(",".join(default), text, ",") if default else (AUTO,)
    return BackendRequest({c: per.get(c, base) for c in COMPONENTS}, text)


def auto_chain(source) -> tuple[str, ...]:
    """auto: coreml -> mil -> torch for a converted folder (torch where its source exists); else torch."""
    from coreml_sd.model_folder import ConvertedModel

    if isinstance(source, ConvertedModel):
        chain = ["coreml", "mil"]
        if get_backend("torch").unavailable_reason(source, "unet", LoadOptions()) is None:
            chain.append("torch")
        return tuple(b for b in chain if b in backend_names())
    return ("torch",)


# -- planning (no weights loaded) ---------------------------------------------------------------
@dataclass
class Resolution:
    """How one component's chain resolves here, before loading."""

    component: str
    chain: tuple[str, ...]  # what will be tried, in order (auto expanded)
    strict: bool
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (backend, reason) ruled out here
    backend: str | None = None  # the first one that can run here
    where: str = ""  # its description

    def to_dict(self) -> dict:
        return {"backend": self.backend, "runs_on": self.where, "chain": list(self.chain),
                "fell_back": [{"backend": b, "reason": r} for b, r in self.skipped]}


def resolve(source, component: str, request: BackendRequest, options: LoadOptions, *,
            describe: bool = False) -> Resolution:
    chain = request.chains[component]
    res = Resolution(component, auto_chain(source) if chain == (AUTO,) else chain, request.strict(component))
    for name in res.chain:
        backend = get_backend(name)
        reason = backend.unavailable_reason(source, component, options)
        if reason is None and describe:
            try:
                res.where = backend.describe(source, component, options)
            except CoreMLSDError as exc:  # e.g. a device torch does not see
                reason = str(exc)
        if reason is None:
            res.backend = name
            res.where = res.where or name
            return res
        if res.strict:
            raise BackendUnavailable(f"--backend {request.text}: {name} cannot run the {component} here: {reason}"
                                     + _alternatives(name))
        res.skipped.append((name, reason))
    raise BackendUnavailable(f"no backend can run the {component}: " + _reasons(res.skipped))


def _alternatives(name: str) -> str:
    others = [b for b in backend_names() if b != name]
    return f" (choose another with --backend: auto, {', '.join(others)}, or a fallback order like {name},{others[0]})"


def _reasons(skipped: list[tuple[str, str]]) -> str:
    return "; ".join(f"{b}: {r}" for b, r in skipped)


def plan_components(source, request: BackendRequest, options: LoadOptions) -> dict[str, Resolution]:
    """Per component, where it would run and what it would fall back from (loads no weights)."""
    return {c: resolve(source, c, request, options, describe=True) for c in COMPONENTS}


def fallback_line(components: list[str], skipped: list[tuple[str, str]], final: str) -> str:
    why = skipped[0][1] if len(skipped) == 1 else _reasons(skipped)
    return f"{', '.join(components)} fell back from {skipped[0][0]} to {final}: {why}"


def log_fallbacks(events: dict[str, tuple[list[tuple[str, str]], str]]) -> None:
    """One WARNING line per distinct fallback, naming every component it applies to."""
    grouped: dict[tuple, list[str]] = {}
    for component, (skipped, final) in events.items():
        if skipped:
            grouped.setdefault((tuple(skipped), final), []).append(component)
    for (skipped, final), components in grouped.items():
        log.warning(fallback_line(components, list(skipped), final))


# -- loading ------------------------------------------------------------------------------------
def _load_one(source, component: str, request: BackendRequest, options: LoadOptions,
              shared: dict) -> tuple[Loaded, list[tuple[str, str]], str]:
    """Load `component` down its chain: (loaded, what was skipped and why, the backend that ran)."""
    res = resolve(source, component, request, options)
    skipped = list(res.skipped)
    start = res.chain.index(res.backend)
    for name in res.chain[start:]:
        backend = get_backend(name)
        if name != res.backend:
            reason = backend.unavailable_reason(source, component, options)
            if reason is not None:
                skipped.append((name, reason))
                continue
        try:
            return backend.load(source, component, options, shared), skipped, name
        except CoreMLSDError as exc:
            if res.strict:
                raise
            skipped.append((name, f"loading failed: {exc}"))
    raise BackendUnavailable(f"no backend could load the {component}: " + _reasons(skipped))


def load_components(source, request: BackendRequest, options: LoadOptions = LoadOptions(), *,
                    reduce_memory: bool = False, shared: dict | None = None) -> Components:
    """The pipeline's components for `request` (see the module docstring)."""
    shared = {} if shared is None else shared
    if reduce_memory:
        return _just_in_time(source, request, options, shared)
    loaded, events = {}, {}
    for component in COMPONENTS:
        loaded[component], skipped, final = _load_one(source, component, request, options, shared)
        events[component] = (skipped, final)
    shared.pop("torch_modules", None)  # modules no component kept are freed with it
    log_fallbacks(events)
    loop: ArrayKind = loaded["unet"].array
    parts = {c: at_boundary(l.component, native=l.array, loop=loop) for c, l in loaded.items()}
    return Components(asarray=loop.asarray, runs_on={c: l.runs_on for c, l in loaded.items()}, **parts)


class JustInTime:
    """A component loaded at its first use and freed by `release()` (--reduce-memory)."""

    def __init__(self, component: str, load: Callable[[], Loaded], loop: ArrayKind, runs_on: dict[str, str]):
        self.component, self._load, self.loop, self._runs_on = component, load, loop, runs_on
        self._loaded: Any = None

    @property
    def loaded(self) -> Any:
        """The component (loading it now if it is not loaded)."""
        if self._loaded is None:
            got = self._load()
            self._runs_on[self.component] = got.runs_on
            self._loaded = at_boundary(got.component, native=got.array, loop=self.loop)
        return self._loaded

    @property
    def is_loaded(self) -> bool:
        return self._loaded is not None

    def release(self) -> None:
        if self._loaded is not None:
            self._loaded = None
            _return_memory()

    @property
    def batch_size(self):
        return getattr(self.loaded, "batch_size", None)

    def encode(self, *args):
        return self.loaded.encode(*args)

    def predict(self, *args):
        return self.loaded.predict(*args)

    def decode(self, *args):
        return self.loaded.decode(*args)


def _return_memory() -> None:
    import gc
    import sys

    gc.collect()
    if "torch" in sys.modules:
        from coreml_sd.mil.executor import release_freed_memory

        release_freed_memory()


def _just_in_time(source, request: BackendRequest, options: LoadOptions, shared: dict) -> Components:
    # The loop's array kind is the UNet's first runnable backend's; if that one then fails to load,
    # the backend that replaces it sits behind a Boundary like any other foreign component.
    plan = {c: resolve(source, c, request, options) for c in COMPONENTS}
    log_fallbacks({c: (r.skipped, r.backend) for c, r in plan.items()})  # known now: said once, here
    loop = _array_kind(plan["unet"].backend, options)
    runs_on = {c: f"{r.backend} (loaded when used)" for c, r in plan.items()}

    def loader(component: str) -> Callable[[], Loaded]:
        def load() -> Loaded:
            # Fresh shared state per load: nothing of another component is kept alive.
            loaded, skipped, final = _load_one(source, component, request, options, dict(shared))
            if final != plan[component].backend:  # a load failed: a fallback not announced yet
                log_fallbacks({component: (skipped, final)})
            return loaded

        return load

    parts = {c: JustInTime(c, loader(c), loop, runs_on) for c in COMPONENTS}
    return Components(asarray=loop.asarray, runs_on=runs_on, **parts)


def _array_kind(backend: str, options: LoadOptions) -> ArrayKind:
    """The array kind `backend` computes on, known without loading (numpy for Core ML, else torch)."""
    from coreml_sd.backends.interop import NUMPY, torch_kind

    if backend == "coreml":
        return NUMPY
    from coreml_sd.devices import resolve_device

    return torch_kind(resolve_device(options.device))
