"""Measure a digits model through the project's own Pipeline: the numbers the quality test checks.

    python training/evaluate_digits.py MODEL [--config CONFIG.json] [--device cpu] [--json out.json]

MODEL is a diffusers folder or a single-file checkpoint (with its config); prints, per sampler, the
share of seeds 0-49 (prompt forms of training/digits_classifier.py) recognised as the prompted digit at
guidance 7.5, then guidance 1.0, a negative prompt naming the digit, and the attribute prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from training.digits_classifier import WORDS, accuracy, look, user_prompt  # noqa: E402

SAMPLERS = ("euler_a", "euler", "ddim", "dpmpp_2m")


def images(pipe, prompts, *, sampler="euler_a", guidance=7.5, negative=None, steps=25):
    out = []
    for i, (prompt, seed) in enumerate(prompts):
        neg = negative[i] if negative else ""
        out.extend(r.image for r in pipe(prompt, negative_prompt=neg, seed=seed, sampler=sampler, steps=steps,
                                         guidance_scale=guidance))
    return out


def evaluate(pipe, seeds=range(50), samplers=SAMPLERS) -> dict:
    prompts = [user_prompt(s) for s in seeds]
    pairs = [(p, s) for s, (p, _) in zip(seeds, prompts)]
    digits = [d for _, d in prompts]
    res = {}
    for name in samplers:
        res[f"acc_{name}"] = accuracy(images(pipe, pairs, sampler=name), digits)
    res["acc_guidance_1"] = accuracy(images(pipe, pairs, guidance=1.0), digits)
    hw = [(f"a handwritten digit {WORDS[s % 10]}", s) for s in seeds]
    res["acc_handwritten"] = accuracy(images(pipe, hw), digits)
    res["acc_negative_numeral"] = accuracy(images(pipe, hw, negative=[str(s % 10) for s in seeds]), digits)
    res["acc_negative_same"] = accuracy(images(pipe, hw, negative=[p for p, _ in hw]), digits)
    red = images(pipe, [(f"a red handwritten digit {WORDS[s % 10]}", s) for s in seeds[:min(20, len(seeds))]])
    res["red_share"] = sum(look(im).redness > 0.4 for im in red) / len(red)
    res["red_acc"] = accuracy(red, digits[:min(20, len(seeds))])
    inv = images(pipe, [(f"a handwritten digit {WORDS[s % 10]}, white on black", s) for s in seeds[:min(20, len(seeds))]])
    res["inverted_share"] = sum(look(im).dark_paper for im in inv) / len(inv)
    res["inverted_acc"] = accuracy(inv, digits[:min(20, len(seeds))])
    plain = images(pipe, hw[:20])
    res["plain_black_on_white"] = sum(look(im).light_paper and look(im).ink.max() < 0.35 for im in plain) / len(plain)
    return res


def save_grid(pipe, path: Path, seeds=range(8)) -> None:
    from PIL import Image

    rows = [f"a handwritten digit {w}" for w in WORDS] + ["a red handwritten digit seven", "the number 3 in blue",
                                                         "a green 5", "a handwritten digit two, white on black", ""]
    tiles = [[im for im in images(pipe, [(p, s) for s in seeds])] for p in rows]
    w, h = tiles[0][0].size
    grid = Image.new("RGB", (w * len(seeds), h * len(rows)), "white")
    for r, row in enumerate(tiles):
        for c, im in enumerate(row):
            grid.paste(im, (c * w, r * h))
    grid.save(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--grid", type=Path, default=None, help="also save a grid of samples (rows: prompts)")
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    args = parser.parse_args(argv)

    import torch

    from coreml_sd.pipeline import Pipeline

    torch.set_num_threads(args.threads)
    extra = {"config": args.config} if args.config else {}
    pipe = Pipeline.load(args.model, backend="torch", device=args.device, precision="fp32", **extra)
    start = time.perf_counter()
    res = evaluate(pipe, seeds=range(args.seeds), samplers=args.samplers.split(","))
    res["seconds"] = round(time.perf_counter() - start, 1)
    if args.grid:
        save_grid(pipe, args.grid)
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
