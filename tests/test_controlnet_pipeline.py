"""ControlNet on torch: our pipeline equals diffusers' StableDiffusionControlNetPipeline.

A tiny ControlNet is built from the tiny model's UNet (ControlNetModel.from_unet) with non-zero
output convolutions, so the control image changes the result (by far more than the tolerance, which
each test checks). Both pipelines share the modules' weights and seeds; the final latents agree
within 1e-4, the tolerance of the plain pipeline's parity (tests/test_pipeline.py): the same float32
operations, in an order that may differ in the last bits.
"""

import json

import numpy as np
import pytest

from coreml_sd import Pipeline
from coreml_sd.control import ControlUnit
from coreml_sd.errors import InputError, ModelError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from helpers_controlnet import (build_tiny_controlnet, control_picture, diffusers_controlnet_pipeline,  # noqa: E402
                                write_controlnet_file, write_controlnet_folder)

TOL = 1e-4
STEPS, CFG, SEED = 6, 5.0, 11


@pytest.fixture(scope="module")
def nets(tiny_diffusers_dir, tmp_path_factory):
    """Two tiny ControlNets as diffusers folders, and the first as original-layout single files."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("controlnets")
    unet = UNet2DConditionModel.from_pretrained(tiny_diffusers_dir / "unet", local_files_only=True)
    first, second = build_tiny_controlnet(unet, seed=1), build_tiny_controlnet(unet, seed=2)
    return {
        "net": first, "a": write_controlnet_folder(root / "cn_a", first), "b": write_controlnet_folder(root / "cn_b", second),
        "safetensors": write_controlnet_file(root / "control_tiny_a.safetensors", first),
        "pth": write_controlnet_file(root / "control_tiny_a.pth", first),
        "bare": write_controlnet_file(root / "tiny_a_extracted.safetensors", first, prefix=""),
        "fp16": write_controlnet_file(root / "control_tiny_a_fp16.safetensors", first, dtype="fp16"),
    }


@pytest.fixture(scope="module")
def pipe(tiny_diffusers_dir):
    return Pipeline.load(tiny_diffusers_dir, backend="torch", device="cpu", precision="fp32")


IMAGES = {"a": control_picture(seed=3), "b": control_picture(seed=5)}


def _reference(model_dir, net_dirs, *, scales, starts, ends, guess=False):
    ref = diffusers_controlnet_pipeline(str(model_dir), *map(str, net_dirs))
    ref.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(ref.scheduler.config)
    images = [IMAGES[k] for k in ("a", "b")[:len(net_dirs)]]
    one = len(net_dirs) == 1
    out = ref("a red cat", negative_prompt="blurry", image=images[0] if one else images,
              num_inference_steps=STEPS, guidance_scale=CFG, generator=[torch.Generator("cpu").manual_seed(SEED)],
              output_type="latent", controlnet_conditioning_scale=scales[0] if one else list(scales),
              control_guidance_start=starts[0] if one else list(starts),
              control_guidance_end=ends[0] if one else list(ends), guess_mode=guess)
    return out.images.numpy()


def _ours(pipe, units, **kwargs):
    out = pipe("a red cat", seed=SEED, sampler="euler_a", steps=STEPS, guidance_scale=CFG, negative_prompt="blurry",
               controlnets=units, control_resize_mode="stretch", **kwargs)
    return out[0]


def _plain(pipe):
    return pipe("a red cat", seed=SEED, sampler="euler_a", steps=STEPS, guidance_scale=CFG,
                negative_prompt="blurry")[0].latents


@pytest.mark.parametrize("weight", [0.5, 1.0])
@pytest.mark.parametrize("start,end", [(0.0, 1.0), (0.2, 0.8)])
def test_one_controlnet_equals_diffusers(pipe, nets, tiny_diffusers_dir, weight, start, end):
    expected = _reference(tiny_diffusers_dir, [nets["a"]], scales=[weight], starts=[start], ends=[end])
    got = _ours(pipe, [(nets["a"], IMAGES["a"], weight, start, end)]).latents
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
    assert np.abs(_plain(pipe) - expected).max() > 100 * TOL  # the control did change the image


@pytest.mark.parametrize("weights", [(1.0, 0.5), (0.5, 1.0)])
def test_two_controlnets_equal_diffusers_multicontrolnet(pipe, nets, tiny_diffusers_dir, weights):
    starts, ends = (0.2, 0.0), (0.8, 1.0)
    expected = _reference(tiny_diffusers_dir, [nets["a"], nets["b"]], scales=weights, starts=starts, ends=ends)
    units = [(nets[k], IMAGES[k], w, s, e) for k, w, s, e in zip("ab", weights, starts, ends)]
    got = _ours(pipe, units).latents
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
    only_a = _ours(pipe, units[:1]).latents
    assert np.abs(only_a - expected).max() > 100 * TOL  # the second net counts


@pytest.mark.parametrize("count", [1, 2])
def test_controlnet_mode_equals_diffusers_guess_mode(pipe, nets, tiny_diffusers_dir, count):
    dirs = [nets["a"], nets["b"]][:count]
    expected = _reference(tiny_diffusers_dir, dirs, scales=[0.8] * count, starts=[0.0] * count, ends=[1.0] * count,
                          guess=True)
    units = [(d, IMAGES[k], 0.8) for d, k in zip(dirs, "ab")]
    got = _ours(pipe, units, control_mode="ControlNet is more important")
    np.testing.assert_allclose(got.latents, expected, atol=TOL, rtol=0)
    balanced = _ours(pipe, units).latents
    assert np.abs(balanced - expected).max() > 100 * TOL


def test_weight_zero_is_plain_generation_exactly(pipe, nets):
    """Exact, because it is the same computation: a unit of weight 0 (or outside its start/end at every
    step) is not run, the conditioning stays without residuals, and the UNet call is plain generation's
    own (the same module and inputs)."""
    plain = _plain(pipe)
    zero = _ours(pipe, [(nets["a"], IMAGES["a"], 0.0)]).latents
    never = _ours(pipe, [(nets["a"], IMAGES["a"], 1.0, 1.0, 1.0)]).latents  # i/n < 1 at every step
    np.testing.assert_array_equal(zero, plain)
    np.testing.assert_array_equal(never, plain)


@pytest.mark.parametrize("kind", ["safetensors", "pth", "bare"])
def test_single_file_opens_with_the_same_weights_and_image(pipe, nets, kind):
    from coreml_sd.controlnet_source import open_controlnet_model

    model = open_controlnet_model(nets[kind])
    loaded = model.build(device="cpu", dtype=torch.float32).state_dict()
    reference = nets["net"].state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)  # loading is exact
    from_file = _ours(pipe, [(nets[kind], IMAGES["a"], 0.7, 0.2, 0.8)]).latents
    from_folder = _ours(pipe, [(nets["a"], IMAGES["a"], 0.7, 0.2, 0.8)]).latents
    np.testing.assert_allclose(from_file, from_folder, atol=1e-5, rtol=0)


def test_fp16_file_holds_the_fp16_weights(nets):
    from coreml_sd.controlnet_source import open_controlnet_model

    loaded = open_controlnet_model(nets["fp16"]).build(device="cpu", dtype=torch.float32).state_dict()
    for key, value in nets["net"].state_dict().items():
        assert torch.equal(loaded[key], value.half().float()), key


def test_metadata_is_a1111s_controlnet_infotext(pipe, nets):
    from coreml_sd.images import GenerationParams

    unit = ControlUnit(nets["safetensors"], IMAGES["a"], weight=0.5, start=0.2, end=0.8, mode="prompt",
                       resize_mode="Crop and Resize", preprocessor="invert")
    result = _ours(pipe, [unit, (nets["b"], IMAGES["b"])])
    extras = result.params.extras
    from coreml_sd.controlnet_source import legacy_hash

    assert extras["ControlNet 0"] == (
        f"Module: invert, Model: control_tiny_a [{legacy_hash(nets['safetensors'])}], Weight: 0.5, "
        "Resize Mode: Crop and Resize, Guidance Start: 0.2, Guidance End: 0.8, "
        "Control Mode: My prompt is more important")
    assert extras["ControlNet 1"].startswith("Module: none, Model: cn_b [")
    assert extras["ControlNet 1"].endswith("Resize Mode: Just Resize, Guidance Start: 0.0, Guidance End: 1.0, "
                                           "Control Mode: Balanced")
    text = result.params.to_a1111()
    assert f'ControlNet 0: "{extras["ControlNet 0"]}"' in text  # quoted, as A1111 quotes a value with ", :"
    assert GenerationParams.from_a1111(text).extras["ControlNet 0"] == extras["ControlNet 0"]


def test_legacy_hash_is_a1111s_model_hash(tmp_path):
    import hashlib

    from coreml_sd.controlnet_source import legacy_hash

    data = np.random.default_rng(0).integers(0, 256, 0x100000 + 0x20000, dtype=np.uint8).tobytes()
    path = tmp_path / "x.pth"
    path.write_bytes(data)
    assert legacy_hash(path) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_a_controlnet_of_another_width_is_a_clear_error(pipe, tmp_path):
    from diffusers import UNet2DConditionModel
    from tiny_models import UNET_CONFIG

    wide = UNet2DConditionModel(**{**UNET_CONFIG, "cross_attention_dim": 64})
    path = write_controlnet_folder(tmp_path / "wide", build_tiny_controlnet(wide))
    with pytest.raises(ModelError, match=r"does not fit .*context width is 64, the model's 32"):
        _ours(pipe, [(path, IMAGES["a"])])


def test_a_controlnet_of_another_family_is_a_clear_error(pipe, tmp_path):
    """A full-size SD 2.x ControlNet (its shapes; the file's data is not read to tell) on an SD 1.x model."""
    from helpers_controlnet import full_size_controlnet_shapes

    from coreml_sd.controlnet_source import ControlNetFile, ControlNetSource, open_controlnet

    shapes = full_size_controlnet_shapes("sd2")
    fake = tmp_path / "control_v11p_sd21_canny.safetensors"
    fake.write_bytes(b"")
    model = ControlNetFile(fake, shapes=shapes)
    assert model.family == "sd2"
    source = ControlNetSource(model.info(), model=model)
    with pytest.raises(ModelError, match=r"is for Stable Diffusion 2\.x.*the model is sd1.*context width is 1024"):
        open_controlnet(source, pipe.source)


@pytest.mark.parametrize("unit,needle", [
    ((None, None, 1.0, 0.9, 0.1), "0 <= start <= end <= 1"),
    (("x", None, -1.0), "weight must be >= 0"),
    (ControlUnit("x", None, mode="louder"), "unknown control mode"),
    (ControlUnit("x", None, resize_mode="squash"), "unknown resize mode"),
    (ControlUnit("x", None, preprocessor="depth_midas"), "runs a downloaded model"),
    (("only a model",), "a ControlNet is"),
])
def test_bad_units_are_input_errors(pipe, unit, needle):
    with pytest.raises(InputError, match=needle):
        _ours(pipe, [unit])


def test_missing_controlnet_is_a_model_error(pipe, tmp_path):
    with pytest.raises(ModelError, match="ControlNet not found"):
        _ours(pipe, [(tmp_path / "nope.safetensors", IMAGES["a"])])


def test_a_model_file_is_not_a_controlnet(pipe, tiny_diffusers_dir, tmp_path):
    weights = tiny_diffusers_dir / "unet" / "diffusion_pytorch_model.safetensors"
    copy = tmp_path / "unet.safetensors"
    copy.write_bytes(weights.read_bytes())
    with pytest.raises(ModelError, match="is not a ControlNet"):
        _ours(pipe, [(copy, IMAGES["a"])])


def test_prompt_mode_is_guess_modes_soft_weights_on_both_halves(pipe, nets, tiny_diffusers_dir):
    """A1111's "My prompt is more important": soft weights, and (unlike guess mode) the unconditional
    half controlled too. The reference is diffusers' pipeline in its normal (both halves) mode whose
    ControlNet applies its guess-mode soft weights."""
    ref = diffusers_controlnet_pipeline(str(tiny_diffusers_dir), str(nets["a"]))
    original = ref.controlnet.forward
    ref.controlnet.forward = lambda *args, **kwargs: original(*args, **{**kwargs, "guess_mode": True})
    try:
        expected = _reference(tiny_diffusers_dir, [nets["a"]], scales=[0.9], starts=[0.0], ends=[1.0])
    finally:
        del ref.controlnet.forward
    got = _ours(pipe, [ControlUnit(nets["a"], IMAGES["a"], 0.9, mode="prompt")]).latents
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
    balanced = _ours(pipe, [(nets["a"], IMAGES["a"], 0.9)]).latents
    assert np.abs(balanced - expected).max() > 100 * TOL


class _Counting:
    def __init__(self, inner):
        self.inner, self.batch_size, self.calls = inner, getattr(inner, "batch_size", None), 0

    def residuals(self, *args):
        self.calls += 1
        return self.inner.residuals(*args)


def test_a1111_flag_uses_a1111s_guidance_steps(pipe, nets):
    unit = (nets["a"], IMAGES["a"], 1.0, 0.0, 0.5)
    _ours(pipe, [unit])  # loads the ControlNet into the pipeline's components
    key = next(k for k in pipe.components.parts if k.startswith("controlnet:") and "CnA" in k)
    counter = _Counting(pipe.components.parts[key])
    pipe.components.parts[key] = counter
    try:
        _ours(pipe, [unit])
        diffusers_calls, counter.calls = counter.calls, 0
        _ours(pipe, [unit], a1111=True)
    finally:
        pipe.components.parts[key] = counter.inner
    assert (diffusers_calls, counter.calls) == (3, 5)  # steps 0-2 of 6, and A1111's lagging 0-4


def test_a_single_file_in_diffusers_names_opens_too(pipe, nets, tmp_path):
    """A1111's diffusers_xl_* ControlNets are single files with diffusers' key names."""
    from safetensors.torch import save_file

    from coreml_sd.checkpoint import detect
    from coreml_sd.checkpoint.safeload import tensor_shapes
    from coreml_sd.controlnet_source import open_controlnet_model

    path = tmp_path / "diffusers_tiny_a.safetensors"
    save_file({k: v.contiguous() for k, v in nets["net"].state_dict().items()}, str(path))
    config = {k: v for k, v in dict(nets["net"].config).items() if not k.startswith("_")}
    path.with_name("diffusers_tiny_a.coreml-sd.json").write_text(json.dumps({"family": "sd1", "controlnet": config}))
    det = detect.classify(tensor_shapes(path)[0])
    assert (det.kind, det.layout, det.context_dim, det.block_widths) == ("controlnet", "diffusers", 32, (32, 64))
    loaded = open_controlnet_model(path).build(device="cpu", dtype=torch.float32).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in nets["net"].state_dict().items())
    from_file = _ours(pipe, [(path, IMAGES["a"], 0.7)]).latents
    np.testing.assert_allclose(from_file, _ours(pipe, [(nets["a"], IMAGES["a"], 0.7)]).latents, atol=1e-5, rtol=0)


def _image_reference(kind, model_dir, net_dir):
    """diffusers' ControlNet img2img or inpaint pipeline over the tiny model and one ControlNet."""
    from diffusers import ControlNetModel, StableDiffusionPipeline

    base = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    ref = getattr(diffusers, f"StableDiffusionControlNet{kind}Pipeline")(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        controlnet=ControlNetModel.from_pretrained(net_dir, local_files_only=True),
        scheduler=diffusers.EulerAncestralDiscreteScheduler.from_config(base.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


def _picture(seed=0):
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, 16, dtype=np.float32)[None, :, None] * np.ones((16, 1, 3))
    from PIL import Image

    return Image.fromarray(np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_controlnet_with_img2img_equals_diffusers(pipe, nets, tiny_diffusers_dir, strength):
    """The guidance start/end count the steps img2img runs (diffusers: the truncated timesteps)."""
    init = _picture()
    ref = _image_reference("Img2Img", tiny_diffusers_dir, nets["a"])
    expected = ref("a red cat", image=init, control_image=IMAGES["a"], strength=strength, num_inference_steps=10,
                   guidance_scale=CFG, generator=torch.Generator("cpu").manual_seed(5), output_type="latent",
                   controlnet_conditioning_scale=0.8, control_guidance_start=0.2, control_guidance_end=0.9).images
    ours = pipe("a red cat", seed=5, steps=10, sampler="euler_a", guidance_scale=CFG, init_image=init,
                strength=strength, controlnets=[(nets["a"], IMAGES["a"], 0.8, 0.2, 0.9)],
                control_resize_mode="stretch")[0]
    np.testing.assert_allclose(ours.latents, expected.numpy(), atol=TOL, rtol=0)
    plain = pipe("a red cat", seed=5, steps=10, sampler="euler_a", guidance_scale=CFG, init_image=init,
                 strength=strength)[0]
    assert np.abs(plain.latents - expected.numpy()).max() > 100 * TOL
    assert ours.params.extras["Denoising strength"] == f"{strength:g}" and "ControlNet 0" in ours.params.extras


def test_controlnet_with_inpainting_equals_diffusers(pipe, nets, tiny_diffusers_dir):
    from PIL import Image

    init, mask = _picture(1), np.zeros((16, 16), np.uint8)
    mask[4:12, 6:14] = 255
    mask = Image.fromarray(mask, "L")
    ref = _image_reference("Inpaint", tiny_diffusers_dir, nets["a"])
    expected = ref("a red cat", image=init, mask_image=mask, control_image=IMAGES["a"], strength=0.8,
                   num_inference_steps=8, guidance_scale=CFG, generator=torch.Generator("cpu").manual_seed(7),
                   output_type="latent", controlnet_conditioning_scale=0.7).images
    ours = pipe("a red cat", seed=7, steps=8, sampler="euler_a", guidance_scale=CFG, init_image=init, mask=mask,
                strength=0.8, mask_blur=0, controlnets=[(nets["a"], IMAGES["a"], 0.7)], control_resize_mode="stretch")[0]
    np.testing.assert_allclose(ours.latents, expected.numpy(), atol=TOL, rtol=0)
    outside = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(ours.image)[outside], np.asarray(init)[outside])
