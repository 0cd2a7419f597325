"""Read a pickle's opcodes without executing them: the globals it imports and the storages it declares.

The stack is simulated from pickletools' own opcode descriptions (what each opcode pops and
pushes), keeping only the values that matter here: strings, integers, globals and tuples. That is
enough to see every `module.name` the stream would import, and torch's persistent ids
`('storage', torch.FloatStorage, key, location, numel[, view])`, whose declared size torch
allocates before it reads a byte of the data: a 12-byte file can ask for 8 GB. Checking the sizes
against the file first refuses such a file before anything is allocated.
"""

from __future__ import annotations

import _compat_pickle
import pickletools
from dataclasses import dataclass

# An SD checkpoint's pickle memoizes ~20 values per tensor and its stack stays a few levels deep;
# a stream past this many entries is not a checkpoint, and simulating it would only cost memory.
MAX_ENTRIES = 5_000_000
_MARK = object()
_NO_VALUE = None
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_INT_OPS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"}
_MEMO_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_TUPLE_OPS = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
# Bytes per element of torch's typed storages, as pickled by torch.save.
STORAGE_ITEMSIZE = {"Float": 4, "Half": 2, "BFloat16": 2, "Double": 8, "Long": 8, "Int": 4, "Short": 2, "Char": 1,
                    "Byte": 1, "Bool": 1, "ComplexFloat": 8, "ComplexDouble": 16, "Untyped": 1,
                    "Float8_e4m3fn": 1, "Float8_e5m2": 1}


@dataclass(frozen=True)
class Global:
    name: str  # module.name, as the unpickler would import it


@dataclass(frozen=True)
class Storage:
    key: str  # the storage's record name (zip: data/<key>)
    type_name: str  # torch.FloatStorage, ...
    numel: int

    @property
    def nbytes(self) -> int:
        kind = self.type_name.rpartition(".")[2].removesuffix("Storage")
        return self.numel * STORAGE_ITEMSIZE.get(kind, 1)


@dataclass
class PickleScan:
    globals: list[str]
    storages: list[Storage]


def py3_name(module: str, name: str) -> str:
    """The name the unpickler would really import: protocol-2 pickles spell `builtins` as `__builtin__`."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


class _Machine:
    """The pickle stack, holding only the values this scan reads (others are None)."""

    def __init__(self):
        self.stack: list = []
        self.memo: dict = {}
        self.scan = PickleScan([], [])

    def pop(self):
        return self.stack.pop() if self.stack else _NO_VALUE

    def pop_to_mark(self) -> list:
        items = []
        while self.stack:
            item = self.stack.pop()
            if item is _MARK:
                break
            items.append(item)
        return items[::-1]

    def step(self, op, arg) -> None:
        name = op.name
        if name in _MEMO_OPS:
            self.memo[arg] = self.stack[-1] if self.stack else _NO_VALUE
            return
        if name == "MEMOIZE":
            self.memo[len(self.memo)] = self.stack[-1] if self.stack else _NO_VALUE
            return
        before = list(op.stack_before)
        popped = []
        if pickletools.markobject in before:
            popped = self.pop_to_mark()
            before = before[:before.index(pickletools.markobject)]
        below = [self.pop() for _ in before][::-1]
        self.push_results(op, arg, below, popped)

    def push_results(self, op, arg, below: list, popped: list) -> None:
        name = op.name
        if name in ("GLOBAL", "INST"):
            value = Global(py3_name(*str(arg).split(" ", 1)))
            self.scan.globals.append(value.name)
            if name == "INST":
                value = _NO_VALUE
        elif name == "STACK_GLOBAL":
            mod, attr = below
            ok = isinstance(mod, str) and isinstance(attr, str)
            value = Global(py3_name(mod, attr) if ok else "<unresolved global>")
            self.scan.globals.append(value.name)
        elif name == "BINPERSID":
            self._persistent_id(below[0])
            value = _NO_VALUE
        else:
            value = self._plain_value(name, arg, below, popped)
        if name == "DUP":
            self.stack += below * 2
            return
        for kind in op.stack_after:
            self.stack.append(_MARK if kind is pickletools.markobject else value)

    @staticmethod
    def _plain_value(name, arg, below, popped):
        if name in _STRING_OPS or name in _INT_OPS:
            return arg
        if name == "TUPLE":
            return tuple(popped)
        if name in _TUPLE_OPS:
            return tuple(below)
        if name == "EMPTY_TUPLE":
            return ()
        return _NO_VALUE

    def _persistent_id(self, pid) -> None:
        if (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], Global)
                and isinstance(pid[4], int) and not isinstance(pid[4], bool)):
            self.scan.storages.append(Storage(str(pid[2]), pid[1].name, pid[4]))


class BoundedReader:
    """A stream whose reads never ask for more than is left: a pickle declaring a 4 GB string in a 1 KB
    file would otherwise make the reader allocate 4 GB before finding the data short."""

    def __init__(self, stream, size: int):
        self.stream, self.size = stream, size

    def read(self, n: int = -1) -> bytes:
        left = max(0, self.size - self.stream.tell())
        return self.stream.read(left if n is None or n < 0 else min(n, left))

    def readline(self) -> bytes:
        return self.stream.readline(max(0, self.size - self.stream.tell()))

    def tell(self) -> int:
        return self.stream.tell()

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.stream.seek(pos, whence)


class PickleTooLarge(ValueError):
    """The stream holds more stack or memo entries than any checkpoint's pickle does."""


def scan_one_pickle(stream) -> PickleScan:
    """Scan one pickle (up to its STOP) from `stream`; raises whatever pickletools raises on bad data,
    and PickleTooLarge past MAX_ENTRIES stack or memo entries (memory stays bounded on hostile input)."""
    machine = _Machine()
    for op, arg, _pos in pickletools.genops(stream):
        if op.name in _GET_OPS:
            machine.stack.append(machine.memo.get(arg))
        else:
            machine.step(op, arg)
        if len(machine.stack) > MAX_ENTRIES or len(machine.memo) > MAX_ENTRIES:
            raise PickleTooLarge(f"more than {MAX_ENTRIES} values on the pickle stack or memo")
    return machine.scan
