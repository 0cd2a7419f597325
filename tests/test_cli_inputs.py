"""Numbers, names and places a careless user types: usage errors exit 2 before any model loads."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from coreml_sd.cli import main
from coreml_sd.cli_checks import MAX_SEED

MISSING_MODEL = "/nonexistent/model.safetensors"  # loading it would be exit 1: exit 2 proves the check came first


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("args, needle", [
    (["-g", "nan"], "finite"),
    (["-g", "inf"], "finite"),
    (["--cfg-scale", "-inf"], "x>=0"),
    (["--num-images", "101"], "1<=x<=100"),
    (["--num-images", "1000000000"], "1<=x<=100"),
    (["--batch-size", "65"], "1<=x<=64"),
    (["--steps", "10000"], "1<=x<=1000"),
    (["--seed", str(MAX_SEED), "--num-images", "2"], "past 2**64-1"),
    (["--seed", str(MAX_SEED + 1)], "-1 (random) or between 0 and 2**64-1"),
    (["--seed", "-2"], "-1 (random)"),
    (["--threads", "0"], "1<=x<=1024"),
])
def test_bad_numbers_are_usage_errors_before_loading(tmp_path, args, needle):
    result = run("generate", "a cat", "--model", MISSING_MODEL, "-o", tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_the_largest_seed_for_the_count_is_accepted(tmp_path):
    """seed + num_images - 1 == 2**64 - 1 passes the check (and then fails only on the missing model)."""
    result = run("generate", "a cat", "--model", MISSING_MODEL, "--seed", MAX_SEED - 1, "--num-images", "2",
                 "-o", tmp_path / "out")
    assert result.exit_code == 1 and "model not found" in result.output


@pytest.mark.parametrize("option", ["-W", "-H"])
def test_convert_sides_are_bounded_like_generate(tmp_path, option):
    convert = run("convert", MISSING_MODEL, "-o", tmp_path / "m", option, "100000")
    generate = run("generate", "x", "--model", MISSING_MODEL, option, "100000")
    assert convert.exit_code == generate.exit_code == 2
    rule = "must be a multiple of 8 between 8 and 8192; got 100000"
    assert rule in convert.output and rule in generate.output


def test_verify_threshold_must_be_finite(tmp_path):
    result = run("verify", tmp_path, "--threshold", "nan")
    assert result.exit_code == 2 and "finite" in result.output


def test_an_output_under_a_file_fails_before_loading(tmp_path):
    """`-o somefile/sub` used to sample for 16 s, then raise NotADirectoryError."""
    blocker = tmp_path / "somefile"
    blocker.write_text("not a folder")
    result = run("generate", "a cat", "--model", MISSING_MODEL, "-o", blocker / "sub")
    assert result.exit_code == 1
    assert f"{blocker} is a file, not a folder" in result.output and "Traceback" not in result.output


def test_seed_minus_one_is_random_and_recorded(tmp_path):
    from coreml_sd.images import GenerationParams, read_parameters

    seeds = []
    for n in range(2):
        out = tmp_path / f"out{n}"
        result = run("generate", "a 7", "--seed", "-1", "--steps", "1", "-o", out, "--json")
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        (image,) = summary["images"]
        assert GenerationParams.from_a1111(read_parameters(image["path"])).seed == summary["seed"] == image["seed"]
        seeds.append(summary["seed"])
    assert seeds[0] != seeds[1] and all(0 <= s < 2**32 for s in seeds)


@pytest.mark.parametrize("name", ["builtin", "digits"])
def test_the_builtin_model_answers_to_both_names(name):
    info = run("info", name, "--json")
    assert info.exit_code == 0, info.output
    assert json.loads(info.stdout)["name"] == "digits"
    models = json.loads(run("models", "--json").stdout)
    assert {models[0]["name"], *models[0]["aliases"]} == {"builtin", "digits"}


@pytest.mark.parametrize("file, content, needle", [
    ("vocab.json", b"{not json", "not a tokenizer vocabulary"),
    ("vocab.json", b"[1, 2, 3]", "found list"),
    ("vocab.json", b'{"a": "b"}', "expected a non-negative integer"),
    ("vocab.json", b"\xff\xfe\x00garbage", "not a tokenizer vocabulary"),
    ("vocab.json", b'{"a</w>": 0}', "is not in the vocabulary"),
    ("merges.txt", b"#version: 0.2\na b c\n", "expected two symbols"),
    ("merges.txt", b"\xff\xfe garbage", "not UTF-8"),
])
def test_garbage_tokenizer_files_are_model_errors(tiny_diffusers_dir, tmp_path, file, content, needle):
    from coreml_sd.errors import ModelError
    from coreml_sd.sources import open_model

    folder = tmp_path / "model"
    shutil.copytree(tiny_diffusers_dir, folder)
    (folder / "tokenizer" / file).write_bytes(content)
    with pytest.raises(ModelError, match=needle):
        open_model(folder).tokenizer()
    result = run("generate", "a cat", "--model", folder, "--steps", "1", "-o", tmp_path / "out")
    assert result.exit_code == 1 and needle in result.output and "Traceback" not in result.output
