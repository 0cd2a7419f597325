"""Weighted, long prompts: AUTOMATIC1111's chunking and emphasis (modules/sd_hijack_clip.py), checked
against hand-derived chunk boundaries and against a direct computation on a tiny CLIP text model."""

import numpy as np
import pytest

from coreml_sd.errors import InputError
from coreml_sd.prompt_chunks import (
    apply_emphasis,
    encode_prompt_pair,
    encode_prompt_schedule,
    encode_texts,
    encode_weighted,
    pad_to_same_length,
    tokenize_weighted,
)
from coreml_sd.tokenizer import CLIPTokenizer

BOS, EOS = 49406, 49407
CAT, DOG, COMMA = 2368, 1929, 267  # "cat</w>", "dog</w>", ",</w>" in CLIP's vocabulary


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


def test_token_ids_are_checked_assumptions(tok):
    assert tok.encode("cat dog ,") == [CAT, DOG, COMMA]


def test_short_prompt_is_one_chunk_like_the_plain_tokenizer(tok):
    chunks = tokenize_weighted(tok, "a photo of a cat")
    assert chunks.ids.shape == (1, 77) and chunks.ids.dtype == np.int64
    assert chunks.ids[0].tolist() == tok("a photo of a cat")
    assert chunks.token_counts == (5,) and np.all(chunks.weights == 1.0)


def test_weights_follow_the_runs(tok):
    chunks = tokenize_weighted(tok, "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    expected_ids, expected_w = [], []
    for piece, weight in [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
                          (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)]:
        ids = tok.encode(piece)
        expected_ids += ids
        expected_w += [weight] * len(ids)
    n = len(expected_ids)
    assert chunks.ids[0, 1:n + 1].tolist() == expected_ids and chunks.ids[0, n + 1] == EOS
    np.testing.assert_allclose(chunks.weights[0, 1:n + 1], expected_w, rtol=1e-6)
    assert chunks.weights[0, 0] == 1.0 and np.all(chunks.weights[0, n + 1:] == 1.0)


def _phrases(count: int, words: int) -> str:
    return ", ".join(" ".join(["cat"] * words) for _ in range(count))


def test_comma_backtrack_on_a_200_token_prompt(tok):
    # 20 phrases of 10 "cat" tokens joined by commas: 219 tokens. When the first chunk fills at 75
    # tokens, the last comma is at index 65 (10 tokens back, within 20), so the 9 tokens after it move
    # on: every chunk ends with the comma of its 6th phrase (66 tokens), and 21 tokens remain.
    prompt = _phrases(20, 10)
    assert len(tok.encode(prompt)) == 219
    chunks = tokenize_weighted(tok, prompt)
    assert chunks.token_counts == (66, 66, 66, 21)
    for row in chunks.ids[:3]:
        assert row[0] == BOS and row[66] == COMMA and row[67] == EOS and row[65] == CAT
    assert chunks.ids[1, 1:11].tolist() == [CAT] * 10  # the moved phrase is whole in the next chunk
    # Without the backtrack (AUTOMATIC1111's setting at 0) the chunks are cut at 75 tokens.
    assert tokenize_weighted(tok, prompt, comma_backtrack=0).token_counts == (75, 75, 69)


def test_no_backtrack_when_the_comma_is_more_than_20_tokens_back(tok):
    chunks = tokenize_weighted(tok, _phrases(3, 30))  # commas at 30 and 61: the chunk fills 14 after 61
    assert chunks.token_counts == (62, 30)  # 14 <= 20: moved
    chunks = tokenize_weighted(tok, _phrases(2, 50))  # comma at 50, chunk fills 25 tokens later
    assert chunks.token_counts == (75, 26)


def test_break_starts_a_new_chunk(tok):
    assert tokenize_weighted(tok, "a cat BREAK a dog").token_counts == (2, 2)
    assert tokenize_weighted(tok, "a cat BREAK").token_counts == (2,)
    lead = tokenize_weighted(tok, "BREAK a dog")  # as in AUTOMATIC1111: an empty first chunk
    assert lead.token_counts == (0, 2) and lead.ids[0].tolist() == tok("")


def test_prompt_ending_exactly_at_a_chunk_boundary(tok):
    assert tokenize_weighted(tok, " ".join(["cat"] * 75)).token_counts == (75,)
    assert tokenize_weighted(tok, " ".join(["cat"] * 76)).token_counts == (75, 1)
    assert tokenize_weighted(tok, "").token_counts == (0,)


def test_embedding_in_a_weighted_span_is_kept_whole(tok):
    tok = CLIPTokenizer()
    vectors = [49408, 49409, 49410]  # a 3-vector textual-inversion embedding
    tok.add_trigger("mystyle", vectors)
    chunks = tokenize_weighted(tok, "a cat, (mystyle:1.3)")
    assert chunks.ids[0, 1:7].tolist() == [320, CAT, COMMA, *vectors]
    np.testing.assert_allclose(chunks.weights[0, 4:7], [1.3] * 3, rtol=1e-6)
    near_end = tokenize_weighted(tok, " ".join(["cat"] * 73) + " mystyle")  # 73 + 3 > 75
    assert near_end.token_counts == (73, 3) and near_end.ids[1, 1:4].tolist() == vectors


def test_embedding_longer_than_a_chunk_is_refused():
    tok = CLIPTokenizer()
    tok.add_trigger("huge", list(range(49408, 49408 + 80)))
    with pytest.raises(InputError, match="80 vectors"):
        tokenize_weighted(tok, "huge")


def test_sd2_padding_after_the_first_eos():
    tok = CLIPTokenizer(pad_token="!")
    row = tokenize_weighted(tok, "a cat BREAK dog").ids[0].tolist()
    assert row[:4] == [BOS, 320, CAT, EOS] and row[4:] == [0] * 73


def test_emphasis_none_reads_brackets_as_text(tok):
    chunks = tokenize_weighted(tok, "(cat:1.2) BREAK dog", emphasis="None")
    assert chunks.ids[0].tolist() == tok("(cat:1.2) BREAK dog") and np.all(chunks.weights == 1.0)
    with pytest.raises(InputError, match="Original, No norm, Ignore, None"):
        tokenize_weighted(tok, "cat", emphasis="strong")


# ---------------------------------------------------------------------------------------------
# Emphasis on encoder outputs


def test_apply_emphasis_restores_the_mean_numpy_and_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((2, 77, 8)).astype(np.float32) + 0.3
    weights = rng.uniform(0.5, 1.5, (2, 77)).astype(np.float32)
    out = apply_emphasis(hidden, weights)
    expected = hidden * weights[..., None]
    expected = expected * (hidden.mean() / expected.mean())  # one mean over the whole batch
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert out.mean() == pytest.approx(hidden.mean(), rel=1e-5)
    out_t = apply_emphasis(torch.from_numpy(hidden), torch.from_numpy(weights))
    assert isinstance(out_t, torch.Tensor)
    np.testing.assert_allclose(out_t.numpy(), out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(apply_emphasis(hidden, weights, "No norm"), hidden * weights[..., None], rtol=1e-6)
    assert apply_emphasis(hidden, weights, "Ignore") is hidden


# ---------------------------------------------------------------------------------------------
# On a tiny CLIP text model, against a direct computation of AUTOMATIC1111's algorithm


@pytest.fixture(scope="module")
def text_model():
    torch = pytest.importorskip("torch")
    from tiny_models import TEXT_CONFIG
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(3)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)).eval()
    # A fresh final LayerNorm (bias 0) gives outputs of mean ~0, where restoring the mean divides
    # rounding noise by rounding noise; real CLIP outputs have a clear mean, so give it one.
    with torch.no_grad():
        text_encoder.final_layer_norm.bias.copy_(0.3 + 0.1 * torch.randn(32))

    def encode_chunk(ids):
        with torch.no_grad():
            return text_encoder(torch.as_tensor(ids))[0]

    return text_encoder, encode_chunk


def _direct(text_encoder, chunk_tokens, chunk_weights):
    """AUTOMATIC1111 by hand: each chunk BOS + tokens + EOS-padding, encoded alone, weighted, mean restored."""
    import torch

    outs = []
    for tokens, weights in zip(chunk_tokens, chunk_weights):
        ids = [BOS, *tokens] + [EOS] * (76 - len(tokens))
        w = torch.tensor([1.0, *weights] + [1.0] * (76 - len(weights)))
        with torch.no_grad():
            z = text_encoder(torch.tensor([ids]))[0]
        weighted = z * w[None, :, None]
        outs.append(weighted * (z.mean() / weighted.mean()))
    return torch.cat(outs, dim=1)


def test_long_weighted_prompt_equals_direct_computation(text_model, tok):
    text_encoder, encode_chunk = text_model
    # 1 + 100 + 60 tokens, no commas: chunks of 75, 75 and 11 tokens.
    prompt = "(cat:1.3) " + "dog " * 100 + "[cat] " * 60
    tokens = [CAT] + [DOG] * 100 + [CAT] * 60
    weights = [1.3] + [1.0] * 100 + [1 / 1.1] * 60
    expected = _direct(text_encoder, [tokens[:75], tokens[75:150], tokens[150:]],
                       [weights[:75], weights[75:150], weights[150:]])
    got = encode_weighted(encode_chunk, tok, prompt)
    assert tuple(got.shape) == (1, 231, 32)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)
    # The same through a numpy-returning encoder (Core ML's kind).
    as_numpy = encode_weighted(lambda ids: encode_chunk(ids).numpy(), tok, prompt)
    assert isinstance(as_numpy, np.ndarray)
    np.testing.assert_allclose(as_numpy, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_break_and_weights_equal_direct_computation(text_model, tok):
    text_encoder, encode_chunk = text_model
    got = encode_weighted(encode_chunk, tok, "a (cat:1.5) BREAK [dog]")
    expected = _direct(text_encoder, [[320, CAT], [DOG]], [[1.0, 1.5], [1 / 1.1]])
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_prompt_editing_texts_share_one_emphasis_mean(text_model, tok):
    """AUTOMATIC1111 encodes a prompt's edited variants as one batch: one mean over both."""
    import torch

    text_encoder, encode_chunk = text_model
    schedule = encode_prompt_schedule(encode_chunk, tok, "a [(cat:1.4):dog:2]", 4)
    assert [end for end, _ in schedule] == [2, 4]
    ids = torch.tensor([[BOS, 320, CAT] + [EOS] * 74, [BOS, 320, DOG] + [EOS] * 74])
    w = torch.ones(2, 77)
    w[0, 2] = 1.4
    with torch.no_grad():
        z = text_encoder(ids)[0]
    weighted = z * w[..., None]
    expected = weighted * (z.mean() / weighted.mean())
    got = torch.cat([h for _, h in schedule])
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_shorter_texts_get_empty_chunks_and_pairs_pad_to_one_length(text_model, tok):
    import torch

    _, encode_chunk = text_model
    long_prompt = "dog " * 80
    empty = encode_weighted(encode_chunk, tok, "")
    batch = encode_texts(encode_chunk, tok, [long_prompt, "a cat"])
    assert tuple(batch.shape) == (2, 154, 32)
    torch.testing.assert_close(batch[1, 77:], empty[0], rtol=1e-5, atol=1e-5)
    cond, uncond = encode_prompt_pair(encode_chunk, tok, long_prompt, "a cat")
    assert cond.shape == uncond.shape == (1, 154, 32)
    torch.testing.assert_close(uncond[:, :77], encode_weighted(encode_chunk, tok, "a cat"))
    torch.testing.assert_close(uncond[:, 77:], empty)
    padded_cond, padded_uncond = pad_to_same_length(uncond[:, :77], cond, empty)  # the other way round
    assert torch.equal(padded_cond[:, 77:], empty) and padded_uncond is cond
