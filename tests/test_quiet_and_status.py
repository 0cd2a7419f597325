"""Long phases say what they do (on a terminal only); other libraries' warnings only with -v."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coreml_sd.status import StatusLine

ROOT = Path(__file__).resolve().parents[1]


def test_a_phase_is_shown_only_once_it_runs_long():
    out = io.StringIO()
    with StatusLine(True, stream=out, delay=0.05) as status:
        status("quick phase")
        status("slow phase")  # the quick one ended before its delay: never shown
        time.sleep(0.3)
        status("last quick phase")
    time.sleep(0.1)
    assert out.getvalue() == "slow phase...\n"


def test_disabled_status_prints_nothing():
    out = io.StringIO()
    with StatusLine(False, stream=out, delay=0.0) as status:
        status("anything")
        time.sleep(0.05)
    assert out.getvalue() == ""
    assert not StatusLine.for_terminal(quiet=True, as_json=False).enabled
    assert not StatusLine.for_terminal(quiet=False, as_json=True).enabled


def test_verify_reports_each_phase(tmp_path_factory):
    pytest.importorskip("torch")
    from helpers_runtime import shared_tiny_model

    from conversion.verify_model import VerifyOptions, verify_model

    _, folder = shared_tiny_model(tmp_path_factory)
    phases = []
    report = verify_model(folder, options=VerifyOptions(steps=1), progress=phases.append)
    assert report.passed
    assert phases[0] == "opening the folder and the source model" and phases[1].startswith("loading the source model's weights")
    assert [p.split(":")[0] for p in phases[2:5]] == ["text_encoder", "unet", "vae_decoder"]
    assert phases[5:] == ["end-to-end image: 1 euler steps through the source model in torch",
                          "end-to-end image: 1 euler steps through the packages"]


CAST = """
import sys
from coreml_sd.quiet_imports import quiet_third_party
quiet_third_party(int(sys.argv[1]))
import torch
from diffusers import AutoencoderKL
AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, layers_per_block=1).to(torch.float16)
import logging
logging.getLogger("coreml_sd.test").warning("our own warning")
"""


@pytest.mark.parametrize("verbose", [0, 1])
def test_third_party_warnings_only_with_verbose(verbose):
    """diffusers warns on every fp16 cast that "modules ... should be kept in float32: []"."""
    pytest.importorskip("diffusers")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_VERBOSITY")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", "import logging; logging.basicConfig()\n" + CAST, str(verbose)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert ("kept in float32" in proc.stderr) is bool(verbose)
    assert "our own warning" in proc.stderr


def test_coremltools_is_imported_without_scikit_learn_which_stays_importable():
    """Reading a package must not pull in scikit-learn and SciPy (58 MiB of the mil executor's peak)."""
    pytest.importorskip("coremltools")
    code = ("import importlib.util, sys; from coreml_sd.quiet_imports import import_coremltools; "
            "import_coremltools(); print('sklearn' in sys.modules, 'coremltools' in sys.modules, "
            "sys.modules.get('sklearn', 0) is None); "
            "print(importlib.util.find_spec('sklearn') is not None and __import__('sklearn').__name__ == 'sklearn' "
            "if importlib.util.find_spec('sklearn') else 'absent')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "False True False"
    assert out[1] in ("True", "absent")
