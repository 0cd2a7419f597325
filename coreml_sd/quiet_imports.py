"""Engines imported without their import-time chatter (torch-free: the Core ML backend uses it)."""

from __future__ import annotations

import logging


# Optional frameworks coremltools probes at import for converters coreml-sd never uses. scikit-learn
# (with SciPy) adds 58 MiB and 0.8 s to every process that reads a package, the `mil` executor's
# included (issue 18: its peak RSS counts against the UNet's weights); coremltools 9 disables its
# scikit-learn converter for today's versions anyway.
UNUSED_BY_COREMLTOOLS = ("sklearn",)


def import_coremltools():
    """coremltools, with its log level raised while it imports: on Linux it warns about the Core ML
    runtime and optional converters it lacks, which coreml-sd already knows and reports itself. The
    frameworks in UNUSED_BY_COREMLTOOLS look absent to it unless already imported (`import` raises
    ImportError for a None entry of sys.modules), and importable again afterwards."""
    import sys

    log = logging.getLogger("coremltools")
    level = log.level
    log.setLevel(logging.ERROR)
    hidden = [name for name in UNUSED_BY_COREMLTOOLS if "coremltools" not in sys.modules and name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None
    try:
        import coremltools
    finally:
        log.setLevel(level)
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
    return coremltools


THIRD_PARTY_LOGGERS = ("diffusers", "transformers", "coremltools", "torch", "huggingface_hub", "safetensors")
# Both libraries read these when they set up their loggers (at their first import), overriding a
# level set earlier, so the variables are what keeps them quiet.
VERBOSITY_VARIABLES = ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY")


def quiet_third_party(verbose: int, environ=None) -> None:
    """Without -v, other libraries' warnings stay out of the output: diffusers' "modules that should
    be kept in float32: []" on every cast, transformers' notes about torchvision, torch's and
    coremltools' UserWarnings. coreml-sd's own warnings (a fallback, a dropped LoRA key) still show;
    with -v everything does. A user's own *_VERBOSITY setting wins."""
    import os
    import warnings

    if verbose:
        return
    environ = os.environ if environ is None else environ
    for name in VERBOSITY_VARIABLES:
        environ.setdefault(name, "error")
    environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # Python warnings raised from any module but coreml-sd's own (the regex is matched at the start).
    warnings.filterwarnings("ignore", module=r"(?!coreml_sd|conversion|benchmarks)")
