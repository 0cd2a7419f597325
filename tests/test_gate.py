"""The parity gate's machinery: fp32 references from fp16 weights, and the gate failing on planted
faults (a wrong weight, a wrong layout, fp16 overflow) with nothing written."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conversion.reference import fp32_compute
from conversion.verify import text_encoder_case, unet_case, vae_decoder_case


@pytest.fixture(scope="module")
def tiny16():
    from tiny_models import build_tiny_modules

    te, unet, vae = build_tiny_modules(seed=4)
    return te.half(), unet.half(), vae.half()


def _cases(te, unet, vae):

    def tokenizer(text):  # ids of a fixed length, like the CLIP tokenizer's
        return [49406] + [min(ord(c), 49405) for c in text[:75]] + [49407] * (76 - min(len(text), 75))

    _, te_refs = text_encoder_case(te, tokenizer)
    _, unet_refs = unet_case(unet, batch=2, latent_shape=(4, 8, 8), context_dim=32)
    _, vae_refs = vae_decoder_case(vae, latent_shape=(4, 8, 8))
    return {**te_refs, **unet_refs, **vae_refs}


def test_fp32_compute_equals_an_fp32_copy_of_the_model(tiny16):
    """The same numbers as `.float()` (whose code paths include diffusers' VAE decoder casting its
    activations to its parameters' dtype), while the weights stay fp16."""
    with fp32_compute():
        got = _cases(*tiny16)
    assert all(p.dtype == torch.float16 for m in tiny16 for p in m.parameters())
    expected = _cases(*(copy.deepcopy(m).float() for m in tiny16))
    assert set(got) == {"last_hidden_state", "pooled_outputs", "noise_pred", "image"}
    for name, ref in expected.items():
        np.testing.assert_array_equal(got[name], ref, err_msg=name)
