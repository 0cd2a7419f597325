"""AUTOMATIC1111's prompt syntax: its documented examples (docstrings of modules/prompt_parser.py, the
wiki's "Features" page) reproduced by coreml_sd.prompt_syntax."""

import pytest

from coreml_sd.errors import InputError
from coreml_sd.prompt_syntax import parse_attention, prompt_schedule, schedule_index, text_at_step, uses_emphasis

# ---------------------------------------------------------------------------------------------
# Emphasis: AUTOMATIC1111's parse_prompt_attention doctests


@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
])
def test_attention_doctests(text, expected):
    assert parse_attention(text) == expected


def test_documented_house_example():
    runs = parse_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    assert [p for p, _ in runs] == ["a ", "house", " ", "on", " a ", "hill", ", sun, ", "sky", "."]
    assert [w for _, w in runs] == pytest.approx([1.0, 1.573, 1.1, 1.0, 1.1, 0.55, 1.1, 1.4641, 1.1], rel=1e-12)


@pytest.mark.parametrize("text, weight", [  # the wiki's cheat sheet
    ("a (word)", 1.1), ("a ((word))", 1.21), ("a [word]", 1 / 1.1), ("a (word:1.5)", 1.5),
    ("a (word:0.25)", 0.25), ("a ( word : 1.3 )", 1.3), ("a [[word]]", 1 / 1.21),
])
def test_cheat_sheet_weights(text, weight):
    runs = parse_attention(text)
    assert runs[0] == ("a ", 1.0) and runs[1][1] == pytest.approx(weight, rel=1e-12)


def test_escapes_are_literal_characters():
    assert parse_attention("anime_\\(character\\), \\[x\\]") == [("anime_(character), [x]", 1.0)]
    assert parse_attention("a\\\\b") == [("a\\b", 1.0)]  # "\\" is one backslash
    assert parse_attention("a\\b") == [("ab", 1.0)]  # a lone backslash vanishes, as in AUTOMATIC1111


def test_unbalanced_and_unmatched_brackets():
    runs = parse_attention("a (b [c")  # both unclosed: they weigh everything after them
    assert runs[0] == ("a ", 1.0) and runs[1] == ("b ", pytest.approx(1.1))
    assert runs[2][0] == "c" and runs[2][1] == pytest.approx(1.0)  # 1.1 / 1.1
    assert parse_attention("a) b] c:d") == [("a) b] c:d", 1.0)]  # closers without openers are text
    assert parse_attention("x:1.2) y") == [("x:1.2) y", 1.0)]


def test_break():
    assert parse_attention("a cat BREAK a dog") == [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]
    assert parse_attention("xBREAK BREAKy break") == [("xBREAK BREAKy break", 1.0)]  # a whole, upper-case word
    # As in AUTOMATIC1111, a BREAK inside brackets has its marker weighted too and so is read as a word.
    assert parse_attention("(a BREAK b)")[1] == ("BREAK", pytest.approx(-1.1))


def test_bad_weight_is_a_clear_error():
    with pytest.raises(InputError, match="'1.2.3' is not a number"):
        parse_attention("(cat:1.2.3)")


def test_uses_emphasis():
    assert uses_emphasis("a (cat)") and uses_emphasis("[x]")
    assert not uses_emphasis("a cat BREAK dog") and not uses_emphasis("\\(x\\)")


# ---------------------------------------------------------------------------------------------
# Prompt editing and alternation: get_learned_conditioning_prompt_schedules doctests (10 steps)


@pytest.mark.parametrize("prompt, expected", [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)]),
    ("[fe|]male", [(s, "female" if s % 2 else "male") for s in range(1, 11)]),
    ("[fe|||]male", [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
    # Its docstring still shows [[5, 'a  c'], [10, 'a {b|d{ c']] here, from before alternation; the
    # grammar it ships now (run with lark 1.3.1) cannot parse the "|" and uses the prompt whole.
    ("a [{b|d{:.5] c", [(10, "a [{b|d{:.5] c")]),
])
def test_schedule_doctests(prompt, expected):
    assert prompt_schedule(prompt, 10) == expected


def test_documented_landscape_example():
    prompt = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
              "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]")
    assert prompt_schedule(prompt, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]


def test_when_numbers():
    # Since AUTOMATIC1111 1.6.0 a decimal point means a fraction ("1.0": the end), else a step count.
    assert prompt_schedule("a [b:c:1.0]", 10) == [(10, "a b")]
    assert prompt_schedule("a [b:c:1]", 10) == [(1, "a b"), (10, "a c")]
    assert prompt_schedule("a [b:c:25]", 10) == [(10, "a b")]  # past the end: never switches
    assert prompt_schedule("a [b:c:0]", 10) == [(10, "a c")]
    assert prompt_schedule("a [b:c:1e999]", 10) == [(10, "a b")]  # no overflow
    # "Old prompt editing timelines": any value under 1 is a fraction, 1.0 is step 1.
    assert prompt_schedule("a [b:c:1.0]", 10, old_timelines=True) == [(1, "a b"), (10, "a c")]
    assert prompt_schedule("a [b:c:0.5]", 10, old_timelines=True) == [(5, "a b"), (10, "a c")]


def test_unparsable_prompts_are_used_whole():
    assert prompt_schedule("a | b [c:d:2]", 10) == [(10, "a | b [c:d:2]")]  # "|" outside an alternation
    assert prompt_schedule("(a|b) [c:d:2]", 10) == [(10, "(a|b) [c:d:2]")]
    assert prompt_schedule("[c:d:2] trailing \\", 10) == [(10, "[c:d:2] trailing \\")]



def test_deeply_nested_brackets_do_not_exhaust_the_stack():
    deep = "(" * 1000  # unclosed, so text, and the edit after them still counts
    assert prompt_schedule(deep + "[a:b:2]", 10) == [(2, deep + "a"), (10, deep + "b")]


def test_escaped_brackets_are_not_editing():
    assert prompt_schedule("\\[a:b:2\\]", 10) == [(10, "\\[a:b:2\\]")]


def test_schedule_index_follows_a1111_step_counting():
    # AUTOMATIC1111 picks, for the denoiser call after n earlier calls, the first entry ending at
    # or after n: alternation therefore runs a, a, b, a, b ... and an edit at 3 holds for 4 calls.
    alternating = prompt_schedule("[a|b]", 6)
    assert [alternating[schedule_index(alternating, n)][1] for n in range(6)] == ["a", "a", "b", "a", "b", "a"]
    edited = prompt_schedule("[x:y:3]", 6)
    assert [edited[schedule_index(edited, n)][1] for n in range(6)] == ["x", "x", "x", "x", "y", "y"]
    assert schedule_index(edited, 99) == 0  # more calls than planned: back to the first entry, as A1111
    assert text_at_step("a [cat:dog:0.5]", 10, 7) == "a dog"


def test_steps_must_be_positive():
    with pytest.raises(InputError, match="at least 1 step"):
        prompt_schedule("a", 0)
