"""One request on a loaded pipeline, stoppable between sampler steps.

`Pipeline.generate` is a generator that yields a `Progress` after every step, so the runner checks
its `Control` there: interrupt closes the generator (the current images are dropped, those already
finished stay) and ends the request; skip drops only the images being sampled and resumes with the
next ones from their own seeds (image i always uses seed + i, so the rest are the images they would
have been). Closing a generator runs no further step and writes nothing.

img2img is detected, not assumed: the keyword arguments a request needs are checked against the
signature of the loaded pipeline's `generate`, and a missing one is a 501 naming it.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from coreml_sd.serve.errors import ApiError
from coreml_sd.serve.translate import GenerationRequest

IMG2IMG_REQUIRED = "init_image"


class Control:
    """Flags another thread sets and the runner reads between steps."""

    def __init__(self):
        self._interrupt = threading.Event()
        self._skip = threading.Event()

    def interrupt(self) -> None:
        self._interrupt.set()

    def skip(self) -> None:
        self._skip.set()

    @property
    def interrupted(self) -> bool:
        return self._interrupt.is_set()

    def take_skip(self) -> bool:
        """True once per skip request."""
        if self._skip.is_set():
            self._skip.clear()
            return True
        return False

    def reset(self) -> None:
        self._interrupt.clear()
        self._skip.clear()


@dataclass
class Outcome:
    images: list = field(default_factory=list)  # (request index, GeneratedImage), in order
    interrupted: bool = False
    skipped: list[int] = field(default_factory=list)  # request indices dropped by skip


def generate_parameters(pipe) -> set[str] | None:
    """The keyword arguments `pipe.generate` takes (None: it takes any, **kwargs)."""
    params = inspect.signature(pipe.generate).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


def missing_arguments(pipe, names) -> list[str]:
    """Those of `names` that `pipe.generate` does not take."""
    known = generate_parameters(pipe)
    return [] if known is None else [name for name in names if name not in known]


def img2img_unavailable(pipe, options=("strength",)) -> str | None:
    """Why `pipe` cannot run img2img with these options, or None when it can."""
    missing = missing_arguments(pipe, [IMG2IMG_REQUIRED, *options])
    if not missing:
        return None
    return (f"img2img is not available yet: this coreml-sd pipeline's generate() takes no {', '.join(missing)} "
            f"(the request was valid; text-to-image works)")


def check_supported(pipe, request: GenerationRequest) -> None:
    """501 when the pipeline lacks a keyword argument the request needs (img2img before the
    pipeline has init images)."""
    reason = img2img_unavailable(pipe, request.image_options) if request.kind == "img2img" else None
    if reason:
        raise ApiError(501, reason)


def run_request(pipe, request: GenerationRequest, control: Control,
                on_progress: Callable[[int, Any], None], on_image: Callable[[int, Any], None]) -> Outcome:
    """Generate the request's images; `on_progress(offset, Progress)` after each step and
    `on_image(index, GeneratedImage)` for each finished image, both on this thread."""
    check_supported(pipe, request)
    outcome = Outcome()
    start = 0
    while start < request.num_images and not control.interrupted:
        count = request.num_images - start if len(request.init_images) <= 1 else 1
        events = pipe.generate(seed=request.seed + start, num_images=count,
                               **request.generate_kwargs(), **_image_kwargs(request, start))
        start = _consume(pipe, events, start, count, control, outcome, on_progress, on_image)
    return outcome


def release_components(pipe) -> None:
    """After a stopped generate(): with --reduce-memory, free what the pipeline would have freed at
    its end (a just-in-time component's release is a no-op otherwise)."""
    components = getattr(pipe, "components", None)
    if getattr(pipe, "reduce_memory", False) and components is not None:
        for name in ("text_encoder", "unet", "vae_decoder"):
            components.release(name)


def _image_kwargs(request: GenerationRequest, index: int) -> dict[str, Any]:
    if not request.init_images:
        return {}
    return {IMG2IMG_REQUIRED: request.init_images[index % len(request.init_images)], **request.image_options}


def _consume(pipe, events, offset: int, count: int, control: Control, outcome: Outcome, on_progress, on_image) -> int:
    """Drive one generate() call; return the request index to continue from."""
    from coreml_sd.pipeline import GeneratedImage

    for event in events:
        if isinstance(event, GeneratedImage):
            outcome.images.append((offset + event.index, event))
            on_image(offset + event.index, event)
            continue
        on_progress(offset, event)
        skip = control.take_skip()
        if control.interrupted or skip:
            events.close()  # GeneratorExit at the yield: no further step runs
            release_components(pipe)
            first = offset + event.image_index
            if control.interrupted:
                outcome.interrupted = True
                return offset + count
            outcome.skipped += list(range(first, first + event.batch))
            return first + event.batch
    return offset + count
