"""Checking MIL blob storage files (`weight.bin`) before coremltools' reader maps them.

The format (coremltools `mlmodel/src/MILBlob/Blob/StorageFormat.hpp`, `BlobDataType.hpp`): a 64-byte
`storage_header` (uint32 count, uint32 version = 2, reserved), then per blob a 64-byte
`blob_metadata` (uint32 sentinel 0xDEADBEEF, uint32 data type, uint64 size in bytes, uint64 offset
of the data in the file, uint64 padding in bits, reserved) followed by the data, each entry 64-byte
aligned. A program refers to a blob by the offset of its metadata (`BLOBFILE(..., offset = 64)`).
Packages (`Data/com.apple.CoreML/weights/weight.bin`) and compiled models (`weights/weight.bin`)
use the same format; coremltools' tests show the compiler keeps the offsets (first blob 64, the
next after 64 + 64 + data rounded up to 64).

coremltools' `BlobReader` reports a short file only as "index out of bounds"; checking each
referenced blob here first turns that, a wrong offset or a type mismatch into a `ModelError` that
names the weight file and the program line or op that reads it.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from coreml_sd.errors import ModelError

HEADER_BYTES = METADATA_BYTES = 64
SENTINEL = 0xDEADBEEF
STORAGE_VERSION = 2
# BlobDataType -> MIL element type name
BLOB_TYPES = {1: "fp16", 2: "fp32", 3: "uint8", 4: "int8", 5: "bf16", 6: "int16", 7: "uint16", 8: "int4",
              9: "uint1", 10: "uint2", 11: "uint4", 12: "uint3", 13: "uint6", 14: "int32", 15: "uint32",
              16: "fp8e4m3fn", 17: "fp8e5m2"}
BITS = {"fp16": 16, "fp32": 32, "uint8": 8, "int8": 8, "bf16": 16, "int16": 16, "uint16": 16, "int4": 4,
        "uint1": 1, "uint2": 2, "uint4": 4, "uint3": 3, "uint6": 6, "int32": 32, "uint32": 32}


@dataclass(frozen=True)
class BlobRef:
    """One weight the program reads: file, metadata offset, element type, element count, who reads it."""

    file: Path
    offset: int
    dtype: str
    count: int | None  # None when the shape is not fully known
    where: str  # "model.mil line 12", "op 'conv_0_weight'"


def check_blobs(refs, *, model: Path) -> None:
    """Raise ModelError unless every referenced blob is present, whole and of the type read."""
    by_file: dict[Path, list[BlobRef]] = defaultdict(list)
    for ref in refs:
        by_file[ref.file].append(ref)
    for file, file_refs in by_file.items():
        if not file.is_file():
            raise ModelError(f"{model}: weight file {file} is missing (read by {file_refs[0].where})")
        with open(file, "rb") as fh:
            size = fh.seek(0, 2)
            _check_header(fh, file, size)
            for ref in sorted(file_refs, key=lambda r: r.offset):
                _check_blob(fh, ref, size, model)


def _check_header(fh, file: Path, size: int) -> None:
    if size < HEADER_BYTES:
        raise ModelError(f"weight file {file} is truncated: {size} bytes, shorter than its {HEADER_BYTES}-byte header")
    fh.seek(0)
    _, version = struct.unpack("<II", fh.read(8))
    if version != STORAGE_VERSION:
        raise ModelError(f"weight file {file} is not MIL blob storage: header version {version}, "
                         f"expected {STORAGE_VERSION}")


def _check_blob(fh, ref: BlobRef, size: int, model: Path) -> None:
    if ref.offset + METADATA_BYTES > size:
        raise ModelError(f"{model}: weight file {ref.file} is truncated: {size} bytes, but {ref.where} reads "
                         f"a weight at offset {ref.offset}")
    fh.seek(ref.offset)
    sentinel, blob_type, nbytes, data_offset = struct.unpack("<IIQQ", fh.read(24))
    if sentinel != SENTINEL:
        raise ModelError(f"{model}: {ref.where} reads a weight at offset {ref.offset} of {ref.file}, but no blob "
                         f"starts there (expected the marker 0x{SENTINEL:X}, found 0x{sentinel:X})")
    if data_offset + nbytes > size:
        raise ModelError(f"{model}: weight file {ref.file} is truncated: {size} bytes, but the weight read by "
                         f"{ref.where} spans bytes {data_offset}..{data_offset + nbytes}")
    stored = BLOB_TYPES.get(blob_type, f"type {blob_type}")
    if ref.dtype in BITS and stored in BITS and stored != ref.dtype:
        raise ModelError(f"{model}: {ref.where} reads {ref.dtype} values at offset {ref.offset} of {ref.file}, "
                         f"which holds {stored} values")
    if ref.count is not None and ref.dtype in BITS and nbytes * 8 < ref.count * BITS[ref.dtype]:
        raise ModelError(f"{model}: {ref.where} reads {ref.count} {ref.dtype} values at offset {ref.offset} of "
                         f"{ref.file}, which holds only {nbytes} bytes")
