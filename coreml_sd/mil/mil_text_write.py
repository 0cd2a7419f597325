"""Writing an ML program proto as the compiled text (`model.mil`), in Core ML's compiler syntax.

Used to build `.mlmodelc`-shaped folders from packages off-Mac (tests; see `compiled.py`). The
syntax follows what the compiler's output is known to look like (sources in `mil_text_read.py`):

    program(1.0)
    [buildInfo = dict<tensor<string, []>, tensor<string, []>>({{"coremltools-version", "9.0"}})]
    {
        func main<ios16>(tensor<fp16, [2, 4, 8, 8]> sample, tensor<fp16, [2]> timestep) {
                tensor<int32, []> var_5 = const()[name = tensor<string, []>("op_5"), val = tensor<int32, []>(1)];
                tensor<fp16, [32, 4, 3, 3]> w = const()[name = tensor<string, []>("w"), val = tensor<fp16, [32, 4, 3, 3]>(BLOBFILE(path = tensor<string, []>("@model_path/weights/weight.bin"), offset = tensor<uint64, []>(64)))];
                tensor<fp16, [2, 32, 8, 8]> x = conv(..., weight = w, x = sample)[name = tensor<string, []>("x")];
        } -> (x);
    }

Programs for iOS17 and earlier (specification version <= 8) use that style: scalars as rank-0
tensors; from iOS18 (version 9) scalars are written `string("op_5")`, `int32(1)`, `uint64(64)`, the
header is `program(1.3)` and buildInfo is `dict<string, string>` — the switch is what coremltools'
tests assert for iOS16/iOS17 and iOS18 targets compiled on the same macOS. Inputs and attributes
are written sorted by name, as in every compiled line those tests and community files quote.

Known differences from Apple's compiler output: buildInfo names this writer (`coreml-sd-writer`)
instead of the compiler's `coremlc-version`; the compiler may reorder or rewrite ops (not observed
in the sources, not reproduced); immediate tensors of rank > 1 are written as one flat list.
"""

from __future__ import annotations

from coreml_sd.errors import ModelError
from coreml_sd.mil.mil_values import BY_PROTO, OPSET_TEXT, ElementType, format_element, get_elements, quote

FUNC_INDENT, OP_INDENT = " " * 4, " " * 12


def program_text(program, *, specification_version: int, build_info: dict[str, str]) -> str:
    """The text of a MIL.proto `Program` (all its functions)."""
    new_style = specification_version >= 9
    lines = [f"program(1.{3 if new_style else 0})", _build_info_line(build_info, new_style), "{"]
    for name, function in program.functions.items():
        lines.extend(_function_lines(name, function, new_style))
    lines.append("}")
    return "\n".join(lines) + "\n"


def _build_info_line(build_info: dict[str, str], new_style: bool) -> str:
    text_type = "string" if new_style else "tensor<string, []>"
    pairs = ", ".join("{" + f"{quote(k)}, {quote(v)}" + "}" for k, v in build_info.items())
    return f"[buildInfo = dict<{text_type}, {text_type}>({{{pairs}}})]"


def _function_lines(name: str, function, new_style: bool) -> list[str]:
    if function.opset not in OPSET_TEXT:
        raise ModelError(f"function {name!r} has opset {function.opset!r}; known: {', '.join(OPSET_TEXT)}")
    params = ", ".join(f"{type_text(i.type, new_style)} {i.name}" for i in function.inputs)
    block = function.block_specializations[function.opset]
    lines = [f"{FUNC_INDENT}func {name}<{OPSET_TEXT[function.opset]}>({params}) {{"]
    lines.extend(OP_INDENT + operation_text(op, new_style) for op in block.operations)
    lines.append(f"{FUNC_INDENT}}} -> ({', '.join(block.outputs)});")
    return lines


def operation_text(op, new_style: bool) -> str:
    """One statement: `outputs = type(inputs)[attributes];`."""
    if op.blocks:
        raise ModelError(f"op {op.type!r} has nested blocks (control flow), which this writer does not support")
    outputs = ", ".join(f"{type_text(o.type, new_style)} {o.name}" for o in op.outputs)
    inputs = ", ".join(f"{k} = {_argument_text(op.inputs[k], new_style)}" for k in sorted(op.inputs))
    attributes = ", ".join(f"{k} = {value_text(op.attributes[k], new_style)}" for k in sorted(op.attributes))
    return f"{outputs} = {op.type}({inputs})" + (f"[{attributes}]" if attributes else "") + ";"


def _argument_text(argument, new_style: bool) -> str:
    parts = [b.name if b.WhichOneof("binding") == "name" else value_text(b.value, new_style)
             for b in argument.arguments]
    return parts[0] if len(parts) == 1 else "(" + ", ".join(parts) + ")"


def type_text(value_type, new_style: bool) -> str:
    """`tensor<fp16, [1, 4]>`, a scalar (`fp16` or, old style, `tensor<fp16, []>`), `state<...>`."""
    kind = value_type.WhichOneof("type")
    if kind == "stateType":
        return f"state<{type_text(value_type.stateType.wrappedType, new_style)}>"
    if kind == "dictionaryType":
        d = value_type.dictionaryType
        return f"dict<{type_text(d.keyType, new_style)}, {type_text(d.valueType, new_style)}>"
    if kind != "tensorType":
        raise ModelError(f"values of type {kind} cannot be written as compiled text")
    tensor = value_type.tensorType
    name = _element_type(tensor.dataType).name
    if tensor.rank == 0:
        return name if new_style else f"tensor<{name}, []>"
    dims = ", ".join(str(d.constant.size) if d.WhichOneof("dimension") == "constant" else "?"
                     for d in tensor.dimensions)
    return f"tensor<{name}, [{dims}]>"


def value_text(value, new_style: bool) -> str:
    """A literal: `int32(1)`, `tensor<int32, [2]>([1, 1])`, `tensor<fp16, [4]>(BLOBFILE(...))`."""
    type_name = type_text(value.type, new_style)
    kind = value.WhichOneof("value")
    if kind == "blobFileValue":
        blob = value.blobFileValue
        path = _scalar("string", quote(blob.fileName), new_style)
        return f"{type_name}(BLOBFILE(path = {path}, offset = {_scalar('uint64', str(blob.offset), new_style)}))"
    immediate = value.immediateValue
    if immediate.WhichOneof("value") == "dictionary":
        pairs = ", ".join("{" + f"{_bare(p.key)}, {_bare(p.value)}" + "}" for p in immediate.dictionary.values)
        return f"{type_name}({{{pairs}}})"
    if immediate.WhichOneof("value") != "tensor":
        raise ModelError(f"{immediate.WhichOneof('value')} values cannot be written as compiled text")
    return f"{type_name}({_elements_text(value)})"


def _elements_text(value) -> str:
    tensor_type = value.type.tensorType
    etype = _element_type(tensor_type.dataType)
    count = 1
    for d in tensor_type.dimensions:
        count *= d.constant.size
    elements = [format_element(etype, v) for v in get_elements(value.immediateValue.tensor, etype, count)]
    if tensor_type.rank == 0:
        return elements[0]
    return "[" + ", ".join(elements) + "]"


def _bare(value) -> str:
    """A dictionary key or value: the element alone (`"coremltools-version"`)."""
    return _elements_text(value)


def _scalar(type_name: str, literal: str, new_style: bool) -> str:
    return f"{type_name}({literal})" if new_style else f"tensor<{type_name}, []>({literal})"


def _element_type(proto: int) -> ElementType:
    if proto not in BY_PROTO:
        raise ModelError(f"element type {proto} (MIL.proto DataType) cannot be written as compiled text")
    return BY_PROTO[proto]
