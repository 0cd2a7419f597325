"""Seeded fuzzing of converted folders and of image metadata read by --recipe: only clean errors
(a CoreMLSDError with one line, no other exception), never a silently different model.

Converted folders: manifest.json edited at random (keys dropped, values of other types, numbers
out of range, package names pointing elsewhere), weight files truncated or flipped, packages
swapped between components. Opening and loading on mil must either work — and then the packages
are the ones the manifest's hashes name — or raise a CoreMLSDError. Metadata: PNG text chunks and
EXIF UserComments of random bytes and mutated infotexts; read_recipe must give options with
warnings, or a CoreMLSDError.
"""

from __future__ import annotations

import copy
import json
import random
import shutil

import pytest
from helpers_runtime import shared_tiny_model

from coreml_sd.errors import CoreMLSDError

CASES = 60


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return shared_tiny_model(tmp_path_factory)[1]


def _mutate_value(rng: random.Random, value):
    choices = [None, "", "x" * 300, -1, 0, 2**70, 1.5, float("nan"), [], {}, [1, "a"], {"a": 1}, True]
    if isinstance(value, str) and rng.random() < 0.3:
        return rng.choice(["../" * rng.randint(1, 4) + value, "/etc/passwd", value + "x", value.upper()])
    return rng.choice(choices)


def _mutate_manifest(rng: random.Random, data: dict) -> dict:
    data = copy.deepcopy(data)
    for _ in range(rng.randint(1, 3)):
        parent, key = None, None
        node = data
        while isinstance(node, (dict, list)) and node:  # walk down to a random leaf, or stop at a container
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            parent, key = node, rng.choice(keys)
            node = node[key]
            if rng.random() < 0.3:
                break
        if parent is None:
            continue
        if isinstance(parent, dict) and rng.random() < 0.3:
            del parent[key]
        else:
            parent[key] = _mutate_value(rng, parent[key])
    return data


def _damage_files(rng: random.Random, root):
    weights = sorted(root.rglob("weight.bin"))
    target = rng.choice(weights)
    data = bytearray(target.read_bytes())
    if rng.random() < 0.5:
        target.write_bytes(bytes(data[: rng.randint(0, len(data) - 1)]))  # truncated
    else:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 0xFF
        target.write_bytes(bytes(data))  # same size, other bytes


def _swap_packages(rng: random.Random, root):
    packages = sorted(p for p in root.iterdir() if p.suffix == ".mlpackage")
    a, b = rng.sample(packages, 2)
    tmp = root / "swap.tmp"
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def _open_and_load(path):
    from coreml_sd.pipeline import Pipeline

    return Pipeline.load(path, backend="mil", device="cpu")


@pytest.mark.slow
def test_fuzzed_converted_folders_fail_cleanly(folder, tmp_path):
    from coreml_sd.model_folder import package_hash

    manifest = json.loads((folder / "manifest.json").read_text())
    rng = random.Random(20261202)
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(CASES):
        root = tmp_path / f"case{case}"
        shutil.copytree(folder, root)
        kind = rng.choice(["manifest", "files", "swap"])
        if kind == "manifest":
            (root / "manifest.json").write_text(json.dumps(_mutate_manifest(rng, manifest)))
        elif kind == "files":
            _damage_files(rng, root)
        else:
            _swap_packages(rng, root)
        try:
            pipe = _open_and_load(root)
        except CoreMLSDError as exc:
            assert "\n" not in str(exc).strip(), str(exc)
            outcomes["refused"] += 1
        else:
            # It loaded: then every package it runs is the one the manifest recorded (or the
            # manifest records none for it), so no changed weights ran silently.
            for name, info in pipe.source.manifest.components.items():
                if info.sha256:
                    assert package_hash(root / info.package) == info.sha256, (case, kind, name)
            assert kind == "manifest", (case, kind)  # damaged or swapped packages never load
            outcomes["loaded"] += 1
        shutil.rmtree(root)
    assert outcomes["refused"] > CASES // 2, outcomes


def test_fuzzed_image_metadata_reads_cleanly(tmp_path):
    from PIL import Image, PngImagePlugin

    from coreml_sd.recipe import read_recipe

    rng = random.Random(7)
    base = ("a cat, (masterpiece:1.2)\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, "
            "Seed: 42, Size: 512x768, Clip skip: 2, Model hash: abcdef1234")
    image = Image.new("RGB", (8, 8))
    for case in range(200):
        text = base
        if rng.random() < 0.5:
            text = "".join(chr(rng.randint(1, 0x2FF)) for _ in range(rng.randint(0, 200)))
        else:
            chars = list(text)
            for _ in range(rng.randint(1, 20)):
                chars[rng.randrange(len(chars))] = rng.choice([",", ":", "\n", '"', "x", "", "9", "\x00"])
            text = "".join(chars)
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", text.replace("\x00", ""))
        path = tmp_path / f"m{case}.png"
        image.save(path, pnginfo=info)
        try:
            recipe = read_recipe(path)
        except CoreMLSDError as exc:
            assert str(exc).strip()
        else:
            assert isinstance(recipe.options, dict)
