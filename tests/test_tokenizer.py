"""Our pure-Python CLIP tokenizer against transformers' CLIPTokenizer on the same vocabulary."""

import pytest

from coreml_sd.errors import ModelError
from coreml_sd.tokenizer import CLIPTokenizer, bundled_files

PROMPTS = [
    "",
    " ",
    "a photo of an astronaut riding a horse on mars",
    "Ünïcödé café 東京 😀 naïve İstanbul straße",
    "🤖🤖🤖 ﬁ Ⅻ ① ½ ™",
    "(masterpiece:1.2), ((best quality)), [blurry:0.5], {a|b}, <lora:detail:0.8>",
    "a\x00b\tc\n\nd\u00a0e\u3000f\r\n",
    "it's they're I'm we've you'll he'd",
    "1234567 3.14 1e-5 #hashtag @user a/b\\c",
    "<|startoftext|>x<|endoftext|> hi",
    "word " * 100,  # over 77 tokens: truncated, EOS kept last
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "ALL CAPS PROMPT, MiXeD cAsE",
]


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    files = bundled_files()
    return transformers.CLIPTokenizer(str(files.vocab), str(files.merges))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_equal_transformers(reference, prompt):
    ours = CLIPTokenizer()
    expected = reference(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert ours(prompt) == expected


def test_long_prompt_truncated_with_eos_last():
    ids = CLIPTokenizer()("word " * 100)
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407


def test_sd2_padding_token():
    tok = CLIPTokenizer(pad_token="!")
    ids = tok("a cat")
    assert ids[:4] == [49406, 320, 2368, 49407] and ids[4:] == [0] * 73


def test_unknown_pad_token_is_rejected():
    with pytest.raises(ModelError, match="pad token"):
        CLIPTokenizer(pad_token="<|nope|>")
