"""Regenerate docs/digits-grid.png: the built-in model's digits, drawn by the project's own command.

    python training/make_grid.py [--model PATH] [--out docs/digits-grid.png]

Each row is one `coreml-sd generate PROMPT --seed 0 --num-images 8 ...` call (run as
`python -m coreml_sd generate`, CPU, fp32, euler_a, 25 steps, guidance 7.5); the script only
tiles the PNG files that command writes, scaled up 2x (nearest neighbour) with the prompt beside
each row. Without --model the command uses its default, the built-in model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS = (
    "a handwritten digit zero", "the number 1", "2", "three", "a handwritten digit four", "the number five",
    "6", "a handwritten digit seven", "eight", "the number 9",
    "a red handwritten digit seven", "the number 3 in blue", "a green 5",
    "a handwritten digit two, white on black",
)
COLUMNS = 8
SCALE = 2


def generate_row(prompt: str, out_dir: Path, model: str | None) -> list[Path]:
    cmd = [sys.executable, "-m", "coreml_sd", "generate", prompt, "--seed", "0", "--num-images", str(COLUMNS),
           "--sampler", "euler_a", "--steps", "25", "--guidance-scale", "7.5", "--device", "cpu",
           "--precision", "fp32", "--format", "png", "--output", str(out_dir), "--json", "--quiet"]
    if model:
        cmd += ["--model", model]
    print("$", " ".join(repr(c) if " " in c else c for c in cmd[1:]), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"coreml-sd generate failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return [Path(img["path"]) for img in json.loads(done.stdout)["images"]]


def tile(rows: list[tuple[str, list[Path]]], out: Path) -> None:
    from PIL import Image, ImageDraw

    first = Image.open(rows[0][1][0])
    w, h = first.width * SCALE, first.height * SCALE
    label_w = 300
    grid = Image.new("RGB", (label_w + w * COLUMNS, h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (prompt, paths) in enumerate(rows):
        draw.text((6, r * h + h // 2 - 6), f'"{prompt}"', fill="black")
        for c, path in enumerate(paths):
            tile_img = Image.open(path).convert("RGB").resize((w, h), Image.NEAREST)
            grid.paste(tile_img, (label_w + c * w, r * h))
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model path (default: the command's built-in model)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "digits-grid.png")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [(prompt, generate_row(prompt, Path(tmp) / f"row{i}", args.model)) for i, prompt in enumerate(ROWS)]
        tile(rows, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
