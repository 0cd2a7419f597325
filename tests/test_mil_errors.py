"""Clear errors for broken packages, unsupported ops and wrong inputs; registry rules; memory."""

from __future__ import annotations

import gc
import shutil
import weakref

import numpy as np
import pytest
import torch
from helpers_mil import ct, mb, mil_program, types

from coreml_sd.errors import InputError, ModelError
from coreml_sd.mil.executor import Executor
from coreml_sd.mil.package import load_program, program_from_function
from coreml_sd.mil.registry import Kernel, UnsupportedOpError, lookup, register_op, supported_ops


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A small valid package: y = linear(x) + 1 with its weights in weights/weight.bin."""
    weight = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 64), dtype=types.fp32)], opset_version=ct.target.iOS16)
    def prog(x):
        return mb.add(x=mb.linear(x=x, weight=weight), y=np.float32(1.0), name="y")

    path = tmp_path_factory.mktemp("mil_errors") / "valid.mlpackage"
    ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16).save(str(path))
    return path


@pytest.fixture
def broken(package, tmp_path):
    copy = tmp_path / "broken.mlpackage"
    shutil.copytree(package, copy)
    return copy


def test_valid_package_loads_and_runs(package):
    program = load_program(package)
    assert [s.name for s in program.inputs] == ["x"] and [s.name for s in program.outputs] == ["y"]
    out = Executor(program, precision_mode="exact")({"x": np.zeros((2, 64), np.float32)})["y"]
    torch.testing.assert_close(out, torch.ones(2, 64))


def test_missing_path(tmp_path):
    with pytest.raises(ModelError, match="expected a Core ML package .* found nothing"):
        load_program(tmp_path / "absent.mlpackage")


def test_file_instead_of_package(tmp_path):
    file = tmp_path / "model.mlmodel"
    file.write_bytes(b"\x00" * 16)
    with pytest.raises(ModelError, match="is a file; expected a Core ML package"):
        load_program(file)


def test_folder_without_manifest(tmp_path):
    (tmp_path / "empty.mlpackage").mkdir()
    with pytest.raises(ModelError, match="Manifest.json is missing"):
        load_program(tmp_path / "empty.mlpackage")


def test_corrupt_manifest(broken):
    (broken / "Manifest.json").write_text("{ not json")
    with pytest.raises(ModelError, match="Manifest.json is corrupt"):
        load_program(broken)


def _spec_file(path):
    return next(path.glob("Data/com.apple.CoreML/*.mlmodel"))


def test_corrupt_model_spec(broken):
    _spec_file(broken).write_bytes(b"\xff\xfe garbage \x00\x01" * 7)
    with pytest.raises(ModelError, match="model spec .* is corrupt"):
        load_program(broken)


def test_missing_weight_file(broken):
    (broken / "Data/com.apple.CoreML/weights/weight.bin").unlink()
    with pytest.raises(ModelError, match=r"weight file .*weight\.bin is missing"):
        load_program(broken)


def test_truncated_weight_file(broken):
    weights = broken / "Data/com.apple.CoreML/weights/weight.bin"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelError, match="is truncated"):
        load_program(broken)


def test_neural_network_model_is_refused(broken):
    from coremltools.models.neural_network import NeuralNetworkBuilder

    builder = NeuralNetworkBuilder([("x", ct.models.datatypes.Array(4))], [("y", None)])
    builder.add_activation("relu", "RELU", "x", "y")
    _spec_file(broken).write_bytes(builder.spec.SerializeToString())
    with pytest.raises(ModelError, match="only ML programs .* 'neuralNetwork'"):
        load_program(broken)


def test_unknown_op_names_type_name_and_supported_list():
    prog = mil_program(lambda x: mb.random_uniform(shape=mb.shape(x=x), name="noise_op"), np.zeros((2, 3), np.float32))
    # `shape` of a static input folds to a constant; random_uniform itself cannot
    with pytest.raises(UnsupportedOpError) as info:
        Executor(program_from_function(prog.functions["main"]))
    message = str(info.value)
    assert "'random_uniform'" in message and "'noise_op'" in message and "conv, conv_transpose, cos" in message
    assert isinstance(info.value, ModelError)


@pytest.mark.parametrize(
    "inputs,pattern",
    [
        ({"x": np.zeros((2, 64), np.float32), "z": np.zeros(1)}, r"unknown input\(s\) 'z'; valid inputs: x \(2, 64\) fp32"),
        ({}, r"missing input\(s\) 'x'; valid inputs: x \(2, 64\) fp32"),
        ({"x": np.zeros((1, 64), np.float32)}, r"input 'x' expects shape \(2, 64\), found \(1, 64\)"),
        ({"x": np.zeros((2, 64, 1), np.float32)}, r"input 'x' expects shape \(2, 64\), found \(2, 64, 1\)"),
        ({"x": np.zeros((2, 64), np.int64)}, r"input 'x' expects float values \(fp32\), found int64"),
        ({"x": torch.zeros((2, 64), dtype=torch.bool)}, r"input 'x' expects float values \(fp32\), found bool"),
    ],
    ids=["unknown_name", "missing", "wrong_shape", "wrong_rank", "int_for_float", "bool_for_float"],
)
def test_wrong_inputs(package, inputs, pattern):
    executor = Executor(load_program(package), precision_mode="exact")
    with pytest.raises(InputError, match=pattern):
        executor(inputs)


def test_other_float_dtypes_are_accepted(package):
    executor = Executor(load_program(package), precision_mode="exact")
    out64 = executor({"x": np.ones((2, 64), np.float64)})["y"]
    out16 = executor({"x": torch.ones((2, 64), dtype=torch.float16)})["y"]
    torch.testing.assert_close(out64, out16)


def test_duplicate_registration_raises_and_override_replaces():
    lookup("add", "probe")  # registry loaded

    def build(op):
        return Kernel(lambda x: x, (op.var("x"),))

    from coreml_sd.mil import registry

    try:
        register_op("test_only_op")(build)
        with pytest.raises(ValueError, match="already registered"):
            register_op("test_only_op")(build)
        with pytest.raises(ValueError, match="already registered"):
            register_op("add")(build)
        register_op("test_only_op", override=True)(lambda op: None)
        assert registry._REGISTRY["test_only_op"].build is not build
        assert "test_only_op" in supported_ops()
    finally:
        registry._REGISTRY.pop("test_only_op", None)


def test_executor_keeps_no_reference_to_the_loaded_program(package):
    """Weights live once: after compiling, the coremltools program (numpy weights) can be freed."""
    program = load_program(package)
    ref = weakref.ref(program.function)
    executor = Executor(program, precision_mode="fast", fast_dtype="bf16")
    del program
    gc.collect()
    assert ref() is None
    assert executor({"x": np.zeros((2, 64), np.float32)})["y"].shape == (2, 64)


def test_unknown_precision_mode(package):
    with pytest.raises(InputError, match="precision mode 'fp8' is unknown; valid: exact, fast"):
        Executor(load_program(package), precision_mode="fp8")

