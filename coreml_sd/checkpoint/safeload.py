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

import _compat_pickle
import io
import json
import logging
import math
import os
import pickletools
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coreml_sd.errors import ModelError, UnsafeFileError

log = logging.getLogger(__name__)

SAFETENSORS = "safetensors"
TORCH_ZIP = "torch-zip"
PICKLE = "pickle"

# Element sizes of safetensors dtypes, for the size check of each entry.
_ST_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                   "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER = 100 * 1024 * 1024

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
    """The container format of `path` from its first bytes (the extension is not trusted)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except IsADirectoryError:
        raise ModelError(f"{path} is a folder; expected a .safetensors, .ckpt or .pt file") from None
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror}") from None
    if len(head) < 9:
        raise ModelError(f"{path} is empty or truncated ({len(head)} bytes); expected a tensor file")
    if head[:4] == b"PK\x03\x04":
        return TORCH_ZIP
    if head[0] == 0x80 and head[1] <= 5:  # pickle PROTO opcode
        return PICKLE
    (header_len,) = struct.unpack("<Q", head[:8])
    if head[8:9] == b"{" and header_len < _MAX_HEADER:
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
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        raw_len = fh.read(8)
        if len(raw_len) < 8:
            raise ModelError(f"{path} is truncated: {size} bytes, no safetensors header")
        (n,) = struct.unpack("<Q", raw_len)
        if n > min(size - 8, _MAX_HEADER):
            raise ModelError(f"{path} is truncated or corrupt: header of {n} bytes in a file of {size} bytes")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelError(f"{path} is corrupt: its safetensors header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path} is corrupt: its safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    entries = _check_entries(path, header, size - 8 - n)
    return entries, {str(k): str(v) for k, v in metadata.items()}, 8 + n


def _check_entries(path: Path, header: dict, data_size: int) -> dict[str, tuple]:
    entries, end = {}, 0
    for key, entry in header.items():
        try:
            dtype, shape, (start, stop) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
            start, stop = int(start), int(stop)
            expected = math.prod(shape) * _ST_DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{path} is corrupt: bad header entry for {key!r}: {entry!r}") from None
        if stop - start != expected or start < 0:
            raise ModelError(f"{path} is corrupt: {key!r} occupies {stop - start} bytes, its shape needs {expected}")
        entries[key] = (dtype, shape, start, stop)
        end = max(end, stop)
    if end > data_size:
        raise ModelError(f"{path} is truncated: its header describes {end} bytes of tensor data, "
                         f"the file holds {data_size}")
    return entries


def load_safetensors(path: Path) -> dict[str, Any]:
    """All tensors of a .safetensors file, in their stored dtype, as views of private memory maps.

    Nothing is read until a tensor is used, and writing to a tensor (merging a LoRA) copies only
    the pages it touches (copy-on-write); the file itself is never modified. (The `safetensors`
    library's loader touches part of every tensor's pages while opening, about a quarter of an
    SD 1.5 file, which is why the mapping is done here.) Each tensor has its own mapping, so the
    pages of tensors that are freed (a text encoder once converted) leave memory with them: with
    one mapping for the file, every page once read stays resident until the last tensor goes,
    6.9 GB of an SDXL file while only its 5.1 GB UNet is still in use.
    """
    import mmap

    import torch

    entries, _, data_start = _safetensors_layout(path)
    out = {}
    with open(path, "rb") as fh:
        for key, (dtype, shape, start, stop) in entries.items():
            torch_dtype = _torch_dtype(dtype, path)
            if stop == start:
                out[key] = torch.empty(shape, dtype=torch_dtype)
                continue
            first = data_start + start
            base = first - first % mmap.ALLOCATIONGRANULARITY  # mappings start on a page boundary
            mapped = mmap.mmap(fh.fileno(), data_start + stop - base, access=mmap.ACCESS_COPY, offset=base)
            raw = torch.frombuffer(mapped, dtype=torch.uint8)[first - base:]  # keeps `mapped` alive
            if first % torch_dtype.itemsize:  # not aligned for a view: copy this one tensor
                raw = raw.clone()
            out[key] = raw.view(torch_dtype).reshape(shape)
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


def pickle_globals(stream: io.BufferedIOBase, *, max_pickles: int = 6) -> list[str]:
    """Every `module.name` a pickle stream (or a run of pickles) would import, without executing it.

    A STACK_GLOBAL whose operands are not plain strings is reported as `<unresolved global>`.
    """
    found: list[str] = []
    for index in range(max_pickles):
        start = stream.tell()
        if not stream.read(1):
            break
        stream.seek(start)
        try:
            found.extend(_globals_of_one_pickle(stream))
        except Exception:  # noqa: BLE001 - pickletools raises many kinds on non-pickle data
            if index == 0:
                raise ModelError("not a pickle stream (corrupt or truncated)") from None
            break  # a legacy torch file continues with raw storage bytes after its pickles
    return found


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_MEMO_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_NO_PUSH_OPS = {"PROTO", "FRAME", "STOP", "MEMOIZE", "POP", "POP_MARK"} | _MEMO_OPS


def _globals_of_one_pickle(stream) -> list[str]:
    found, stack, memo = [], [], {}
    for op, arg, _pos in pickletools.genops(stream):
        name = op.name
        if name in ("GLOBAL", "INST"):
            found.append(_py3_name(*str(arg).split(" ", 1)))
        elif name == "STACK_GLOBAL":
            mod, attr = (stack[-2], stack[-1]) if len(stack) >= 2 else (None, None)
            ok = isinstance(mod, str) and isinstance(attr, str)
            found.append(_py3_name(mod, attr) if ok else "<unresolved global>")
            stack[-2:] = [None]
        elif name in _STRING_OPS:
            stack.append(arg)
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1] if stack else None
        elif name in _MEMO_OPS:
            memo[arg] = stack[-1] if stack else None
        elif name in _GET_OPS:
            stack.append(memo.get(arg))
        elif name not in _NO_PUSH_OPS:
            stack.append(None)
    return found


def _py3_name(module: str, name: str) -> str:
    """The name the unpickler would really import: protocol-2 pickles spell `builtins` as `__builtin__`."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def _zip_pickle_globals(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith(".pkl")]
            if not names:
                raise ModelError(f"{path} is a zip archive without a pickle (data.pkl): not a torch file")
            found = []
            for name in names:
                with zf.open(name) as member:
                    found.extend(pickle_globals(io.BufferedReader(member), max_pickles=1))
            return found
    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as exc:
        raise ModelError(f"{path} is truncated or corrupt: {exc}") from None


def check_pickle(path: Path) -> list[str]:
    """The globals of a pickled file; raises UnsafeFileError naming any that is not allow-listed."""
    kind = sniff(path)
    if kind == TORCH_ZIP:
        found = _zip_pickle_globals(path)
    elif kind == PICKLE:
        try:
            with open(path, "rb") as fh:
                found = pickle_globals(fh)
        except ModelError as exc:
            raise ModelError(f"{path}: {exc}") from None
    else:
        raise ModelError(f"{path} is a safetensors file, not a pickle")
    refused = sorted({g for g in found if g not in ALLOWED_GLOBALS and g not in INERT_GLOBALS})
    if refused:
        raise UnsafeFileError(
            f"refusing to load {path}: it references {', '.join(refused)}; a checkpoint may only hold "
            f"tensors and plain containers, and these globals could run code. Nothing from the file was executed."
        )
    return found


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
        # torch's message is long; keep the line that names what it refused.
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        named = [ln for ln in lines if "GLOBAL" in ln or "got <" in ln or "Unsupported" in ln] or lines[-1:]
        raise UnsafeFileError(f"refusing to load {path}: {named[0]}; nothing from the file was executed") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as exc:
        raise ModelError(f"{path} is truncated or corrupt: {str(exc).splitlines()[0]}") from None


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
