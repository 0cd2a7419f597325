"""The torch backend's CPU weight pre-packing changes speed, not results."""

import copy

import pytest

torch = pytest.importorskip("torch")

from coreml_sd.backends import cpu_prepack  # noqa: E402

pytestmark = pytest.mark.skipif(not cpu_prepack.available(), reason="this torch build has no oneDNN pointwise kernels")


@pytest.fixture(scope="module")
def modules():
    from tiny_models import build_tiny_modules

    return build_tiny_modules(seed=3)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
@pytest.mark.parametrize("side", [8, 16, 24])
def test_prepacked_unet_equals_plain(modules, dtype, atol, side):
    _, unet, _ = modules
    plain = copy.deepcopy(unet).to(dtype)
    packed = copy.deepcopy(plain)
    assert cpu_prepack.prepack(packed) == sum(
        type(m) in (torch.nn.Conv2d, torch.nn.Linear) for m in plain.modules())
    gen = torch.Generator().manual_seed(side)
    x = torch.randn(2, 4, side, side, generator=gen).to(dtype)
    h = torch.randn(2, 77, 32, generator=gen).to(dtype)
    t = torch.tensor([999.0, 10.0])
    with torch.inference_mode():
        expected = plain(x, t, encoder_hidden_states=h).sample.float()
        got = packed(x, t, encoder_hidden_states=h).sample.float()
    assert (got - expected).abs().max().item() <= atol
    assert packed.conv_in.weight.numel() == 0  # the plain copy was released


def test_prepacked_vae_and_text_encoder_equal_plain(modules):
    text_encoder, _, vae = modules
    for plain, run in ((vae, lambda m: m.decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))).sample),
                       (text_encoder, lambda m: m(torch.arange(77)[None] + 300)[0])):
        packed = copy.deepcopy(plain)
        cpu_prepack.prepack(packed)
        with torch.inference_mode():
            assert (run(packed) - run(plain)).abs().max().item() <= 1e-5


def test_wrong_input_dtype_is_a_clear_error(modules):
    _, unet, _ = modules
    packed = copy.deepcopy(unet)
    cpu_prepack.prepack(packed)
    with pytest.raises(TypeError, match="conv_in: packed for torch.float32"):
        packed.conv_in(torch.zeros(1, 4, 8, 8, dtype=torch.bfloat16))


@pytest.mark.parametrize("precision, packed", [
    ("bf16", {"text_encoder", "unet"}),  # the VAE decoder measured slower packed
    ("fp32", set()),                     # packing measured no faster in fp32
])
def test_loader_packs_only_where_it_measured_faster(modules, precision, packed):
    from coreml_sd.backends.torch_backend import prepack_for_cpu
    from coreml_sd.devices import torch_dtype
    from coreml_sd.sources import TorchModules

    text_encoder, unet, vae = (copy.deepcopy(m).to(torch_dtype(precision)) for m in modules)
    mods = TorchModules(text_encoder=text_encoder, unet=unet, vae=vae)
    for component in ("text_encoder", "unet", "vae_decoder"):
        prepack_for_cpu(mods, component, device="cpu", precision=precision)
        prepack_for_cpu(mods, component, device="cpu", precision=precision)  # a second call changes nothing
    layers = {"text_encoder": text_encoder, "unet": unet, "vae_decoder": vae}
    for name, module in layers.items():
        dense = [m for m in module.modules() if type(m) in (torch.nn.Conv2d, torch.nn.Linear)]
        assert dense and all(hasattr(m, "_packed_weight") == (name in packed) for m in dense), name
