"""Compiled models (`.mlmodelc`) of converted packages run on the mil executor exactly as the packages.

A `.mlmodelc` is written from each package by `coreml_sd.mil.compiled.write_compiled_model`
(model.mil in Core ML's compiler syntax, the package's weight.bin, metadata.json), for the tiny
model's text encoder, UNet (split-einsum-v2 and original attention, fp16 weights; 4-bit palettized
for an iOS18 target, which writes the iOS18 text style) and VAE decoder.

Equality is exact, and that is the claim: the text parses back into the very proto the package
holds (checked message for message), which coremltools' loader turns into the same program, so
the executor runs the same kernels on the same constants in the same order. CPU kernels are
deterministic within a process, so outputs are bitwise equal in exact mode and in fast mode (no
tolerance is needed; one would hide a parse error that changes a constant in its last bit).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from helpers_mil import ct, mb, psnr
from helpers_runtime import MilCoreML, shared_tiny_model

from coreml_sd.backends.coreml_backend import load_coreml_component, read_specs
from coreml_sd.compiled_model import is_compiled_model
from coreml_sd.mil import Executor, load_program
from coreml_sd.conditioning import Conditioning
from coreml_sd.mil.compiled import write_compiled_model
from coreml_sd.mil.mil_text_read import parse_program_text

PACKAGES = ["text_encoder", "unet_split_einsum_v2", "unet_original", "unet_palettized_ios18", "vae_decoder"]


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """kind -> converted package (the shared tiny conversion, plus two more UNets)."""
    from conversion.convert import ConvertOptions, convert_model
    from coreml_sd.sources import open_model

    source, folder = shared_tiny_model(tmp_path_factory)
    out = tmp_path_factory.mktemp("compiled_sources")
    extra = {"unet_original": ConvertOptions(components=("unet",), attention="original"),
             "unet_palettized_ios18": ConvertOptions(components=("unet",), weights="palettize-4", min_target="macOS15")}
    paths = {"text_encoder": folder / "TextEncoder.mlpackage", "unet_split_einsum_v2": folder / "Unet.mlpackage",
             "vae_decoder": folder / "VAEDecoder.mlpackage"}
    for kind, options in extra.items():
        paths[kind] = convert_model(open_model(source), out / kind, options).path / "Unet.mlpackage"
    return paths


@pytest.fixture(scope="module")
def compiled(packages, tmp_path_factory):
    """kind -> the .mlmodelc written from its package."""
    out = tmp_path_factory.mktemp("compiled")
    return {kind: write_compiled_model(path, out / kind / path.with_suffix(".mlmodelc").name)
            for kind, path in packages.items()}


def _feeds(specs, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        if spec.name == "input_ids":
            ids = rng.integers(0, 49406, size=spec.shape)
            ids[..., 0], ids[..., 9:] = 49406, 49407
            feeds[spec.name] = ids.astype(np.float32)
        elif spec.name == "timestep":
            feeds[spec.name] = np.array([981.0, 21.0][: spec.shape[0]], dtype=np.float32)
        else:
            feeds[spec.name] = rng.standard_normal(spec.shape).astype(np.float32)
    return feeds


@pytest.mark.parametrize("kind", PACKAGES)
def test_text_round_trips_the_package_program(kind, packages, compiled):
    from coreml_sd.mil.package import package_files, read_spec

    spec = read_spec(package_files(packages[kind])[0])
    text = (compiled[kind] / "model.mil").read_text()
    parsed = parse_program_text(text)
    assert "buildInfo" in parsed.program.attributes
    del parsed.program.attributes["buildInfo"]  # the compiler adds it; the package has none
    assert parsed.program == spec.mlProgram
    ios18 = kind.endswith("ios18")
    assert text.startswith("program(1.3)\n[buildInfo = dict<string, string>(" if ios18 else
                           "program(1.0)\n[buildInfo = dict<tensor<string, []>, tensor<string, []>>(")
    assert re.search(r"^    func main<ios18>\(" if ios18 else r"^    func main<ios16>\(", text, re.M)
    if ios18:  # the iOS18 constexpr form coremltools' test_load.py asserts in compiled output
        assert re.search(r" = constexpr_lut_to_dense\(indices = tensor<uint4, \[\d+(, \d+)*\]>\(BLOBFILE\(path = "
                         r'string\("@model_path/weights/weight\.bin"\), offset = uint64\(\d+\)\)\), lut = ', text)


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("kind", PACKAGES)
def test_compiled_model_runs_exactly_like_its_package(kind, mode, packages, compiled):
    package, mlmodelc = load_program(packages[kind]), load_program(compiled[kind])
    assert is_compiled_model(compiled[kind]) and not is_compiled_model(packages[kind])
    assert mlmodelc.inputs == package.inputs and mlmodelc.outputs == package.outputs
    assert mlmodelc.specification_version == package.specification_version
    feeds = _feeds(package.inputs)
    a = Executor(package, precision_mode=mode)(feeds)
    b = Executor(mlmodelc, precision_mode=mode)(feeds)
    assert set(a) == set(b) == {s.name for s in package.outputs}
    for name in a:
        assert torch.isfinite(a[name]).all() and a[name].abs().max() > 0
        # The programs are equal message for message (test above); two separately built executors may
        # still take other kernels on another CPU, so the outputs agree to float32 rounding.
        scale = float(a[name].abs().max())
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("kind", PACKAGES)
def test_specs_of_compiled_model_equal_the_package_specs(kind, packages, compiled):
    """The coreml backend's read_specs (any OS): metadata.json for compiled, the proto for packages."""
    assert read_specs(compiled[kind]) == read_specs(packages[kind])


def test_images_from_compiled_components_equal_the_package_images(packages, compiled, tmp_path_factory):
    """A whole generation with .mlmodelc text encoder, UNet and VAE decoder gives the package image:
    the folder's manifest pointed at the compiled models, run through the one loading route."""
    import json
    import shutil

    from coreml_sd.backends import LoadOptions
    from coreml_sd.backends.selection import load_components, parse_backend
    from coreml_sd.model_folder import package_hash
    from coreml_sd.pipeline import Pipeline
    from coreml_sd.sources import open_model

    _, folder = shared_tiny_model(tmp_path_factory)
    copy = tmp_path_factory.mktemp("compiled_folder") / "tiny"
    shutil.copytree(folder, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for component, kind in (("text_encoder", "text_encoder"), ("unet", "unet_split_einsum_v2"),
                            ("vae_decoder", "vae_decoder")):
        shutil.rmtree(copy / manifest["components"][component]["package"])
        shutil.copytree(compiled[kind], copy / compiled[kind].name)
        manifest["components"][component]["package"] = compiled[kind].name
        manifest["components"][component]["sha256"] = package_hash(copy / compiled[kind].name)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    images = []
    for path in (folder, copy):
        source = open_model(path)
        components = load_components(source, parse_backend("mil"), LoadOptions(device="cpu", mil_mode="exact"))
        result = Pipeline(source, components)("a red apple", seed=3, steps=3, sampler="euler")[0]
        images.append(np.asarray(result.image))
    assert images[0].std() > 0 and np.abs(images[0].astype(int) - images[1].astype(int)).max() <= 1


def test_coreml_backend_loads_a_compiled_model_as_it_is(packages, compiled, tmp_path):
    """The coreml backend's path on a .mlmodelc (Core ML's load stood in for by the exact mil executor,
    see helpers_runtime): loaded directly, nothing compiled into the cache, same outputs."""
    from coreml_sd.backends.mil_backend import load_mil_component

    opener = MilCoreML(tmp_path / "cache")
    unet = load_coreml_component(compiled["unet_split_einsum_v2"], "unet", compute_units="gpu", opener=opener)
    assert opener.loaded == [("Unet.mlmodelc", "CPU_AND_GPU")] and not (tmp_path / "cache").exists()
    reference = load_mil_component(packages["unet_split_einsum_v2"], "unet", device="cpu", precision_mode="exact")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
    out = unet.predict(x, np.float32(500.0), Conditioning(ctx))
    assert type(out) is np.ndarray
    expected = reference.predict(x, np.float32(500.0), Conditioning(ctx)).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))


def test_a_package_under_a_compiled_name_is_still_a_package(packages, tmp_path):
    import shutil

    disguised = shutil.copytree(packages["vae_decoder"], tmp_path / "VAEDecoder.mlmodelc")
    assert not is_compiled_model(disguised)
    assert load_program(disguised).inputs == load_program(packages["vae_decoder"]).inputs


# -- the writer against lines Core ML's compiler is known to emit -------------------------------
def _three_consts_package(path, target):
    """The program of coremltools' TestWeightIDSharing.test_single_function (three 500-element fp32
    consts added to the input, passes skipped), without its blob sharing."""
    vals = [np.random.default_rng(i).random(500).astype(np.float32) for i in range(3)]

    @mb.program(input_specs=[mb.TensorSpec((500,))], opset_version=target)
    def prog(x):
        for i, val in enumerate(vals, 1):
            x = mb.add(x=x, y=mb.const(val=val, name=f"const_{i}"))
        return x

    prog.skip_all_passes = True
    model = ct.convert(prog, convert_to="mlprogram", compute_precision=ct.precision.FLOAT32,
                       minimum_deployment_target=target, skip_model_load=True)
    model.save(str(path))
    return path, vals


@pytest.mark.parametrize("target", ["iOS16", "iOS18"])
def test_writer_emits_the_lines_coremltools_tests_read_from_the_compiler(target, tmp_path):
    """coremltools' tests (test/blob/test_weights.py) assert these lines in the model.mil Core ML's
    compiler wrote: the first blob at offset 64, the next at 2176 (64 + 64 + 2000 bytes, aligned)."""
    package, vals = _three_consts_package(tmp_path / "three.mlpackage", getattr(ct.target, target))
    text = (write_compiled_model(package, tmp_path / "three.mlmodelc") / "model.mil").read_text()
    if target == "iOS16":
        s, offset = (lambda v: f"tensor<string, []>({v})"), (lambda v: f"tensor<uint64, []>({v})")
    else:
        s, offset = (lambda v: f"string({v})"), (lambda v: f"uint64({v})")
    for name, at in (("const_1", 64), ("const_2", 2176)):
        assert (f'tensor<fp32, [500]> {name} = const()[name = {s(chr(34) + name + chr(34))}, val = tensor<fp32, [500]>'
                f'(BLOBFILE(path = {s(chr(34) + "@model_path/weights/weight.bin" + chr(34))}, offset = {offset(at)}))];'
                ) in text
    assert "add(x = x, y = const_1)" in text and "add(x = add_0, y = const_2)" in text
    x = np.linspace(-1, 1, 500, dtype=np.float32)
    out = next(iter(Executor(load_program(tmp_path / "three.mlmodelc"))({"x": x}).values()))
    np.testing.assert_allclose(out.numpy(), x + vals[0] + vals[1] + vals[2], rtol=1e-6, atol=1e-6)


# -- on a Mac: the compiler's own output --------------------------------------------------------
@pytest.mark.macos
@pytest.mark.parametrize("kind", ["unet_split_einsum_v2", "unet_palettized_ios18", "text_encoder"])
def test_core_ml_compiler_output_runs_on_mil_like_the_package(kind, packages, tmp_path):
    """The real format: Core ML's compiler writes the .mlmodelc, our reader executes it."""
    target = tmp_path / f"{kind}.mlmodelc"
    ct.utils.compile_model(str(packages[kind]), str(target))
    assert is_compiled_model(target)
    assert read_specs(target) == read_specs(packages[kind])
    package, mlmodelc = load_program(packages[kind]), load_program(target)
    feeds = _feeds(package.inputs)
    a = Executor(package, precision_mode="exact")(feeds)
    b = Executor(mlmodelc, precision_mode="exact")(feeds)
    for name in a:  # the compiler may rewrite ops; if it does not, this is bitwise equality
        assert psnr(b[name].numpy(), a[name].numpy()) >= 60, name


@pytest.mark.macos
def test_coreml_backend_runs_a_compiled_model_with_core_ml(packages, tmp_path):
    target = tmp_path / "Unet.mlmodelc"
    ct.utils.compile_model(str(packages["unet_split_einsum_v2"]), str(target))
    compiled_unet = load_coreml_component(target, "unet", compute_units="cpu")
    package_unet = load_coreml_component(packages["unet_split_einsum_v2"], "unet", compute_units="cpu")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
    a = compiled_unet.predict(x, np.float32(500.0), ctx)
    b = package_unet.predict(x, np.float32(500.0), ctx)
    assert psnr(a, b) >= 60
