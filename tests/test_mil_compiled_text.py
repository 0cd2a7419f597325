"""The compiled text format (`model.mil`): hand-written programs in the syntax Core ML's compiler
is known to emit run on the mil executor, and every kind of bad input names file, line and what
was expected.

The programs here are written in both styles the sources show (iOS16: `program(1.0)`,
`tensor<string, []>("x")` scalars; iOS18: `program(1.3)`, `string("x")`), with the forms
compiled files use: hex floats, a BLOBFILE weight, an inline literal input (`keep_dims =
bool(true)`), a two-output `split`, a tuple input `values = (a, b)`, an op without `[name = ...]`.
Each must compute exactly what the same program built with coremltools' MIL builder computes
(same ops, same constants, same kernels: bitwise equal), and what numpy computes to fp16 rounding.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from helpers_mil import ct, mb

from coreml_sd.compiled_model import is_compiled_model, read_specs
from coreml_sd.errors import ModelError
from coreml_sd.mil import Executor, load_program, program_from_function
from coreml_sd.mil.mil_values import ELEMENT_TYPES, format_float, parse_float
from coreml_sd.mil.registry import UnsupportedOpError

W = np.random.default_rng(3).standard_normal((6, 4, 1, 1)).astype(np.float16)
X = np.random.default_rng(4).standard_normal((1, 4, 2, 2)).astype(np.float32)
SCALE = 0.75  # written 0x1.8p-1


def _lines(new_style: bool) -> list[str]:
    """The test program, one list entry per line, in the iOS18 or the iOS16 style."""
    def scalar(kind: str, literal: str) -> str:
        return f"{kind}({literal})" if new_style else f"tensor<{kind}, []>({literal})"

    def scalar_type(kind: str) -> str:
        return kind if new_style else f"tensor<{kind}, []>"

    def named(op: str) -> str:
        return "[name = " + scalar("string", '"' + op + '"') + "]"

    def const(kind: str, name: str, value: str) -> str:
        return f"        {kind} {name} = const()" + named(name)[:-1] + f", val = {value}];"

    path = scalar("string", '"@model_path/weights/weight.bin"')
    info = "dict<string, string>" if new_style else "dict<tensor<string, []>, tensor<string, []>>"
    return [
        f"program(1.{3 if new_style else 0})",
        f'[buildInfo = {info}({{{{"coremlc-component-MIL", "test"}}, {{"coremlc-version", "test"}}}})]',
        "{",
        f"    func main<{'ios18' if new_style else 'ios16'}>(tensor<fp32, [1, 4, 2, 2]> x) {{",
        const(scalar_type("string"), "to16", scalar("string", '"fp16"')),
        f"        tensor<fp16, [1, 4, 2, 2]> x16 = cast(dtype = to16, x = x){named('cast_in')};",
        const("tensor<fp16, [6, 4, 1, 1]>", "w",
              f"tensor<fp16, [6, 4, 1, 1]>(BLOBFILE(path = {path}, offset = {scalar('uint64', '64')}))"),
        const(scalar_type("string"), "pt", scalar("string", '"valid"')),
        const("tensor<int32, [2]>", "st", "tensor<int32, [2]>([1, 1])"),
        const("tensor<int32, [4]>", "pd", "tensor<int32, [4]>([0, 0, 0, 0])"),
        const("tensor<int32, [2]>", "dl", "tensor<int32, [2]>([1, 1])"),
        const(scalar_type("int32"), "gr", scalar("int32", "1")),
        "        tensor<fp16, [1, 6, 2, 2]> y = conv(dilations = dl, groups = gr, pad = pd, pad_type = pt, "
        f"strides = st, weight = w, x = x16){named('conv')};",
        const(scalar_type("int32"), "ax", scalar("int32", "1")),
        "        (tensor<fp16, [1, 3, 2, 2]> a, tensor<fp16, [1, 3, 2, 2]> b) = split(axis = ax, "
        f"num_splits = {scalar('int32', '2')}, x = y){named('split')};",
        const(scalar_type("fp16"), "k", scalar("fp16", "0x1.8p-1")),
        "        tensor<fp16, [1, 3, 2, 2]> bs = mul(x = b, y = k);  // an op without [name = ...]",
        const(scalar_type("bool"), "f", scalar("bool", "false")),
        f"        tensor<fp16, [1, 6, 2, 2]> c = concat(axis = ax, interleave = f, values = (bs, a)){named('concat')};",
        const("tensor<int32, [2]>", "axes", "tensor<int32, [2]>([2, 3])"),
        "        tensor<fp16, [1, 6, 1, 1]> m = reduce_mean(axes = axes, keep_dims = "
        f"{scalar('bool', 'true')}, x = c){named('mean')};",
        const(scalar_type("string"), "to32", scalar("string", '"fp32"')),
        f"        tensor<fp32, [1, 6, 1, 1]> out = cast(dtype = to32, x = m){named('cast_out')};",
        "    } -> (out);",
        "}",
    ]


def _line_of(lines: list[str], needle: str) -> int:
    return next(i for i, line in enumerate(lines, 1) if needle in line)


def _write_folder(path, lines: list[str], *, metadata: bool = True):
    from coremltools.libmilstoragepython import _BlobStorageWriter

    (path / "weights").mkdir(parents=True)
    writer = _BlobStorageWriter(str(path / "weights" / "weight.bin"))
    assert writer.write_fp16_data(W.reshape(-1).view(np.uint16)) == 64
    del writer  # flushes and closes the file
    (path / "model.mil").write_text("\n".join(lines) + "\n")
    if metadata:
        feature = {"name": "x", "type": "MultiArray", "dataType": "Float32", "shape": "[1, 4, 2, 2]"}
        out = {"name": "out", "type": "MultiArray", "dataType": "Float32", "shape": "[1, 6, 1, 1]"}
        (path / "metadata.json").write_text(json.dumps([{"inputSchema": [feature], "outputSchema": [out],
                                                          "specificationVersion": 7}]))
    return path


@pytest.fixture(params=[False, True], ids=["ios16_style", "ios18_style"])
def folder(request, tmp_path):
    lines = _lines(request.param)
    return _write_folder(tmp_path / "Tiny.mlmodelc", lines), lines


def _builder_program(opset):
    @mb.program(input_specs=[mb.TensorSpec((1, 4, 2, 2))], opset_version=opset)
    def prog(x):
        y = mb.conv(x=mb.cast(x=x, dtype="fp16"), weight=W, pad_type="valid", strides=[1, 1], pad=[0, 0, 0, 0],
                    dilations=[1, 1], groups=1)
        a, b = mb.split(x=y, axis=1, num_splits=2)
        c = mb.concat(values=[mb.mul(x=b, y=np.float16(SCALE)), a], axis=1, interleave=False)
        return mb.cast(x=mb.reduce_mean(x=c, axes=[2, 3], keep_dims=True), dtype="fp32", name="out")

    return program_from_function(prog.functions["main"])


def test_hand_written_text_computes_what_the_builder_program_computes(folder):
    path, lines = folder
    new_style = lines[0] == "program(1.3)"
    assert is_compiled_model(path)
    program = load_program(path)
    assert program.specification_version == 7 + 2 * new_style  # metadata says 7; the ios18 opset needs 9
    assert [(s.name, s.shape, s.dtype) for s in program.inputs] == [("x", (1, 4, 2, 2), "fp32")]
    got = Executor(program, precision_mode="exact")({"x": X})["out"]
    builder = _builder_program(ct.target.iOS18 if new_style else ct.target.iOS16)
    # the same program built another way: equal to an fp16 ulp (exact mode rounds every op to fp16)
    torch.testing.assert_close(got, Executor(builder, precision_mode="exact")({"x": X})["out"], rtol=2**-10, atol=0)
    # and numpy, to the fp16 rounding of each op (values are O(1): 2^-11 relative per op, 6 ops)
    y = np.einsum("oi,bihw->bohw", W[:, :, 0, 0].astype(np.float64), X.astype(np.float16).astype(np.float64))
    ref = np.concatenate([SCALE * y[:, 3:], y[:, :3]], axis=1).mean(axis=(2, 3), keepdims=True)
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=6e-3)


def test_metadata_schema_is_read_without_an_engine(folder):
    inputs, outputs = read_specs(folder[0])
    assert [(s.name, s.shape, s.dtype) for s in inputs] == [("x", (1, 4, 2, 2), "fp32")]
    assert [(s.name, s.shape, s.dtype) for s in outputs] == [("out", (1, 6, 1, 1), "fp32")]


def test_without_metadata_the_program_signature_is_used(tmp_path):
    path = _write_folder(tmp_path / "NoMeta.mlmodelc", _lines(True), metadata=False)
    program = load_program(path)
    assert program.specification_version == 9 and [s.name for s in program.outputs] == ["out"]
    with pytest.raises(ModelError, match="metadata.json is missing"):
        read_specs(path)


# -- errors -----------------------------------------------------------------------------------------
def _broken(tmp_path, edit, new_style: bool = True):
    lines = _lines(new_style)
    edit(lines)
    return _write_folder(tmp_path / "Bad.mlmodelc", lines), lines


def _replace(needle: str, old: str, new: str):
    def edit(lines):
        index = _line_of(lines, needle) - 1
        lines[index] = lines[index].replace(old, new)

    return edit


@pytest.mark.parametrize("needle, old, new, at, message", [
    ("= mul(", ");", ")", "bool f = const", "expected ';' ending the op, found 'bool'"),
    ("= mul(", "y = k)", "y = k) $", "$", "unexpected character '$'"),
    ("= mul(", "x = b", "x = zz", "zz", "'zz' is not defined here (expected a function input or an earlier op's output)"),
    ('"st"', "([1, 1])", "([1, 1, 1])", "[1, 1, 1]", "expected 2 value(s) for a int32 tensor of shape [2], found 3"),
    ('"st"', "tensor<int32, [2]> st", "tensor<int12, [2]> st", "int12",
     "unknown element type 'int12'; known: bool, string, fp16"),
    ("func main", "ios18", "ios99", "ios99", "unknown opset 'ios99'; known: ios15, ios16, ios17, ios18"),
    ('"k"', "0x1.8p-1", "zero", "zero", "expected a number (hex float such as 0x1.8p+1, decimal, inf or nan), "
                                        "found 'zero'"),
    ('"gr"', "int32(1)", "int32(3000000000)", "3000000000", "3000000000 does not fit in int32"),
    ("= split(", "split(axis = ax", "split(axis = ax, axis = ax", "axis = ax, axis", "input 'axis' is given twice"),
    ("= cast(dtype = to32", "> out =", "> m =", "cast(dtype = to32", "'m' is defined twice"),
], ids=["missing_semicolon", "bad_character", "undefined_var", "value_count", "element_type", "opset", "float",
        "int_range", "duplicate_input", "duplicate_output"])
def test_syntax_errors_name_file_line_and_what_was_expected(tmp_path, needle, old, new, at, message):
    path, lines = _broken(tmp_path, _replace(needle, old, new))
    with pytest.raises(ModelError, match=rf"Bad\.mlmodelc/model\.mil:{_line_of(lines, at)}:\d+: {re.escape(message)}"):
        load_program(path)


def test_unknown_op_names_the_line_and_the_supported_ops(tmp_path):
    path, lines = _broken(tmp_path, _replace("= mul(", "mul(", "frobnicate("))
    with pytest.raises(UnsupportedOpError, match=rf"model\.mil:{_line_of(lines, 'frobnicate')}: unknown op type "
                                                 r"'frobnicate' \(computing 'bs'\): not a MIL op; op types the mil "
                                                 r"executor runs: const, .*conv"):
        load_program(path)


def test_nested_blocks_are_refused_clearly(tmp_path):
    path, lines = _broken(tmp_path, _replace("= mul(", "(x = b, y = k);", "(x = b, y = k) { };"))
    with pytest.raises(ModelError, match=rf"model\.mil:{_line_of(lines, '{ }')}:\d+: expected ';' \(nested blocks of "
                                         r"control-flow ops are not supported\)"):
        load_program(path)


def test_truncated_weight_file_names_the_line_that_reads_it(tmp_path):
    path, lines = _broken(tmp_path, lambda lines: None)
    weights = path / "weights" / "weight.bin"
    weights.write_bytes(weights.read_bytes()[:150])  # header and blob metadata, half the data
    with pytest.raises(ModelError, match=rf"weight file .*weight\.bin is truncated: 150 bytes, but the weight read "
                                         rf"by model\.mil line {_line_of(lines, 'BLOBFILE')} spans bytes 128\.\.176"):
        load_program(path)
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(ModelError, match="is truncated: 40 bytes, shorter than its 64-byte header"):
        load_program(path)


def test_missing_files(tmp_path):
    path, lines = _broken(tmp_path, lambda lines: None)
    (path / "weights" / "weight.bin").unlink()
    with pytest.raises(ModelError, match=rf"weight file .*weight\.bin is missing \(read by model\.mil line "
                                         rf"{_line_of(lines, 'BLOBFILE')}\)"):
        load_program(path)
    (path / "model.mil").unlink()
    with pytest.raises(ModelError, match="model.mil is missing; only compiled ML programs can be executed"):
        load_program(path)
    (tmp_path / "Empty.mlmodelc").mkdir()
    assert is_compiled_model(tmp_path / "Empty.mlmodelc")
    with pytest.raises(ModelError, match="model.mil is missing"):
        load_program(tmp_path / "Empty.mlmodelc")


@pytest.mark.parametrize("edit, message", [
    (_replace("BLOBFILE", "uint64(64)", "uint64(72)"),
     r"reads a weight at offset 72 of .*weight\.bin, but no blob starts there \(expected the marker 0xDEADBEEF"),
    (_replace("BLOBFILE", "tensor<fp16, [6, 4, 1, 1]>(", "tensor<fp32, [6, 4, 1, 1]>("),
     r"reads fp32 values at offset 64 of .*weight\.bin, which holds fp16 values"),
    (_replace("BLOBFILE", "@model_path/weights/weight.bin", "/etc/weight.bin"),
     r"BLOBFILE path '/etc/weight.bin'; expected a file in the model's weights folder"),
], ids=["offset", "dtype", "path"])
def test_weight_references_are_checked(tmp_path, edit, message):
    path, _ = _broken(tmp_path, edit)
    with pytest.raises(ModelError, match=message):
        load_program(path)


def test_metadata_must_agree_with_the_program(tmp_path):
    path, _ = _broken(tmp_path, lambda lines: None)
    data = json.loads((path / "metadata.json").read_text())
    data[0]["inputSchema"][0]["name"] = "sample"
    (path / "metadata.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="metadata.json declares inputs sample but model.mil takes x"):
        load_program(path)


@pytest.mark.parametrize("content, message", [
    ("{ not json", "metadata.json is not valid JSON"),
    ("{}", "expected a JSON list whose first element describes the model, found dict"),
    ('[{"inputSchema": [{"name": "x", "dataType": "Float12", "shape": "[1]"}], "outputSchema": []}]',
     "inputSchema 'x' has dataType 'Float12'; known: Float16, Float32"),
    ('[{"inputSchema": [{"name": "x", "dataType": "Float32", "shape": "1 x 4"}], "outputSchema": []}]',
     "feature 'x' has shape '1 x 4'; expected a list of sizes"),
    ('[{"inputSchema": [{"name": "x", "type": "Image"}], "outputSchema": []}]',
     "inputSchema 'x' is of type 'Image'; only MultiArray features are supported"),
], ids=["json", "not_list", "data_type", "shape", "image"])
def test_bad_metadata_is_a_clear_error(tmp_path, content, message):
    path, _ = _broken(tmp_path, lambda lines: None)
    (path / "metadata.json").write_text(content)
    with pytest.raises(ModelError, match=re.escape(message)):
        read_specs(path)


# -- values ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, text", [
    (1.0, "0x1p+0"), (2.0 ** -17, "0x1p-17"), (float(np.float32(np.pi)), "0x1.921fb6p+1"), (-10.0, "-0x1.4p+3"),
    (0.0, "0x0p+0"), (float(np.float16(0.3)), "0x1.334p-2"), (float("inf"), "inf"), (float("-inf"), "-inf"),
])
def test_floats_are_written_as_the_compiler_writes_them(value, text):
    """Each expected string is a literal found in compiled model.mil files (see mil_values.py), or
    C's `%a` of that value."""
    assert format_float(value) == text
    assert parse_float(text) == value


def test_element_type_numbers_are_mil_proto_data_types():
    from coremltools.proto import MIL_pb2

    names = {"fp16": "FLOAT16", "fp32": "FLOAT32", "fp64": "FLOAT64", "string": "STRING"}
    for name, etype in ELEMENT_TYPES.items():
        assert MIL_pb2.DataType.Value(names.get(name, name.upper())) == etype.proto, name
