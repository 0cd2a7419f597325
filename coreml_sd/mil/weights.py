"""Weights read straight from a package's `weight.bin`, memory-mapped instead of copied.

coremltools' proto loader reads each blob through its BlobReader and then copies it twice more
(`tobytes`, `astype`): a 1.7 GB SD 1.5 UNet passes through ~5 GB of copies and stays resident as
numpy arrays the process owns. Here, while a program loads (`mapped_weights`), every blob of a
plain element type (fp16, fp32, 8/16/32-bit integers) becomes a read-only numpy view of one
shared `mmap` of its file instead: no copy, and its pages belong to the page cache, shared with
every other process reading the same package. Sub-byte types (palettized indices) still go
through coremltools' reader, which unpacks them.

The executor keeps views where it runs in the file's dtype (exact mode: fp16 weights stay fp16)
and converts them where it does not (fast mode on a CPU: bf16); `trim_mapped()` then hands the
file pages already converted back to the OS (`MADV_DONTNEED`: clean pages, re-read from the page
cache if touched again), so the process never holds both copies of all its weights.

The blob format is in `blobfile.py` (which checked every referenced blob before this runs).
"""

from __future__ import annotations

import contextlib
import mmap
import struct
import weakref
from pathlib import Path
from typing import Iterator

import numpy as np

# blob element types read as views (coremltools' builtin type name -> numpy dtype, little-endian)
_VIEW_DTYPES = {"fp16": np.float16, "fp32": np.float32, "int8": np.int8, "uint8": np.uint8,
                "int16": np.int16, "uint16": np.uint16, "int32": np.int32, "uint32": np.uint32}

class _Map(mmap.mmap):
    """An mmap that can be weakly referenced: the numpy views keep it alive, nothing else."""


_LIVE: "weakref.WeakSet[_Map]" = weakref.WeakSet()


class _MappedFile:
    """One weight file mapped read-only."""

    def __init__(self, path: Path):
        with open(path, "rb") as fh:
            self.map = _Map(fh.fileno(), 0, access=mmap.ACCESS_READ)
        self.path = path
        _LIVE.add(self.map)

    def view(self, offset: int, dtype, shape: tuple) -> np.ndarray:
        """The blob whose metadata is at `offset`, as an array of `shape` (a view of the mapping)."""
        _, _, nbytes, data_offset = struct.unpack_from("<IIQQ", self.map, offset)
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if count * np.dtype(dtype).itemsize > nbytes:  # blobfile.check_blobs reports this first
            raise ValueError(f"{self.path}: blob at {offset} holds {nbytes} bytes, fewer than {count} values")
        array = np.frombuffer(self.map, dtype=dtype, count=count, offset=data_offset)
        return array.reshape(shape)



def trim_mapped() -> None:
    """Drop the resident pages of every mapped weight file (they stay valid; see the module docstring)."""
    if not hasattr(mmap, "MADV_DONTNEED"):  # not on every OS; then the page cache decides
        return
    for mapped in list(_LIVE):
        if not mapped.closed:
            mapped.madvise(mmap.MADV_DONTNEED)


@contextlib.contextmanager
def mapped_weights(weights_dir: Path) -> Iterator[None]:
    """While active, coremltools' proto loader reads plain-typed blobs of `weights_dir` as views."""
    from coremltools.converters.mil.frontend.milproto import load as milproto
    from coremltools.converters.mil.mil import types

    files: dict[str, _MappedFile] = {}
    original = milproto._load_value

    def load_value(context, value_spec):
        view = _maybe_view(value_spec, weights_dir, files, milproto, types)
        return original(context, value_spec) if view is None else view

    milproto._load_value = load_value
    try:
        yield
    finally:
        milproto._load_value = original


def _maybe_view(value_spec, weights_dir: Path, files: dict, milproto, types):
    if value_spec.WhichOneof("value") != "blobFileValue" or value_spec.type.WhichOneof("type") != "tensorType":
        return None
    valuetype = milproto.proto_to_types(value_spec.type)
    if not types.is_tensor(valuetype):
        return None
    dtype = _VIEW_DTYPES.get(types.builtin_to_string(valuetype.get_primitive()))
    shape = tuple(valuetype.get_shape())
    if dtype is None or not all(isinstance(d, (int, np.integer)) for d in shape):
        return None
    blob = value_spec.blobFileValue
    name = blob.fileName.split("/")[-1]
    if name not in files:
        files[name] = _MappedFile(Path(weights_dir) / name)
    return files[name].view(blob.offset, dtype, tuple(int(d) for d in shape))
