"""`import coreml_sd` and the CLI module stay free of torch, diffusers and coremltools."""

import subprocess
import sys

HEAVY = ("torch", "diffusers", "coremltools", "transformers")


def test_import_is_light():
    code = ("import sys, coreml_sd, coreml_sd.cli, coreml_sd.pipeline, coreml_sd.images, coreml_sd.rng, "
            "coreml_sd.tokenizer, coreml_sd.sources, coreml_sd.backends, coreml_sd.image_input, coreml_sd.masks, "
            "coreml_sd.outpaint, coreml_sd.control_preprocess, coreml_sd.cli_control, coreml_sd.prompt_syntax, "
            "coreml_sd.prompt_chunks, coreml_sd.recipe; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
