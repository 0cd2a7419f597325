"""Read tensor files without running code from them.

* `.safetensors` never touches pickle: the JSON header is read and checked here (truncation,
  offsets, sizes) and the tensors are views of one private (copy-on-write) memory map of the
  file, so opening a 2 GB file costs page cache, not a copy, and merging a LoRA copies only the
  pages it changes.
* Pickles (`.ckpt`, `.pt`, `.bin`) pass two gates. First every global the pickle stream names is
  listed by reading its opcodes (nothing is executed) and checked against `ALLOWED_GLOBALS`;
  anything else is refused with its name (`posix.system`, `builtins.exec`, ...). Then the file is
  loaded with `torch.load(weights_only=True)`, torch's own restricted unpickler, memory-mapped
  when the file is a zip archive.

Two classes from training frameworks occur in real files as inert metadata (Lightning's
`ModelCheckpoint` callback state in CompVis `.ckpt` files, `ParameterDict` in early textual
inversion embeddings). They are rebuilt as `InertObject`s that only store their state: no code of
theirs runs, and they are never imported.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coreml_sd.checkpoint.pickle_scan import BoundedReader, PickleScan, PickleTooLarge, Storage, scan_one_pickle
from coreml_sd.errors import ModelError, UnsafeFileError
from coreml_sd.paths import os_error_text, require_regular_file

log = logging.getLogger(__name__)

SAFETENSORS = "safetensors"
TORCH_ZIP = "torch-zip"
PICKLE = "pickle"

# Element sizes of safetensors dtypes, for the size check of each entry.
_ST_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                   "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
# The format's own limit (the safetensors library refuses longer headers). A file may also not
# declare more tensors than MAX_TENSORS, nor more JSON members than MAX_HEADER_ITEMS (counted as
# ':' bytes before parsing), so a hostile header is refused in milliseconds instead of building a
# Python object per entry: no SD-family file comes near either.
MAX_HEADER_BYTES = 100_000_000
MAX_TENSORS = 100_000
MAX_HEADER_ITEMS = 2_000_000

_TORCH_STORAGES = ("Float", "Half", "BFloat16", "Double", "Long", "Int", "Short", "Char", "Byte", "Bool",
                   "ComplexFloat", "ComplexDouble", "Untyped")
ALLOWED_GLOBALS = frozenset(
    {"collections.OrderedDict", "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2",
     "torch._utils._rebuild_parameter", "_codecs.encode", "builtins.set", "builtins.frozenset",
     "torch.Size", "numpy.dtype", "numpy.ndarray", "numpy.core.multiarray.scalar",
     "numpy.core.multiarray._reconstruct", "numpy._core.multiarray.scalar",
     "numpy._core.multiarray._reconstruct"}
    | {f"torch.{name}Storage" for name in _TORCH_STORAGES}
    | {f"numpy.dtypes.{n}DType" for n in ("Float16", "Float32", "Float64", "Int32", "Int64", "UInt8", "Bool")}
)
INERT_GLOBALS = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
                 "torch.nn.modules.container.ParameterDict")


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors spelling: F16, F32, BF16, ...
    shape: tuple[int, ...]


class InertObject:
    """Stands in for an allow-listed framework class: keeps the pickled state, runs nothing."""

    pickled_name = ""

    def __setstate__(self, state):
        self.state = state


def _inert_class(full_name: str) -> type:
    module, _, name = full_name.rpartition(".")
    return type(name, (InertObject,), {"pickled_name": full_name, "__module__": module})


_INERT_CLASSES = {name: _inert_class(name) for name in INERT_GLOBALS}


def sniff(path: Path) -> str:
    """The container format of `path` from its first bytes (the extension is not trusted).

    Only a regular file is opened: a FIFO named `.safetensors` would block a reader forever.
    """
    path = Path(path)
    if Path(path).is_dir():
        raise ModelError(f"{path} is a folder; expected a .safetensors, .ckpt or .pt file")
    require_regular_file(path, "a .safetensors, .ckpt or .pt file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {os_error_text(exc)}") from None
    if len(head) < 9:
        raise ModelError(f"{path} is empty or truncated ({len(head)} bytes); expected a tensor file")
    if head[:4] == b"PK\x03\x04":
        return TORCH_ZIP
    if head[0] == 0x80 and head[1] <= 5:  # pickle PROTO opcode
        return PICKLE
    if head[8:9] == b"{":
        return SAFETENSORS
    raise ModelError(
        f"{path} is not a tensor file: expected safetensors (a length and a JSON header), a torch zip "
        f"archive or a pickle; found bytes {head[:8].hex()}"
    )


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Names, dtypes and shapes of a .safetensors file, and its metadata, checked against the file size."""
    entries, metadata, _ = _safetensors_layout(path)
    return {k: TensorInfo(dtype, shape) for k, (dtype, shape, _, _) in entries.items()}, metadata


def _safetensors_layout(path: Path) -> tuple[dict[str, tuple], dict[str, str], int]:
    """(key -> (dtype, shape, start, stop) within the data section, metadata, where the data section starts)."""
    size = require_regular_file(path, "a .safetensors file").st_size
    with open(path, "rb") as fh:
        raw_len = fh.read(8)
        if len(raw_len) < 8:
            raise ModelError(f"{path} is truncated: {size} bytes, no safetensors header")
        (n,) = struct.unpack("<Q", raw_len)
        if n > size - 8:
            raise ModelError(f"{path} is truncated or corrupt: header of {n} bytes in a file of {size} bytes")
        if n > MAX_HEADER_BYTES:
            raise ModelError(f"{path} is not a usable safetensors file: its header is {n / 1e6:.0f} MB; the format "
                             f"allows at most {MAX_HEADER_BYTES / 1e6:.0f} MB (a full SDXL checkpoint needs 0.3 MB)")
        header = _parse_header(path, fh.read(n))
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise ModelError(f"{path} is corrupt: its __metadata__ is a {type(metadata).__name__}, "
                         f"expected a JSON object of strings")
    entries = _check_entries(path, header, size - 8 - n)
    return entries, {str(k): str(v) for k, v in (metadata or {}).items()}, 8 + n


def _parse_header(path: Path, raw: bytes) -> dict:
    """The JSON header, refused before parsing when it declares more tensors than any model has."""
    declared, members = raw.count(b'"data_offsets"'), raw.count(b":")
    if declared > MAX_TENSORS or members > MAX_HEADER_ITEMS:
        found = f"{declared} tensors" if declared > MAX_TENSORS else f"about {members} JSON members"
        raise ModelError(f"{path} is not a usable safetensors file: its header declares {found}; at most "
                         f"{MAX_TENSORS} tensors are accepted (an SDXL checkpoint with EMA weights has about 5,000)")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is corrupt: its safetensors header is not JSON ({exc})") from None
    except RecursionError:
        raise ModelError(f"{path} is corrupt: its safetensors header nests deeper than JSON parsing allows") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path} is corrupt: its safetensors header is not a JSON object")
    return header


def _check_entries(path: Path, header: dict, data_size: int) -> dict[str, tuple]:
    entries = {key: _check_entry(path, key, entry) for key, entry in header.items()}
    spans = sorted((start, stop, key) for key, (_, _, start, stop) in entries.items() if stop > start)
    for (start_a, stop_a, key_a), (start_b, stop_b, key_b) in zip(spans, spans[1:]):
        if start_b < stop_a:
            raise ModelError(f"{path} is corrupt: tensors {key_a!r} (bytes {start_a}..{stop_a}) and {key_b!r} "
                             f"(bytes {start_b}..{stop_b}) overlap; each tensor must have its own bytes")
    end = spans[-1][1] if spans else 0
    if end > data_size:
        raise ModelError(f"{path} is truncated: its header describes {end} bytes of tensor data, "
                         f"the file holds {data_size}")
    return entries


def _check_entry(path: Path, key: str, entry) -> tuple:
    """(dtype, shape, start, stop) of one header entry, each part checked."""
    def bad(why: str) -> ModelError:
        return ModelError(f"{path} is corrupt: header entry {key!r} {why}")

    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise bad(f"is not an object with dtype, shape and data_offsets: {str(entry)[:200]}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _ST_DTYPE_BYTES:
        raise bad(f"has dtype {str(dtype)[:40]!r}; supported: {', '.join(_ST_DTYPE_BYTES)}")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < 2**63 for d in shape) or len(shape) > 64:
        raise bad(f"has shape {str(shape)[:200]}; expected a list of at most 64 non-negative integers")
    if math.prod(max(d, 1) for d in shape) >= 2**63:
        raise bad(f"has shape {shape}, whose element count overflows 64 bits even ignoring its zero dimensions")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise bad(f"has data_offsets {str(offsets)[:100]}; expected [start, stop], two integers")
    start, stop = offsets
    if start < 0 or stop < start:
        raise bad(f"has data_offsets [{start}, {stop}]; offsets count bytes from the start of the data section, "
                  f"so they must satisfy 0 <= start <= stop")
    expected = math.prod(shape) * _ST_DTYPE_BYTES[dtype]
    if stop - start != expected:
        raise ModelError(f"{path} is corrupt: {key!r} occupies {stop - start} bytes, its shape {shape} of {dtype} "
                         f"needs {expected}")
    return dtype, tuple(shape), start, stop


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_safetensors(path: Path) -> dict[str, Any]:
    """All tensors of a .safetensors file, in their stored dtype, as views of one private memory map.

    Nothing is read until a tensor is used, and writing to a tensor (merging a LoRA) copies only
    the pages it touches (copy-on-write); the file itself is never modified. (The `safetensors`
    library's loader touches part of every tensor's pages while opening, about a quarter of an
    SD 1.5 file, which is why the mapping is done here.)
    """
    import mmap

    import torch

    entries, _, data_start = _safetensors_layout(path)
    if not entries:
        return {}
    with open(path, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    whole = torch.frombuffer(mapped, dtype=torch.uint8)  # (file bytes,) sharing the mapping
    out = {}
    for key, (dtype, shape, start, stop) in entries.items():
        torch_dtype = _torch_dtype(dtype, path)
        raw = whole[data_start + start: data_start + stop]
        if (data_start + start) % torch_dtype.itemsize:  # not aligned for a view: copy this one tensor
            raw = raw.clone()
        out[key] = raw.view(torch_dtype).reshape(shape) if stop > start else torch.empty(shape, dtype=torch_dtype)
    return out


def _torch_dtype(name: str, path: Path):
    import torch

    table = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
             "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64}
    if name not in table:
        raise ModelError(f"{path}: tensor dtype {name} is not supported; supported: {', '.join(table)}")
    return table[name]


def scan_pickles(stream: io.BufferedIOBase, *, max_pickles: int = 6, required: int = 5) -> PickleScan:
    """The globals and declared storages of a pickle stream (or a run of pickles), without executing it.

    The first `required` pickles must be well formed (a legacy torch file has five: magic number,
    protocol, system info, the object, the storage keys; then raw storage bytes follow, which may
    or may not look like a pickle). A STACK_GLOBAL whose operands are not plain strings is reported
    as `<unresolved global>`.
    """
    found = PickleScan([], [])
    for index in range(max_pickles):
        start = stream.tell()
        if not stream.read(1):
            break
        stream.seek(start)
        try:
            one = scan_one_pickle(stream)
        except PickleTooLarge as exc:
            raise ModelError(f"not a checkpoint pickle: {exc}") from None
        except Exception:  # noqa: BLE001 - pickletools raises many kinds on non-pickle data
            if index < max(required, 1):
                raise ModelError(f"not a pickle stream (corrupt or truncated in pickle {index + 1})") from None
            break  # a legacy torch file continues with raw storage bytes after its pickles
        found.globals.extend(one.globals)
        found.storages.extend(one.storages)
    return found


def pickle_globals(stream: io.BufferedIOBase, *, max_pickles: int = 6) -> list[str]:
    """Every `module.name` a pickle stream (or a run of pickles) would import, without executing it."""
    return scan_pickles(stream, max_pickles=max_pickles, required=1).globals


def _scan_zip(path: Path) -> PickleScan:
    """Scan a torch zip's pickle(s); each declared storage must fit in its `data/<key>` record."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith(".pkl")]
            if not names:
                raise ModelError(f"{path} is a zip archive without a pickle (data.pkl): not a torch file")
            found = PickleScan([], [])
            for name in names:
                with zf.open(name) as member:
                    one = scan_pickles(BoundedReader(member, zf.getinfo(name).file_size), max_pickles=1,
                                       required=1)
                found.globals.extend(one.globals)
                found.storages.extend(one.storages)
                _check_zip_storages(path, zf, name.rpartition("/")[0], one.storages)
            return found
    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile, NotImplementedError, ValueError, struct.error,
            OSError, KeyError) as exc:  # zipfile's reactions to a damaged directory
        raise ModelError(f"{path} is truncated or corrupt: {_first_line(exc)}") from None


def _check_zip_storages(path: Path, zf: zipfile.ZipFile, prefix: str, storages: list[Storage]) -> None:
    sizes = {info.filename: info.file_size for info in zf.infolist()}
    for st in storages:
        record = f"{prefix}/data/{st.key}" if prefix else f"data/{st.key}"
        if record not in sizes:
            raise ModelError(f"{path} is truncated or corrupt: its pickle refers to storage {record}, which the "
                             f"archive does not hold")
        if not 0 <= st.nbytes <= sizes[record]:
            raise ModelError(f"{path} is corrupt: storage {record} declares {st.nbytes} bytes but holds "
                             f"{sizes[record]}; refused before allocating anything")


def _check_legacy_storages(path: Path, storages: list[Storage]) -> None:
    """Legacy files hold every storage's bytes after the pickles, so together they fit in the file."""
    size = path.stat().st_size
    declared = {}
    for st in storages:
        if st.nbytes < 0:
            raise ModelError(f"{path} is corrupt: storage {st.key} declares {st.numel} elements")
        declared[st.key] = max(st.nbytes, declared.get(st.key, 0))
    total = sum(declared.values())
    if total > size:
        raise ModelError(f"{path} is truncated or corrupt: its storages declare {total} bytes but the file has "
                         f"{size}; refused before allocating anything")


def check_pickle(path: Path) -> list[str]:
    """The globals of a pickled file; raises UnsafeFileError naming any that is not allow-listed, and
    ModelError when its storages declare more bytes than the file holds (torch would allocate them)."""
    path = Path(path)
    kind = sniff(path)
    if kind == TORCH_ZIP:
        found = _scan_zip(path)
    elif kind == PICKLE:
        try:
            with open(path, "rb") as fh:
                found = scan_pickles(BoundedReader(fh, os.fstat(fh.fileno()).st_size))
        except ModelError as exc:
            raise ModelError(f"{path}: {exc}") from None
    else:
        raise ModelError(f"{path} is a safetensors file, not a pickle")
    refused = sorted({g for g in found.globals if g not in ALLOWED_GLOBALS and g not in INERT_GLOBALS})
    if refused:
        raise UnsafeFileError(
            f"refusing to load {path}: it references {', '.join(refused)}; a checkpoint may only hold "
            f"tensors and plain containers, and these globals could run code. Nothing from the file was executed."
        )
    if kind == PICKLE:
        _check_legacy_storages(path, found.storages)
    return found.globals


PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


def check_folder_weights(folder: str | Path) -> list[Path]:
    """Check every pickled weight file under a (diffusers) folder with `check_pickle`; return them.

    transformers and diffusers load `pytorch_model.bin` / `diffusion_pytorch_model.bin` with torch's
    own unpickler, whose refusal ends in advice to turn the safety off; a hostile file is refused
    here first, with this module's message.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file())
    for path in files:
        check_pickle(path)
    return files


def load_pickle(path: Path) -> Any:
    """Unpickle a checked file with torch's weights-only unpickler (memory-mapped when it is a zip)."""
    import pickle

    import torch

    kind = sniff(path)
    check_pickle(path)
    inert = [(cls, name) for name, cls in _INERT_CLASSES.items()]
    try:
        with torch.serialization.safe_globals(inert + _numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=kind == TORCH_ZIP)
    except pickle.UnpicklingError as exc:
        # Every global was allow-listed above, so torch's own refusal means a damaged stream; its message
        # is long and ends in advice to switch the safety off, so only the line naming the problem is kept.
        reason = _torch_refusal(str(exc))
        error = UnsafeFileError if "GLOBAL" in reason else ModelError
        raise error(f"cannot load {path}: torch's restricted unpickler stopped at: {reason}; the file is "
                    f"corrupt or not a checkpoint, and nothing from it was executed") from None
    except Exception as exc:  # noqa: BLE001 - torch raises IndexError, KeyError, TypeError, ... on damaged data
        raise ModelError(f"{path} is truncated or corrupt: {_first_line(exc)}") from None


def _torch_refusal(message: str) -> str:
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    lines = [ln for ln in lines if "weights_only" not in ln and "torch.load" not in ln and "file an issue" not in ln]
    named = [ln for ln in lines if "GLOBAL" in ln or "got <" in ln or "Unsupported" in ln]
    return (named or lines or ["an unreadable opcode"])[0]


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _numpy_globals() -> list:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return []
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    # np.dtype(...) builds an instance of a per-dtype class whose state is then set: allow those classes.
    dtype_classes = [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "uint8", "bool")]
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype,
            *dtype_classes]


def load_tensor_file(path: str | Path) -> tuple[Any, dict[str, str]]:
    """The raw content of a tensor file: (object, safetensors metadata). Pickles return their object."""
    path = Path(path)
    if sniff(path) == SAFETENSORS:
        _, metadata = read_safetensors_header(path)
        return load_safetensors(path), metadata
    return load_pickle(path), {}


def flat_state_dict(obj: Any, path: Path) -> dict[str, Any]:
    """The tensor dict of a loaded checkpoint: unwraps `state_dict` (Lightning/CompVis) and drops non-tensors."""
    import torch

    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def tensor_shapes(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Key -> (dtype, shape) of a checkpoint; without loading any tensor data for safetensors."""
    path = Path(path)
    if sniff(path) == SAFETENSORS:
        return read_safetensors_header(path)
    sd = flat_state_dict(load_pickle(path), path)
    return {k: TensorInfo(torch_dtype_name(v.dtype), tuple(v.shape)) for k, v in sd.items()}, {}


_TORCH_TO_ST = {"float16": "F16", "float32": "F32", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
                "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def torch_dtype_name(dtype) -> str:
    return _TORCH_TO_ST.get(str(dtype).replace("torch.", ""), str(dtype))


# Hashing a 2-7 GB checkpoint takes seconds at every `generate --model FILE`; as AUTOMATIC1111 does,
# the digest of a large file is kept in the cache folder, keyed by its resolved path and the byte
# offset hashed from, and trusted while the file's size and mtime are unchanged.
HASH_CACHE_MIN_BYTES = 64 << 20
HASH_CACHE_FILE = "hashes.json"


def _hash_cache_path() -> Path:
    from coreml_sd.cachedir import cache_root

    return cache_root() / HASH_CACHE_FILE


def _read_hash_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # absent, unreadable or corrupt: hash again


def _remember_hash(key: str, entry: dict[str, Any]) -> None:
    cache = _hash_cache_path()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        data = _read_hash_cache(cache)
        data[key] = entry
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=0, sort_keys=True))
        os.replace(tmp, cache)
    except OSError as exc:  # a read-only home must not stop generation
        log.debug("file hash not cached (%s)", exc)


def sha256_file(path: str | Path, *, chunk: int = 1 << 20, offset: int = 0) -> str:
    """sha256 of the file's bytes from `offset`; remembered for large files (see HASH_CACHE_MIN_BYTES)."""
    import hashlib

    path = Path(path)
    st = path.stat()
    cached = st.st_size >= HASH_CACHE_MIN_BYTES
    key = f"{path.resolve()}@{offset}"
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if cached:
        entry = _read_hash_cache(_hash_cache_path()).get(key)
        if isinstance(entry, dict) and all(entry.get(k) == v for k, v in stamp.items()) \
                and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(offset)
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    if cached:
        _remember_hash(key, {**stamp, "sha256": digest.hexdigest()})
    return digest.hexdigest()


def addnet_hash(path: str | Path) -> str:
    """sha256 of a .safetensors file's tensor data (after the header), as kohya's tools and A1111 hash LoRAs."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
    return sha256_file(path, offset=8 + n)



def own_memory(state: dict[str, Any]) -> dict[str, Any]:
    """Contiguous tensors that each own their storage, as safetensors requires (EMA copies of the same
    module, views such as the VAE's 1x1-conv reshape and pickles with shared storages are cloned)."""
    seen, out = set(), {}
    for key, t in state.items():
        t = t.contiguous()
        storage = t.untyped_storage()
        whole = storage.nbytes() == t.numel() * t.element_size()
        out[key] = t if whole and storage.data_ptr() not in seen else t.clone()
        seen.add(out[key].untyped_storage().data_ptr())
    return out
