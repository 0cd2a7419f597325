"""The command line: help everywhere, usage errors exit 2 with the rule, model errors in one line."""

import json

import pytest
from click.testing import CliRunner

from coreml_sd import __version__
from coreml_sd.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_version_and_help():
    assert run("--version").output.strip().endswith(__version__)
    for cmd in [()] + [(name,) for name in main.commands]:
        result = run(*cmd, "--help")
        assert result.exit_code == 0 and "Usage:" in result.output, cmd


@pytest.mark.parametrize("args, needle", [
    (["--sampler", "DPM++ 4M"], "euler_a"),
    (["--format", "gif"], "jpeg"),
    (["--schedule", "cosine"], "karras"),
    (["--eta", "-1"], "x>=0"),
    (["--width", "500"], "multiple of 8"),
    (["--height", "4"], "multiple of 8"),
    (["--width", "100000"], "multiple of 8"),
    (["--steps", "0"], "1<=x<=1000"),
    (["--num-images", "0"], "1<=x<=100"),
    (["--seed", "-3"], "-1 (random) or between 0 and 2**64-1"),
    (["--device", "tpu"], "cuda"),
])
def test_usage_errors_exit_2_with_the_rule(tmp_path, args, needle):
    result = run("generate", "a cat", "--model", tmp_path, "--output", tmp_path / "out", *args)
    assert result.exit_code == 2
    assert needle in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("make, needle", [
    (lambda p: p / "does-not-exist", "model not found"),
    (lambda p: p, "expected a diffusers model folder"),
    (lambda p: (p / "model.bin").write_bytes(b"junk") or p / "model.bin", "expected"),
])
def test_model_errors_are_one_line(tmp_path, make, needle):
    model = make(tmp_path)
    result = CliRunner().invoke(main, ["generate", "cat", "--model", str(model), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert needle in result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_generate_writes_images_with_metadata(tiny_diffusers_dir, tmp_path):
    from coreml_sd.images import GenerationParams, read_parameters

    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "generate", "a red cat / ../../evil\x00", "--model", str(tiny_diffusers_dir), "--seed", "7",
        "--num-images", "2", "--steps", "3", "--format", "png", "--device", "cpu", "--precision", "fp32",
        "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    paths = [img["path"] for img in summary["images"]]
    assert [img["seed"] for img in summary["images"]] == [7, 8]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.split("/")[-1] for p in paths)
    assert all(name.startswith("a-red-cat-evil-s") for name in (p.name for p in out.iterdir()))
    params = GenerationParams.from_a1111(read_parameters(paths[1]))
    assert (params.seed, params.steps, params.sampler, params.width) == (8, 3, "Euler a", 16)
    assert summary["parameters"]["steps"] == 3 and summary["runs_on"]["unet"] == "torch cpu fp32"


def test_models_lists_the_builtin_default():
    result = run("models", "--json")
    assert result.exit_code == 0
    (entry,) = json.loads(result.output)
    assert entry["name"] == "builtin" and entry["default"] and entry["native_size"] == "32x32"
    assert entry["path"].endswith("digits.safetensors") and entry["size_bytes"] < 10_000_000


def test_generate_without_model_uses_the_builtin(tmp_path):
    result = CliRunner().invoke(main, ["generate", "the number 3", "--seed", "1", "--steps", "2", "--json",
                                       "--device", "cpu", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["model"] == "digits" and summary["parameters"]["width"] == 32
    assert len(list(tmp_path.iterdir())) == 1
