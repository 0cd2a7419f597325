"""Memory facts of this process: handing freed memory back to the OS, and peak resident memory."""

from __future__ import annotations

import resource
import sys


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS.

    glibc keeps freed blocks below its (adaptive, up to 32 MiB) mmap threshold in the heap, so a
    dropped model's weights would still count in RSS while the next one loads; malloc_trim returns
    them. Elsewhere (macOS) the allocator returns large blocks by itself.
    """
    import ctypes
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
            pass


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 2**20


def mmap_large_allocations() -> None:
    """Serve allocations over 1 MiB from their own mappings, returned to the OS when freed.

    glibc raises its mmap threshold to the size of each mapped block freed (up to 32 MiB), after
    which activations of a few to 32 MiB come from the heap and stay resident when freed: the mil
    executor's SD 1.5 UNet step then grew the process by ~270 MiB over its weights, against ~50
    MiB with a fixed threshold, at the same speed (benchmarks/README.md). Elsewhere: nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):  # not glibc
        pass


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
