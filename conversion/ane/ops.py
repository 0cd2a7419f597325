"""The small set of tensor primitives the Neural-Engine modules are written in, twice.

Every module in `conversion.ane` computes through an `ops` argument instead of calling torch
directly. With `TORCH` (the default) a module is an ordinary torch module, tested against
diffusers. With a `MilOps` the very same forward emits a Core ML ML program with coremltools'
MIL builder: weights become fp16 constants that share memory with the torch parameters, and
nothing is traced, so converting a full UNet needs about its fp16 weight size of RAM once.

The primitives mirror MIL ops one to one, so each has a single obvious lowering:

    conv, pad, add, sub, mul, silu, sigmoid, gelu, sin, cos, mean, rsqrt, reshape, transpose,
    concat, slice, split (and `chunks`, how many equal pieces), einsum ("nchw,nwhu->nchu" family only), matmul, softmax,
    upsample2x (nearest), gather, argmax, equal, cast, const
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

_MIL_DTYPES = {torch.float16: "fp16", torch.float32: "fp32", torch.int32: "int32"}


class TorchOps:
    """The primitives on torch tensors (eager)."""

    name = "torch"

    @staticmethod
    def conv(x, weight, bias=None, *, stride: int = 1, padding: int = 0):
        if weight.dtype != x.dtype:  # fp16 weights in an fp32 reference computation
            weight = weight.to(x.dtype)
            bias = None if bias is None else bias.to(x.dtype)
        return F.conv2d(x, weight, bias, stride=stride, padding=padding)

    @staticmethod
    def pad(x, pads: tuple[int, int, int, int]):
        """Zero padding of the last two dims: (left, right, top, bottom)."""
        return F.pad(x, pads)

    @staticmethod
    def add(x, y):
        return x + y

    @staticmethod
    def sub(x, y):
        return x - y

    @staticmethod
    def mul(x, y):
        return x * y

    @staticmethod
    def silu(x):
        return F.silu(x)

    @staticmethod
    def sigmoid(x):
        return torch.sigmoid(x)

    @staticmethod
    def gelu(x):
        return F.gelu(x)  # exact (erf) form, as diffusers' GEGLU and CLIP's "gelu"

    @staticmethod
    def sin(x):
        return torch.sin(x)

    @staticmethod
    def cos(x):
        return torch.cos(x)

    @staticmethod
    def mean(x, axes: Sequence[int]):
        return x.mean(dim=tuple(axes), keepdim=True)

    @staticmethod
    def rsqrt(x, eps: float):
        return torch.rsqrt(x + eps)

    @staticmethod
    def reshape(x, shape: Sequence[int]):
        return x.reshape(tuple(shape))

    @staticmethod
    def transpose(x, perm: Sequence[int]):
        return x.permute(*perm)

    @staticmethod
    def concat(xs, axis: int):
        return torch.cat(list(xs), dim=axis)

    @staticmethod
    def slice(x, axis: int, start: int, stop: int):
        return x.narrow(axis, start, stop - start)

    @staticmethod
    def split(x, parts: int, axis: int):
        return list(x.chunk(parts, dim=axis))

    @staticmethod
    def chunks(length: int, limit: int) -> int:
        return chunk_count(length, limit)

    @staticmethod
    def einsum(equation: str, a, b):
        return torch.einsum(equation, a, b)

    @staticmethod
    def matmul(x, y, *, transpose_x: bool = False, transpose_y: bool = False):
        if transpose_x:
            x = x.transpose(-1, -2)
        if transpose_y:
            y = y.transpose(-1, -2)
        return torch.matmul(x, y)

    @staticmethod
    def softmax(x, axis: int):
        return torch.softmax(x, dim=axis)

    @staticmethod
    def upsample2x(x):
        return F.interpolate(x, scale_factor=2.0, mode="nearest")

    @staticmethod
    def gather(x, indices, axis: int):
        return torch.index_select(x, axis, indices.reshape(-1).long())

    @staticmethod
    def argmax(x, axis: int):
        return torch.argmax(x, dim=axis)

    @staticmethod
    def equal(x, value: float):
        """1 where x == value else 0, in x's dtype."""
        return (x == value).to(x.dtype)

    @staticmethod
    def cast(x, dtype: torch.dtype):
        return x.to(dtype)

    @staticmethod
    def const(value, dtype: torch.dtype, like=None):
        device = like.device if like is not None else "cpu"
        return torch.as_tensor(np.asarray(value), device=device).to(dtype)

    @staticmethod
    def shape(x) -> tuple[int, ...]:
        return tuple(x.shape)

    @staticmethod
    def dtype(x) -> torch.dtype:
        return x.dtype


TORCH = TorchOps()


class MilOps:
    """The primitives emitted as MIL ops with coremltools' builder, inside a `Function` context.

    Parameters of `module` become `const` ops named after the parameter (dots -> underscores),
    created once per parameter and sharing memory with it (fp16 numpy view, no copy).
    """

    name = "mil"

    def __init__(self, module: torch.nn.Module, *, size_bindings: Sequence[Mapping[Any, int]] = ()):
        """`size_bindings`: for a program with flexible input sizes (enumerated shapes), one
        {symbol: size} per enumerated shape, so the few decisions that depend on a size (how to
        chunk attention queries) hold for every size the program will run at."""
        from coremltools.converters.mil import Builder as mb

        self.mb = mb
        self.size_bindings = [dict(b) for b in size_bindings]
        self._shape_sources: dict[tuple, Any] = {}  # a symbolic shape -> a value that has it
        self._names = {id(p): n for n, p in module.named_parameters()}
        self._names.update({id(b): n for n, b in module.named_buffers()})
        self._consts: dict[int, Any] = {}
        self._keep: list[torch.Tensor] = []  # keeps ids stable while the program is built
        self._counter = 0

    def const_names(self) -> dict[str, str]:
        """Weight-constant name -> parameter name, for every parameter (or reshaped view of one)."""
        return {self._consts[id(t)].op.name: name for t in self._keep
                if (name := self._param_name(t)) is not None}

    def _param_name(self, tensor: torch.Tensor) -> str | None:
        """The parameter `tensor` is, or is a same-size view of (e.g. a (C,) scale seen as (1, C, 1, 1))."""
        if id(tensor) in self._names:
            return self._names[id(tensor)]
        base = tensor._base
        if base is not None and id(base) in self._names and base.numel() == tensor.numel():
            return self._names[id(base)]
        return None

    # -- values -------------------------------------------------------------------------------
    def _var(self, value, like=None):
        from coremltools.converters.mil.mil import Var

        if isinstance(value, Var):
            return value
        if isinstance(value, torch.Tensor):
            return self._param(value)
        if isinstance(value, (int, float)) and like is not None:
            return self.mb.const(val=np.array(value, dtype=_np_dtype(like.dtype)))
        raise TypeError(f"cannot use {type(value).__name__} as a MIL value")

    def _param(self, tensor: torch.Tensor):
        key = id(tensor)
        if key not in self._consts:
            name = self._names.get(key)
            if name is None:
                self._counter += 1
                base = self._param_name(tensor)
                name = f"{base}_view{self._counter}" if base else f"const_{self._counter}"
            array = tensor.detach().cpu().numpy()  # a view: fp16/fp32 parameters are not copied
            self._consts[key] = self.mb.const(val=array, name=name.replace(".", "_"))
            self._keep.append(tensor)
        return self._consts[key]

    # -- primitives ---------------------------------------------------------------------------
    def conv(self, x, weight, bias=None, *, stride: int = 1, padding: int = 0):
        kw = dict(x=x, weight=self._var(weight), strides=[stride, stride], pad_type="custom",
                  pad=[padding] * 4)
        if bias is not None:
            kw["bias"] = self._var(bias)
        out = self.mb.conv(**kw)
        k = tuple(weight.shape[2:])
        self._learn(out, x, {axis: lambda n, a=axis: (n + 2 * padding - k[a - 2]) // stride + 1 for axis in (2, 3)})
        return out

    def _learn(self, out, x, sizes: Mapping[int, Any]) -> None:
        """coremltools names a flexible output size of conv/upsample with a fresh symbol; record its
        value at every enumerated size (`sizes`: axis -> f(input size)), so later decisions can use it."""
        for axis, size_of in sizes.items():
            d = out.shape[axis]
            if _is_static(d) or not self.size_bindings or not d.is_Symbol or d in self.size_bindings[0]:
                continue
            for binding in self.size_bindings:
                size = _value(size_of(None if x is None else _value(x.shape[axis], binding)), binding)
                if isinstance(size, int):
                    binding[d] = size

    def _learn_elementwise(self, out, *inputs) -> None:
        """Broadcasting two different symbols of one size gives a fresh symbol: it has their size."""
        def size_at(axis):
            def size(_):
                values = [v for v in (self._input_size(i, axis, out) for i in inputs) if v is not None]
                return max(values, key=lambda v: (not _is_static(v) or v != 1)) if values else None
            return size
        self._learn(out, None, {axis: size_at(axis) for axis in range(len(out.shape))})

    def _input_size(self, value, axis: int, out):
        from coremltools.converters.mil.mil import Var

        if not isinstance(value, Var) or len(value.shape) != len(out.shape):
            return None
        return value.shape[axis]

    def pad(self, x, pads):
        left, right, top, bottom = pads
        return self.mb.pad(x=x, pad=np.array([0, 0] * (len(x.shape) - 2) + [top, bottom, left, right],
                                             dtype=np.int32), mode="constant",
                           constant_val=np.array(0, dtype=_np_dtype(x.dtype)))

    def add(self, x, y):
        out = self.mb.add(x=self._var(x, like=_first_var(x, y)), y=self._var(y, like=_first_var(x, y)))
        self._learn_elementwise(out, x, y)
        return out

    def sub(self, x, y):
        out = self.mb.sub(x=self._var(x, like=_first_var(x, y)), y=self._var(y, like=_first_var(x, y)))
        self._learn_elementwise(out, x, y)
        return out

    def mul(self, x, y):
        out = self.mb.mul(x=self._var(x, like=_first_var(x, y)), y=self._var(y, like=_first_var(x, y)))
        self._learn_elementwise(out, x, y)
        return out

    def silu(self, x):
        return self.mb.silu(x=x)

    def sigmoid(self, x):
        return self.mb.sigmoid(x=x)

    def gelu(self, x):
        return self.mb.gelu(x=x, mode="EXACT")

    def sin(self, x):
        return self.mb.sin(x=x)

    def cos(self, x):
        return self.mb.cos(x=x)

    def mean(self, x, axes):
        return self.mb.reduce_mean(x=x, axes=list(axes), keep_dims=True)

    def rsqrt(self, x, eps: float):
        return self.mb.rsqrt(x=x, epsilon=np.array(eps, dtype=_np_dtype(x.dtype)))

    def reshape(self, x, shape):
        """A shape with flexible (symbolic) sizes: one becomes -1; several must be the shape of a
        value seen by `shape()` (the way back from a merged view), read from it when the program runs."""
        shape = tuple(shape)
        flexible = [i for i, d in enumerate(shape) if not _is_static(d)]
        if not flexible:
            return self.mb.reshape(x=self._var(x), shape=[int(d) for d in shape])
        if len(flexible) == 1:
            out = self.mb.reshape(x=self._var(x), shape=[-1 if i in flexible else int(d) for i, d in enumerate(shape)])
        else:
            source = self._shape_sources.get(shape)
            if source is None:
                raise ValueError(f"reshape to {shape}: more than one flexible size, and no value of that shape to "
                                 "read them from")
            out = self.mb.reshape(x=self._var(x), shape=self.mb.shape(x=source))
        self._learn(out, None, {i: (lambda _, d=shape[i]: d) for i in flexible})
        return out

    def transpose(self, x, perm):
        return self.mb.transpose(x=x, perm=list(perm))

    def concat(self, xs, axis: int):
        xs = list(xs)
        if len(xs) == 1:
            return xs[0]
        out = self.mb.concat(values=xs, axis=axis)
        sizes = {a: (lambda _, a=a: xs[0].shape[a]) for a in range(len(out.shape)) if a != axis}
        sizes[axis] = lambda _: sum(x.shape[axis] for x in xs)
        self._learn(out, None, sizes)
        return out

    def slice(self, x, axis: int, start: int, stop: int):
        x = self._var(x)
        rank = len(x.shape)
        begin, end = [0] * rank, [0] * rank
        begin[axis], end[axis] = start, stop
        whole = [i != axis for i in range(rank)]  # the other axes whole, whatever their (flexible) size
        return self.mb.slice_by_index(x=x, begin=begin, end=end, begin_mask=whole, end_mask=whole)

    def chunks(self, length, limit: int) -> int:
        """Equal pieces of at most `limit` that cut `length`, at every enumerated size (`chunk_count`)."""
        return chunk_count(length, limit, self.size_bindings)

    def split(self, x, parts: int, axis: int):
        return list(self.mb.split(x=x, num_splits=parts, axis=axis))

    def einsum(self, equation: str, a, b):
        return self.mb.einsum(values=(a, b), equation=equation)

    def matmul(self, x, y, *, transpose_x: bool = False, transpose_y: bool = False):
        return self.mb.matmul(x=x, y=y, transpose_x=transpose_x, transpose_y=transpose_y)

    def softmax(self, x, axis: int):
        return self.mb.softmax(x=x, axis=axis)

    def upsample2x(self, x):
        out = self.mb.upsample_nearest_neighbor(x=x, scale_factor_height=2, scale_factor_width=2)
        self._learn(out, x, {2: lambda n: 2 * n, 3: lambda n: 2 * n})
        return out

    def gather(self, x, indices, axis: int):
        indices = self.mb.reshape(x=self.mb.cast(x=indices, dtype="int32"), shape=[-1])
        return self.mb.gather(x=self._var(x), indices=indices, axis=axis)

    def argmax(self, x, axis: int):
        return self.mb.reduce_argmax(x=x, axis=axis, keep_dims=False)

    def equal(self, x, value: float):
        return self.mb.cast(x=self.mb.equal(x=x, y=self._var(float(value), like=x)), dtype=_dtype_name(x.dtype))

    def cast(self, x, dtype: torch.dtype):
        target = _MIL_DTYPES[dtype]
        return x if _dtype_name(x.dtype) == target else self.mb.cast(x=x, dtype=target)

    def const(self, value, dtype: torch.dtype, like=None):
        return self.mb.const(val=np.asarray(value, dtype=_np_dtype_of(dtype)))

    def shape(self, x) -> tuple:
        """Sizes as ints; a flexible size as coremltools' symbol (or expression of symbols)."""
        shape = tuple(int(d) if _is_static(d) else d for d in x.shape)
        if not all(isinstance(d, int) for d in shape):
            self._shape_sources.setdefault(shape, x)
        return shape

    @staticmethod
    def dtype(x) -> torch.dtype:
        return {v: k for k, v in _MIL_DTYPES.items()}[_dtype_name(x.dtype)]


def _is_static(d) -> bool:
    from coremltools.converters.mil.mil.types.symbolic import is_symbolic

    return not is_symbolic(d)


def _value(d, binding: Mapping[Any, int]):
    """`d` at one enumerated size: an int where every symbol in it is known, else an expression."""
    if _is_static(d):
        return int(d)
    d = d.xreplace(binding)
    return int(d) if getattr(d, "is_number", True) else d


def chunk_count(length, limit: int, bindings: Sequence[Mapping[Any, int]] = ()) -> int:
    """How many equal pieces cut `length` into pieces of at most `limit`, for every size it takes.

    `length` is an int, or an expression of size symbols evaluated under each of `bindings`: the
    count must divide every value, so that one program splits evenly at each enumerated size.
    """
    values = [length] if _is_static(length) else [_value(length, b) for b in bindings]
    if not values or not all(_is_static(v) for v in values):
        raise ValueError(f"size {length} is flexible and its value at each enumerated size is not known")
    values = [int(v) for v in values]
    largest = max(values)
    for parts in range(max(1, -(-largest // limit)), largest + 1):
        if all(v % parts == 0 for v in values):
            return parts
    return 1


def _first_var(*values):
    for v in values:
        if not isinstance(v, (int, float, torch.Tensor)):
            return v
    return None


def _dtype_name(mil_type) -> str:
    from coremltools.converters.mil.mil import types

    return types.builtin_to_string(mil_type)


def _np_dtype(mil_type):
    return {"fp16": np.float16, "fp32": np.float32, "int32": np.int32}[_dtype_name(mil_type)]


def _np_dtype_of(dtype: torch.dtype):
    return {torch.float16: np.float16, torch.float32: np.float32, torch.int32: np.int32}[dtype]

