"""SDXL base and refiner: opened as diffusers folders and single files, generating what diffusers'
StableDiffusionXLPipeline (and its base -> refiner hand-off) generates from the same weights."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import tiny_sdxl as T  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from coreml_sd.checkpoint import detect, keymap  # noqa: E402
from coreml_sd.checkpoint.config import shipped_config  # noqa: E402
from coreml_sd.errors import InputError, ModelError  # noqa: E402
from coreml_sd.pipeline import Pipeline  # noqa: E402
from coreml_sd.sources import open_model  # noqa: E402

EPS32 = 2.0**-23
TOL_ULPS = 64  # float32 ulps of the latents' scale: the same float32 arithmetic in another order
SCHEDULERS = {
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}
PROMPT = "a red cat on a blue sofa"


def assert_latents_close(got, expected, ulps=TOL_ULPS):
    tol = ulps * EPS32 * float(np.abs(expected).max())
    err = float(np.abs(got - expected).max())
    assert err <= tol, f"max |difference| {err:.3g} > {tol:.3g} ({ulps} float32 ulps of the scale)"


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """Tiny SDXL base and refiner modules, as diffusers folders and as original-layout single files."""
    root = tmp_path_factory.mktemp("sdxl")
    base = T.build_tiny_sdxl(0)
    refiner = T.build_tiny_refiner(base)
    return {
        "mods": base, "refiner_mods": refiner, "root": root,
        "folder": T.save_folder(T.diffusers_pipeline(base), root / "base"),
        "refiner_folder": T.save_folder(T.diffusers_refiner_pipeline(refiner), root / "refiner"),
        "file": T.write_single_file(base, root / "base.safetensors", family="sdxl"),
        "refiner_file": T.write_single_file(refiner, root / "refiner.safetensors", family="sdxl-refiner"),
    }


def reference(mods, sampler, refiner=False):
    name, extra = SCHEDULERS[sampler]
    pipe = T.diffusers_refiner_pipeline(mods) if refiner else T.diffusers_pipeline(mods)
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ours(model, **kwargs):
    return Pipeline.load(model, backend="torch", device="cpu", precision="fp32", **kwargs)


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
@pytest.mark.parametrize("kind", ["folder", "file"])
def test_images_equal_diffusers_sdxl_pipeline(xl, sampler, kind):
    """Two text encoders (penultimate layers side by side, bigG's projected pooled output), time ids
    of size and crop, zeroed empty negative prompt: final latents as StableDiffusionXLPipeline's."""
    kwargs = dict(num_inference_steps=6, guidance_scale=5.0, height=16, width=16)
    gens = [torch.Generator("cpu").manual_seed(s) for s in (11, 12)]
    expected = reference(xl["mods"], sampler)([PROMPT] * 2, generator=gens, output_type="latent",
                                              **kwargs).images.numpy()
    pipe = ours(xl[kind])
    assert pipe.info.family == "sdxl" and pipe.info.sample_size == 16
    got = np.concatenate([r.latents for r in pipe(PROMPT, seed=11, num_images=2, sampler=sampler, steps=6,
                                                    guidance_scale=5.0)])
    assert_latents_close(got, expected)


def test_negative_prompt_and_other_size_equal_diffusers(xl):
    """A negative prompt is encoded (not zeroed), and a non-square size changes the time ids as in diffusers."""
    kwargs = dict(num_inference_steps=4, guidance_scale=4.0, height=24, width=16, negative_prompt="blurry")
    expected = reference(xl["mods"], "euler_a")(PROMPT, generator=torch.Generator().manual_seed(5),
                                                 output_type="latent", **kwargs).images.numpy()
    got = ours(xl["file"])(PROMPT, seed=5, steps=4, guidance_scale=4.0, height=24, width=16,
                           negative_prompt="blurry")[0].latents
    assert_latents_close(got, expected)


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_base_and_refiner_equal_diffusers_handoff(xl, sampler):
    """--refiner-switch 0.8 = diffusers' base(denoising_end=0.8) -> refiner(denoising_start=0.8) on the
    same split, the refiner with its own text encoder and aesthetic-score time ids."""
    steps, kwargs = 10, dict(guidance_scale=5.0, output_type="latent")
    generator = torch.Generator().manual_seed(3)  # one stream: the refiner continues the base's noise
    latents = reference(xl["mods"], sampler)(PROMPT, generator=generator, num_inference_steps=steps, height=16,
                                              width=16, denoising_end=0.8, **kwargs).images
    expected = reference(xl["refiner_mods"], sampler, refiner=True)(
        PROMPT, image=latents, generator=generator, num_inference_steps=steps, denoising_start=0.8,
        **kwargs).images.numpy()
    pipe = ours(xl["folder"], refiner=xl["refiner_file"])
    (image,) = pipe(PROMPT, seed=3, steps=steps, guidance_scale=5.0, sampler=sampler, refiner_switch=0.8)
    assert_latents_close(image.latents, expected)
    assert image.params.extras["Refiner"] == f"refiner [{pipe.refiner.pipeline.info.hash}]"
    assert image.params.extras["Refiner switch at"] == "0.8"
    # The refiner matters: the base alone ends elsewhere.
    (alone,) = pipe(PROMPT, seed=3, steps=steps, guidance_scale=5.0, sampler=sampler, refiner_switch=1.0)
    assert np.abs(alone.latents - expected).max() > 100 * TOL_ULPS * EPS32 * np.abs(expected).max()
    assert "Refiner" not in alone.params.extras


def test_switch_step_follows_a1111_and_diffusers():
    """The base keeps the steps whose timestep is >= round(1000 * (1 - switch)): diffusers'
    denoising_end rule, and A1111's (999 - t) / 1000 >= switch for integer timesteps."""
    from coreml_sd.config import SchedulerConfig
    from coreml_sd.refiner import split_plan, switch_step
    from coreml_sd.schedules import make_plan

    config = SchedulerConfig.from_dict(T.SDXL_SCHEDULER)
    for steps in (10, 20, 25, 30, 37):
        plan = make_plan(config, "euler", steps)
        for switch in (0.5, 0.8, 0.9, 1.0):
            a1111 = next((i for i, t in enumerate(plan.timesteps) if (999 - round(t)) / 1000 >= switch), steps)
            assert switch_step(plan, switch) == a1111, (steps, switch)
        first, rest = split_plan(plan, switch_step(plan, 0.8))
        assert first.sigmas[-1] == rest.sigmas[0] and first.steps + rest.steps == steps
    assert switch_step(make_plan(config, "euler", 25), 0.8) == 20
    for bad in (0, 1.5, -0.2):
        with pytest.raises(InputError, match="refiner switch"):
            switch_step(make_plan(config, "euler", 10), bad)


def test_a_switch_without_a_refiner_is_refused(xl):
    with pytest.raises(InputError, match="needs a refiner"):
        ours(xl["file"])(PROMPT, seed=1, steps=2, refiner_switch=0.8)


def test_refiner_must_share_the_latent_space(xl):
    from dataclasses import replace

    from coreml_sd.refiner import check_compatible

    base, refiner = open_model(xl["file"]).info, open_model(xl["refiner_file"]).info
    check_compatible(base, refiner)
    with pytest.raises(ModelError, match="latents cannot continue"):
        check_compatible(base, replace(refiner, latent_channels=16))
    with pytest.raises(ModelError, match="convert both for the same size"):
        check_compatible(replace(base, sizes=((16, 16),)), replace(refiner, sizes=((32, 32),)))


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_single_files_load_every_tensor(xl, tmp_path, fmt, dtype):
    """fp16/fp32, .safetensors/.ckpt (through the restricted unpickler): every weight as written."""
    path = T.write_single_file(xl["mods"], tmp_path / f"xl.{fmt}", family="sdxl", dtype=dtype, fmt=fmt)
    mods = open_model(path).torch_modules(device="cpu", dtype=torch.float32)
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    for name in ("text_encoder", "text_encoder_2", "unet", "vae"):
        want, got = xl["mods"][name].state_dict(), getattr(mods, name).state_dict()
        assert set(want) <= set(got), name
        for key, value in want.items():
            assert torch.equal(value.to(torch_dtype).float(), got[key]), (name, key)


def test_diffusers_single_file_loader_reads_our_files(xl):
    """Our writer's original layout is what diffusers' own from_single_file reads (a local config)."""
    for file, folder, cls, names in (
            (xl["file"], xl["folder"], diffusers.StableDiffusionXLPipeline,
             ("text_encoder", "text_encoder_2", "unet", "vae")),
            (xl["refiner_file"], xl["refiner_folder"], diffusers.StableDiffusionXLImg2ImgPipeline,
             ("text_encoder_2", "unet", "vae"))):
        theirs = cls.from_single_file(str(file), config=str(folder), local_files_only=True)
        want = xl["refiner_mods"] if "refiner" in file.name else xl["mods"]
        for name in names:
            a, b = getattr(theirs, name).state_dict(), want[name].state_dict()
            assert set(b) <= set(a), name
            assert all(torch.equal(a[k], b[k]) for k in b), name


def test_single_file_layout_and_detection(xl):
    from coreml_sd.checkpoint.safeload import tensor_shapes

    shapes, _ = tensor_shapes(xl["file"])
    for key in ("conditioner.embedders.0.transformer.text_model.encoder.layers.2.mlp.fc2.weight",
                "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight",
                "conditioner.embedders.1.model.text_projection", "conditioner.embedders.1.model.logit_scale",
                "model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.label_emb.0.2.bias",
                "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
                "first_stage_model.decoder.up.0.block.0.conv1.weight"):
        assert key in shapes, key
    # OpenCLIP stores x @ P: (width, projection width)
    assert shapes["conditioner.embedders.1.model.text_projection"].shape == (48, 40)
    det = detect.classify(shapes)
    assert (det.family, det.text_encoder, det.context_dim, det.standard) == ("sdxl", "clip+openclip", 80, False)
    refiner = detect.classify(tensor_shapes(xl["refiner_file"])[0])
    assert (refiner.family, refiner.text_encoder) == ("sdxl-refiner", "openclip")


@pytest.mark.parametrize("name", ["sdxl", "sdxl-refiner"])
def test_full_size_files_are_recognised_and_their_unet_layout_round_trips(name):
    """A full-size SDXL / refiner file's keys (built on the meta device from the shipped config) detect
    as the family with its standard widths, and diffusers' converter reads our layout back."""
    from helpers_checkpoint import full_size_shapes

    from coreml_sd.checkpoint.loader import new_unet

    det = detect.classify(full_size_shapes(name))
    assert (det.family, det.standard, det.kind) == (name, True, "model")
    detect.require_model(det, f"{name}.safetensors")
    cfg = shipped_config(name)
    state = new_unet(cfg.unet).state_dict()
    if name == "sdxl":  # the published size of SDXL 1.0's UNet
        assert sum(v.numel() for v in state.values()) == 2_567_463_684
    back = keymap.unet_from_original(keymap.apply_mapper(keymap.unet_to_original(cfg.unet), state), cfg.unet)
    assert set(back) == set(state)


def test_file_without_vae_takes_one(xl, tmp_path):
    path = T.write_single_file(xl["mods"], tmp_path / "novae.safetensors", family="sdxl", with_vae=False)
    with pytest.raises(ModelError, match="has no VAE inside"):
        open_model(path)
    vae_file = tmp_path / "sdxl_vae.safetensors"
    from safetensors.torch import save_file

    save_file(keymap.apply_mapper(keymap.vae_to_original(xl["mods"]["vae"].config, prefix=""),
                                  xl["mods"]["vae"].state_dict()), str(vae_file))
    a = ours(path, vae=vae_file)(PROMPT, seed=2, steps=3)[0]
    b = ours(xl["file"])(PROMPT, seed=2, steps=3)[0]
    np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.params.extras["VAE"] == "sdxl_vae.safetensors"


def test_inspect_and_to_safetensors(xl, tmp_path):
    from coreml_sd.cli import main

    ckpt = T.write_single_file(xl["refiner_mods"], tmp_path / "refiner.ckpt", family="sdxl-refiner", fmt="ckpt")
    for path, family in ((xl["file"], "sdxl"), (ckpt, "sdxl-refiner")):
        report = json.loads(CliRunner().invoke(main, ["checkpoint", "inspect", "--json", str(path)]).stdout)
        assert (report["family"], report["supported"], report["prediction_type"]) == (family, True, "epsilon")
    result = CliRunner().invoke(main, ["checkpoint", "to-safetensors", str(ckpt)])
    assert result.exit_code == 0, result.output
    converted = ckpt.with_suffix(".safetensors")
    from coreml_sd.checkpoint.safeload import flat_state_dict, load_tensor_file

    a = flat_state_dict(load_tensor_file(ckpt)[0], ckpt)
    b = flat_state_dict(load_tensor_file(converted)[0], converted)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert open_model(converted).info.family == "sdxl-refiner"


def test_generate_cli_with_a_refiner(xl, tmp_path):
    from PIL import Image

    from coreml_sd.cli import main

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["generate", PROMPT, "--model", str(xl["file"]), "--refiner",
                                       str(xl["refiner_folder"]), "--refiner-switch", "0.7", "--steps", "5",
                                       "--seed", "4", "--backend", "torch", "--precision", "fp32", "--format", "png",
                                       "-o", str(out), "--json", "-q"])
    assert result.exit_code == 0, result.output
    (written,) = json.loads(result.stdout)["images"]
    text = Image.open(written["path"]).info["parameters"]
    assert "Refiner: refiner, Refiner switch at: 0.7" in text and "Size: 16x16" in text
    bad = CliRunner().invoke(main, ["generate", PROMPT, "--model", str(xl["file"]), "--refiner-switch", "0",
                                    "-o", str(out)])
    assert bad.exit_code == 2 and "refiner-switch" in bad.output


def test_refiner_with_reduce_memory_gives_the_same_image(xl):
    """--reduce-memory: each UNet is loaded for its part of the schedule and released after."""
    kwargs = dict(seed=9, steps=6, sampler="dpmpp_2m", refiner_switch=0.5)
    eager = ours(xl["file"], refiner=xl["refiner_folder"])(PROMPT, **kwargs)[0]
    pipe = ours(xl["file"], refiner=xl["refiner_folder"], reduce_memory=True)
    lean = pipe(PROMPT, **kwargs)[0]
    np.testing.assert_array_equal(lean.latents, eager.latents)
    assert not pipe.components.parts["unet"].is_loaded
    assert not pipe.refiner.pipeline.components.parts["unet"].is_loaded
