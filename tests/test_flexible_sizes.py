"""`convert --sizes`: one UNet/VAE set taking several image sizes (Core ML enumerated shapes).

The tiny model (images 16x16, latents 8x8) is converted once for 16x16, 16x24, 24x16 and 24x24.
Each size generates on the mil executor within 30 dB of the torch backend on the source (the
packages compute in fp16, so equality is to fp16's precision), and so does the hires fix from
16x16 to 24x24; the parity gate measured every size, an unlisted size is refused naming the
sizes, and compiled copies keep the sizes. Also here: query
chunking over a flexible length, the option checks, `--layout`, earlier folders whose VAE decoder
takes fp32 `z`, and `--compile` where the Swift pipeline looks (macOS only).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from coreml_sd.cli import main
from coreml_sd.errors import InputError
from coreml_sd.metrics import image_psnr
from coreml_sd.model_description import describe_model
from coreml_sd.sources import open_model
from conversion.convert import ConversionError, ConvertOptions, convert_model

SIZES = ((16, 16), (16, 24), (24, 16), (24, 24))
KW = dict(seed=5, steps=4, sampler="euler", guidance_scale=7.5)


@pytest.fixture(scope="module")
def multi(tiny_diffusers_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("multi") / "tiny-multi"
    return convert_model(open_model(tiny_diffusers_dir), out, ConvertOptions(sizes=SIZES))


def _generate(model: str, backend: str, width: int, height: int, **load) -> np.ndarray:
    from coreml_sd.pipeline import Pipeline

    pipe = Pipeline.load(model, backend=backend, device="cpu", **load)
    return np.asarray(pipe("a handwritten digit seven", width=width, height=height, **KW)[0].image)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_every_listed_size_generates_as_torch(size, multi, tiny_diffusers_dir):
    width, height = size
    image = _generate(str(multi.path), "mil", width, height, precision="fp16")
    reference = _generate(str(tiny_diffusers_dir), "torch", width, height, precision="fp32")
    assert image.shape == (height, width, 3)
    assert image_psnr(reference, image) >= 30.0


def test_hires_fix_between_listed_sizes(multi, tiny_diffusers_dir):
    """A1111's hires fix (latent upscaler) from 16x16 to 24x24 runs both passes through the one UNet."""
    from coreml_sd.pipeline import Pipeline

    hires = dict(hires_scale=1.5, hires_steps=2, hires_denoise=0.5, hires_upscaler="latent")
    images = [np.asarray(Pipeline.load(model, backend=backend, device="cpu", precision=precision)(
        "a handwritten digit seven", width=16, height=16, **hires, **KW)[0].image)
        for model, backend, precision in ((str(multi.path), "mil", "fp16"), (str(tiny_diffusers_dir), "torch", "fp32"))]
    assert images[0].shape == (24, 24, 3)
    assert image_psnr(images[1], images[0]) >= 30.0


def test_coreml_backend_path_takes_every_listed_size(multi, tmp_path, monkeypatch):
    """The coreml backend's own code (specs with flexible sizes, input checks, numpy arrays; Core ML's
    predict stood in for by the exact mil executor, tests/helpers_runtime.py) runs each listed size
    and gives the mil backend's exact-mode image."""
    from helpers_runtime import MilCoreML, as_macos

    from coreml_sd.backends.coreml_backend import read_specs
    from coreml_sd.pipeline import Pipeline

    inputs, _ = read_specs(multi.path / "Unet.mlpackage")
    assert inputs[0].shape == (2, 4, None, None)
    from coreml_sd.backends import LoadOptions
    from coreml_sd.backends.selection import load_components, parse_backend

    source = open_model(multi.path)
    exact = Pipeline(source, load_components(source, parse_backend("mil"), LoadOptions(device="cpu", mil_mode="exact")))
    as_macos(monkeypatch, MilCoreML(tmp_path / "cache"))
    coreml = Pipeline.load(str(multi.path), backend="coreml", compute_units="cpu")
    for width, height in SIZES[1:3]:
        got, want = (np.asarray(p("a handwritten digit seven", width=width, height=height, **KW)[0].image)
                     for p in (coreml, exact))
        assert got.shape == (height, width, 3) and np.array_equal(got, want)


def test_unlisted_size_is_a_clear_error(multi):
    from coreml_sd.backends.mil_backend import load_mil_component
    from coreml_sd.conditioning import Conditioning
    from coreml_sd.pipeline import Pipeline

    pipe = Pipeline.load(str(multi.path), backend="mil", device="cpu")
    with pytest.raises(InputError, match=r"converted for 16x16, 16x24, 24x16, 24x24; got 32x32 \(convert again with "
                                         r"--sizes"):
        pipe("a 7", width=32, height=32, **KW)
    unet = load_mil_component(multi.path / "Unet.mlpackage", "unet", device="cpu")
    cond = Conditioning(context=torch.zeros(2, 77, 32))
    with pytest.raises(InputError, match=r"input 'sample' takes the shapes \(2, 4, 8, 8\), \(2, 4, 12, 8\), "
                                         r"\(2, 4, 8, 12\), \(2, 4, 12, 12\) \(enumerated\); found \(2, 4, 10, 10\)"):
        unet.predict(torch.zeros(2, 4, 10, 10), torch.tensor([500.0, 500.0]), cond)


def test_manifest_parity_and_description_cover_every_size(multi):
    m = multi.manifest
    assert m.sizes == [list(s) for s in SIZES] and (m.width, m.height) == SIZES[0]
    for component in ("unet", "vae_decoder"):
        figures = m.parity["components"][component]["psnr_db"]
        output = "noise_pred" if component == "unet" else "image"
        expected = {f"{output} {w}x{h}" for w, h in SIZES}
        if component == "vae_decoder":  # test latents at every size, as floats and 8-bit pixels
            expected = {f"image {w}x{h} (test image and noise){bits}" for w, h in SIZES for bits in ("", " 8-bit")}
        assert set(figures) == expected
        assert min(figures.values()) >= 35
    unet = describe_model(multi.path / "Unet.mlpackage")
    assert unet.shapes == {"sample": tuple((2, 4, h // 2, w // 2) for w, h in SIZES)}
    assert unet.input("sample").shape == (2, 4, None, None) and unet.defaults["sample"] == (2, 4, 8, 8)
    z = describe_model(multi.path / "VAEDecoder.mlpackage").input("z")
    assert (z.shape, z.dtype) == ((1, 4, None, None), "fp16")  # fp16 z, as Apple's VAEDecoder
    info = CliRunner().invoke(main, ["info", str(multi.path)]).output
    assert "sizes        16x16, 16x24, 24x16, 24x24 (enumerated: any other size is refused)" in info


def test_compiled_copy_keeps_the_sizes(multi, tmp_path):
    """A compiled copy (model.mil + metadata.json) declares the same enumerated shapes and computes
    what the package computes at each of them: bit for bit, since the text parses back into the
    package's own program (tests/test_mil_compiled.py) and CPU kernels are deterministic."""
    from coreml_sd.mil import Executor, load_program
    from coreml_sd.mil.compiled import write_compiled_model

    compiled = write_compiled_model(multi.path / "Unet.mlpackage", tmp_path / "Unet.mlmodelc")
    assert describe_model(compiled).shapes == describe_model(multi.path / "Unet.mlpackage").shapes
    package, text = (Executor(load_program(p), device="cpu", precision_mode="exact")
                     for p in (multi.path / "Unet.mlpackage", compiled))
    rng = np.random.default_rng(0)
    for w, h in SIZES:
        feeds = {"sample": rng.standard_normal((2, 4, h // 2, w // 2)).astype(np.float32),
                 "timestep": np.array([900.0, 100.0], np.float32),
                 "encoder_hidden_states": rng.standard_normal((2, 32, 1, 77)).astype(np.float32)}
        assert torch.equal(package(feeds)["noise_pred"], text(feeds)["noise_pred"])


def test_flexible_program_chunks_queries_evenly_at_every_size(monkeypatch):
    """With the query chunk at 16 tokens, the 8x8 and 8x12 latents' 64 and 96 queries are cut into
    8 equal pieces by one `split` per head (8 divides both, 64/8 and 96/8 <= 16; the mid block's 16
    or 24 into 2), and the program computes the torch rewrite's output at both sizes."""
    from tiny_models import build_tiny_modules

    import conversion.ane.attention as attention
    from conversion.ane import unet_from_diffusers
    from conversion.export import TensorIO, build_program
    from coreml_sd.metrics import psnr
    from coreml_sd.mil import Executor, program_from_function

    monkeypatch.setattr(attention, "QUERY_CHUNK", 16)
    _, unet, _ = build_tiny_modules(0)
    rewrite = unet_from_diffusers(unet.half(), attention="split_einsum_v2")
    shapes = [(2, 4, 8, 8), (2, 4, 8, 12)]
    ins = [TensorIO.enumerated("sample", shapes, "fp16"), TensorIO("timestep", (2,), "fp16"),
           TensorIO("encoder_hidden_states", (2, 32, 1, 77), "fp16")]
    prog, outs, _ = build_program(lambda ops, s, t, c: [rewrite(s, t, c, ops=ops)], rewrite, ins,
                                  [TensorIO("noise_pred", (2, 4, None, None), "fp32")], min_target="macOS13")
    splits = [op for op in prog.functions["main"].operations if op.op_type == "split" and int(op.axis.val) == 3]
    # full resolution (64 or 96 queries): 8 pieces; the mid block's 4x4 or 4x6 (16 or 24): 2 pieces
    assert sorted({int(op.num_splits.val) for op in splits}) == [2, 8]
    assert outs[0].shape == (2, 4, 8, None)  # the height is 8 at both sizes
    executor = Executor(program_from_function(prog.functions["main"]), precision_mode="exact")
    rng = np.random.default_rng(1)
    for shape in shapes:
        sample = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
        t = torch.tensor([700.0, 300.0])
        context = torch.from_numpy(rng.standard_normal((2, 32, 1, 77)).astype(np.float32))
        rewrite.compute_dtype_override = torch.float32  # fp32 compute over the stored fp16 weights
        with torch.inference_mode():
            reference = rewrite(sample, t, context).float().numpy()
        rewrite.compute_dtype_override = None
        got = executor({"sample": sample, "timestep": t, "encoder_hidden_states": context})["noise_pred"].numpy()
        assert psnr(reference, got) >= 50.0  # fp16 program vs the fp32 torch rewrite


def test_chunk_count():
    from coremltools.converters.mil.mil import get_new_symbol

    from conversion.ane.ops import chunk_count

    assert chunk_count(4096, 512) == 8 and chunk_count(300, 512) == 1
    assert chunk_count(6400, 512) == 16  # 13, 14, 15 do not divide 6400
    h, w = get_new_symbol(), get_new_symbol()
    sizes = [{h: 64, w: 64}, {h: 64, w: 96}, {h: 96, w: 64}]  # 512x512, 768x512, 512x768 latents
    assert chunk_count(h * w, 512, sizes) == 16  # 4096 and 6144 tokens: 12..15 do not divide both; 256 and 384
    with pytest.raises(ValueError, match="value at each enumerated size is not known"):
        chunk_count(get_new_symbol(), 512, sizes)


def test_size_options_are_checked(tiny_diffusers_dir, tmp_path):
    for options, message in ((ConvertOptions(sizes=SIZES, width=16), "either --sizes or --width"),
                             (ConvertOptions(sizes=((16, 16), (16, 16))), "lists a size twice"),
                             (ConvertOptions(sizes=SIZES, chunk_unet=True), "--sizes with --chunk-unet")):
        with pytest.raises(ConversionError, match=message):
            options.validate()
    with pytest.raises(ConversionError, match="width must be a positive multiple of 4"):
        convert_model(open_model(tiny_diffusers_dir), tmp_path / "x", ConvertOptions(sizes=((16, 16), (18, 16))))
    result = CliRunner().invoke(main, ["convert", str(tiny_diffusers_dir), "-o", str(tmp_path / "y"),
                                       "--sizes", "512x512,512by768"])
    assert result.exit_code == 2 and "'512by768' is not WIDTHxHEIGHT" in result.output


@pytest.mark.parametrize("layout", ["python", "both"])
def test_layouts_name_packages_for_apples_pipelines(layout, tiny_diffusers_dir, tmp_path):
    import os

    from coreml_sd.model_folder import ConvertedModel

    result = convert_model(open_model(tiny_diffusers_dir), tmp_path / "m",
                           ConvertOptions(components=("vae_decoder",), layout=layout))
    python = "Stable_Diffusion_version_tiny-sd_vae_decoder.mlpackage"  # Apple's _get_out_path form
    entry = result.manifest.components["vae_decoder"]
    assert entry.package == python and (result.path / python / "Manifest.json").is_file()
    if layout == "both":
        assert entry.aliases == ("VAEDecoder.mlpackage",)
        weights = [p for p in (result.path / python).rglob("*") if p.is_file()]
        twin = result.path / "VAEDecoder.mlpackage" / weights[0].relative_to(result.path / python)
        assert os.stat(twin).st_ino == os.stat(weights[0]).st_ino  # the same file, not a copy
    else:
        assert not (result.path / "VAEDecoder.mlpackage").exists()
    folder = ConvertedModel(result.path, partial=True)
    assert folder.package_paths("vae_decoder") == [result.path / python]


def test_earlier_folders_with_fp32_z_still_decode(tiny_diffusers_dir, tmp_path):
    """Folders converted before z became fp16 take fp32 z; the runtime follows each package's own
    input type, so both decode the same latents to the same image (to fp16 rounding of z)."""
    from tiny_models import build_tiny_modules

    from conversion.ane import vae_decoder_from_diffusers
    from conversion.export import TensorIO, build_program, to_mlmodel
    from coreml_sd.backends.mil_backend import load_mil_component

    _, _, vae = build_tiny_modules(0)
    rewrite = vae_decoder_from_diffusers(vae.half())
    decoders = {}
    for dtype in ("fp32", "fp16"):
        prog, _, _ = build_program(lambda ops, z: [rewrite(z, ops)], rewrite, [TensorIO("z", (1, 4, 8, 8), dtype)],
                                   [TensorIO("image", (1, 3, 16, 16), "fp32")], min_target="macOS13")
        package = to_mlmodel(prog, min_target="macOS13", package_dir=tmp_path / f"VAEDecoder-{dtype}.mlpackage")
        assert describe_model(package).input("z").dtype == dtype
        decoders[dtype] = load_mil_component(package, "vae_decoder", device="cpu", precision_mode="exact")
    z = torch.from_numpy(np.random.default_rng(2).standard_normal((1, 4, 8, 8)).astype(np.float16).astype(np.float32))
    old, new = (decoders[d].decode(z).numpy() for d in ("fp32", "fp16"))
    assert np.array_equal(old, new)  # z is fp16-exact, and the fp32 program casts it to fp16 first


@pytest.mark.macos
@pytest.mark.parametrize("layout,where", [("swift", "."), ("python", "Resources")])
def test_compile_writes_what_the_swift_pipeline_loads(layout, where, tiny_diffusers_dir, tmp_path):
    """--compile (macOS): each .mlmodelc under its Swift resource name, beside vocab.json and merges.txt
    (in Resources/ beside Apple's Python names), and the coreml backend generates from them."""
    assert sys.platform == "darwin"
    result = convert_model(open_model(tiny_diffusers_dir), tmp_path / "m", ConvertOptions(compile=True, layout=layout))
    resources = result.path / where
    for name in ("TextEncoder.mlmodelc", "Unet.mlmodelc", "VAEDecoder.mlmodelc", "vocab.json", "merges.txt"):
        assert (resources / name).exists(), name
    image = _generate(str(result.path), "coreml", 16, 16, compute_units="cpu")
    assert image.shape == (16, 16, 3)
