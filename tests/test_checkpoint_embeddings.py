"""Textual-inversion embeddings: the trigger word's vectors reach the text encoder, checked directly."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from helpers_checkpoint import save_safetensors, write_a1111_pt, write_parameterdict_pt  # noqa: E402

from coreml_sd.checkpoint.embeddings import load_embedding  # noqa: E402
from coreml_sd.errors import ModelError  # noqa: E402
from coreml_sd.sources import open_model  # noqa: E402
from coreml_sd.tokenizer import CLIPTokenizer  # noqa: E402

WIDTH = 32  # the tiny text encoder's


def vectors(n, seed=0, width=WIDTH):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("form", ["a1111_pt", "parameterdict_pt", "a1111_safetensors", "diffusers_bin"])
def test_formats_load_their_vectors(tmp_path, form):
    vecs = vectors(3)
    path = {
        "a1111_pt": lambda: write_a1111_pt(tmp_path / "mystyle.pt", vecs),
        "parameterdict_pt": lambda: write_parameterdict_pt(tmp_path / "mystyle.pt", vecs),
        "a1111_safetensors": lambda: save_safetensors({"emb_params": vecs}, tmp_path / "mystyle.safetensors"),
        "diffusers_bin": lambda: torch.save({"<my-style>": vecs[0]}, tmp_path / "mystyle.bin")
        or tmp_path / "mystyle.bin",
    }[form]()
    emb = load_embedding(path)
    assert emb.name == "mystyle"
    expected = vecs[:1] if form == "diffusers_bin" else vecs
    assert torch.equal(emb.vectors, expected)


def test_trigger_word_reaches_the_text_encoder(tiny_diffusers_dir, tmp_path):
    vecs = vectors(2, seed=3)
    path = write_a1111_pt(tmp_path / "MyStyle.pt", vecs)
    plain = open_model(tiny_diffusers_dir)
    source = open_model(tiny_diffusers_dir, embeddings=[path])
    prompt = "a mystyle cat, by MyStyle"
    tok = source.tokenizer()
    ids = tok(prompt)
    new = [49408, 49409]
    base_tok = CLIPTokenizer()
    assert ids[:7] == [base_tok.bos_id, *base_tok.encode("a"), *new, *base_tok.encode("cat,"), *base_tok.encode("by")]
    assert ids[7:9] == new
    assert plain.tokenizer()(prompt) != ids
    assert source.generation_extras["TI hashes"].startswith("MyStyle: ")

    with_emb = source.torch_modules(device="cpu", dtype=torch.float32).text_encoder
    base = plain.torch_modules(device="cpu", dtype=torch.float32).text_encoder
    got = with_emb(torch.tensor([ids])).last_hidden_state
    # Direct computation: the unmodified encoder, its token-embedding output overwritten with the
    # embedding's vectors at the trigger positions.
    positions = [i for i, t in enumerate(ids) if t in new]
    placeholder = [base_tok.eos_id if t in new else t for t in ids]

    def substitute(module, inputs, output):
        output = output.clone()
        output[0, positions] = torch.cat([vecs, vecs])
        return output

    handle = base.get_input_embeddings().register_forward_hook(substitute)
    try:
        expected = base(torch.tensor([placeholder])).last_hidden_state
    finally:
        handle.remove()
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, base(torch.tensor([placeholder])).last_hidden_state, atol=1e-3)


def test_embedding_for_another_width_is_refused(tiny_diffusers_dir, tmp_path):
    path = save_safetensors({"emb_params": vectors(1, width=768)}, tmp_path / "sd1style.safetensors")
    with pytest.raises(ModelError, match=r"768 wide \(SD 1.x\).*32 wide"):
        open_model(tiny_diffusers_dir, embeddings=[path])
    xl = save_safetensors({"clip_l": vectors(1, width=768), "clip_g": vectors(1, width=1280)},
                          tmp_path / "xl.safetensors")
    with pytest.raises(ModelError, match="SDXL embedding"):
        open_model(tiny_diffusers_dir, embeddings=[xl])


def test_not_an_embedding(tmp_path):
    path = save_safetensors({"a": torch.zeros(2, 2), "b": torch.zeros(3)}, tmp_path / "junk.safetensors")
    with pytest.raises(ModelError, match="not a textual-inversion embedding"):
        load_embedding(path)
