"""Engines imported without their import-time chatter (torch-free: the Core ML backend uses it)."""

from __future__ import annotations

import logging


def import_coremltools():
    """coremltools, with its log level raised while it imports: on Linux it warns about the Core ML
    runtime and optional converters it lacks, which coreml-sd already knows and reports itself."""
    log = logging.getLogger("coremltools")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import coremltools
    finally:
        log.setLevel(level)
    return coremltools
