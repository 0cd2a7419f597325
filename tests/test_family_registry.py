"""The family registry is the one place that knows a family: a new one, with an extra UNet input, is a
few lines here and then opens, generates on torch, converts and generates on mil like any other."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import TEXT_CONFIG, UNET_CONFIG, build_tiny_modules

from coreml_sd import families
from coreml_sd.checkpoint.writer import config_from_modules, write_original_checkpoint
from coreml_sd.checkpoint.config import sidecar_path
from coreml_sd.config import SchedulerConfig
from coreml_sd.errors import ModelError
from coreml_sd.families import ExtraInput, Family, TextEncoderSpec
from coreml_sd.metrics import image_psnr
from coreml_sd.pipeline import Pipeline
from coreml_sd.sources import open_model

PROMPT = "a red apple on a table"


@pytest.fixture
def fake_family():
    # The whole declaration: SD 1.x's single-file layout, plus a UNet input "class_labels" computed
    # from the text encoder's pooled output and given to diffusers' UNet as class_labels.
    family = families.register_family(Family(
        "fake-cls", "test family: SD1 layout, pooled text embedding as class labels",
        (TextEncoderSpec("text_encoder", "clip", 32, pooled=True),), context_dim=32,
        extra_inputs=(ExtraInput("class_labels", "pooled", diffusers_arg="class_labels"),),
        unet_config={"class_embed_type": "projection"}))
    yield family
    families.unregister_family(family.name)


@pytest.fixture
def fake_checkpoint(fake_family, tmp_path):
    unet_config = dict(UNET_CONFIG, class_embed_type="projection",
                       projection_class_embeddings_input_dim=TEXT_CONFIG["hidden_size"])
    text_encoder, unet, vae = build_tiny_modules(seed=3, unet_config=unet_config)
    with torch.no_grad():  # the class embedding must matter: diffusers initialises it like any layer
        unet.class_embedding.linear_2.weight.mul_(20)
    path = tmp_path / "fake.safetensors"
    write_original_checkpoint(text_encoder, unet, vae, path, dtype="fp32", family=fake_family.name)
    config_from_modules(text_encoder, unet, vae, family=fake_family.name,
                        scheduler=SchedulerConfig(steps_offset=1, set_alpha_to_one=False)).write(sidecar_path(path))
    return path, text_encoder


def _class_labels_seen(pipe):
    seen = []
    pipe.components["unet"].module.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["class_labels"].clone()), with_kwargs=True)
    return seen


def test_a_registered_family_generates_on_torch_with_its_extra_input(fake_checkpoint):
    path, text_encoder = fake_checkpoint
    source = open_model(path)
    assert source.info.family == "fake-cls" and source.info.spec.extra_inputs[0].name == "class_labels"
    pipe = Pipeline.load(path, backend="torch", device="cpu", precision="fp32")
    seen = _class_labels_seen(pipe)
    image = pipe(PROMPT, seed=1, steps=4)[0]
    # The class labels the UNet got: unconditional row (empty prompt), then the prompt's pooled output.
    with torch.no_grad():
        ids = [torch.tensor([pipe.tokenizer(t)]) for t in ("", PROMPT)]
        expected = torch.cat([text_encoder(i).pooler_output for i in ids])
    assert len(seen) == 4
    torch.testing.assert_close(seen[0], expected, rtol=1e-5, atol=1e-5)
    # ... and they change the image: the same model with the class embedding silenced differs.
    pipe.components["unet"].module.class_embedding.linear_2.weight.zero_()
    pipe.components["unet"].module.class_embedding.linear_2.bias.zero_()
    silenced = pipe(PROMPT, seed=1, steps=4)[0]
    assert np.abs(image.latents - silenced.latents).max() > 1e-2


def test_a_registered_family_converts_and_runs_on_mil(fake_checkpoint, tmp_path):
    from conversion.convert import convert_model

    path, _ = fake_checkpoint
    result = convert_model(open_model(path), tmp_path / "fake-coreml")
    unet_inputs = {s.name: s.shape for s in result.manifest.components["unet"].inputs}
    assert result.manifest.family == "fake-cls" and unet_inputs["class_labels"] == (2, 32)
    kwargs = dict(seed=1, steps=6, sampler="euler")
    torch_image = Pipeline.load(path, backend="torch", device="cpu", precision="fp32")(PROMPT, **kwargs)[0]
    mil_image = Pipeline.load(result.path, backend="mil", device="cpu")(PROMPT, **kwargs)[0]
    assert image_psnr(mil_image.image, torch_image.image) >= 30


def test_unknown_and_duplicate_families_are_named(fake_family):
    with pytest.raises(ModelError, match="unknown model family 'sd9'; known: sd1, sd2, sd2-v"):
        families.get_family("sd9")
    with pytest.raises(ValueError, match="already registered"):
        families.register_family(fake_family)


def test_nothing_outside_the_registry_compares_family_names():
    """Acceptance of the model contract: family names are compared only in coreml_sd/families.py."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"""(family|\.name)\s*(==|!=|in)\s*\(?["'](sd1|sd2|sd2-v|sdxl|sdxl-refiner)["']""")
    found = [f"{p.relative_to(root)}:{i}" for d in ("coreml_sd", "conversion") for p in (root / d).rglob("*.py")
             if p.name != "families.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []
