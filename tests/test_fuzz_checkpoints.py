"""A few hundred seeded mutations of tensor files: each loads or fails with a ModelError, quickly, in bounded memory."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

HERE = Path(__file__).resolve().parent
ADDRESS_SPACE = 3 << 30  # torch itself maps ~0.7 GB; a declared 8 GB storage would fail under this


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


@pytest.mark.parametrize("seed", [0, 1])
def test_mutated_tensor_files_load_or_fail_cleanly(seed):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(HERE / "fuzz_checkpoints.py"), "--seed", str(seed), "--cases", "300"],
                          capture_output=True, text=True, timeout=300, env=env, preexec_fn=_limit_memory)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["problems"] == [], result["problems"][:5]
    counts = result["counts"]
    # The mutations reach both outcomes for every container (a fuzzer that only refuses tests nothing).
    for kind in ("safetensors", "zip", "legacy"):
        assert counts.get(f"{kind} refused", 0) >= 20, counts
        assert counts.get(f"{kind} loaded", 0) >= 1, counts
    assert sum(counts.values()) == 300
    assert result["peak_rss_mib"] < 1024, result
