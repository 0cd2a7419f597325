"""NoiseSource equals torch's CPU generator stream (to the float32 rounding of its Box-Muller math)."""

import math

import numpy as np
import pytest

from coreml_sd.rng import NoiseSource

torch = pytest.importorskip("torch")

# The numpy engine and torch draw the same uniforms; only Box-Muller's rounding differs, and torch's
# own paths differ by as much (AVX2/AVX-512 kernels: float32 angle, vectorised log/cos; the scalar
# kernel of ATEN_CPU_CAPABILITY=default, as on CPUs without AVX2: the angle in double). z = r cos(t):
# t = 2 pi u in float32 is off by up to ulp(2 pi) (the constant's and the product's rounding), which
# moves z by up to r_max ulp(2 pi), r_max = sqrt(-2 ln 2^-24) for 24-bit uniforms; log, sqrt, cos
# and the product add a few ulps of z itself.
R_MAX = math.sqrt(-2.0 * math.log(2.0**-24))
ATOL = R_MAX * float(np.spacing(np.float32(2 * math.pi)))  # 2.75e-6
RTOL = 4 * float(np.finfo(np.float32).eps)


@pytest.mark.parametrize("seed", [0, 1, 42, 2**32 - 1, 2**32 + 5, 2**63 + 11])
@pytest.mark.parametrize("shape", [(1, 4, 64, 64), (1, 4, 8, 8), (2, 3, 5, 7), (17,), (16,)])
@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_stream_equals_torch(seed, shape, engine):
    ours = NoiseSource(seed, engine=engine)
    gen = torch.Generator("cpu").manual_seed(seed)
    for _ in range(3):  # successive draws continue the same stream
        expected = torch.randn(shape, generator=gen).numpy()
        got = ours.randn(shape)
        assert got.dtype == np.float32 and got.shape == shape
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
        if engine == "torch":
            assert np.array_equal(got, expected)


def test_auto_engine_never_imports_torch():
    import subprocess
    import sys

    code = ("import sys; from coreml_sd.rng import NoiseSource; s = NoiseSource(1); s.randn((16,)); "
            "print(s.engine, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["numpy", "False"]


def test_same_seed_same_noise_and_different_seeds_differ():
    a, b, c = NoiseSource(7).randn((64,)), NoiseSource(7).randn((64,)), NoiseSource(8).randn((64,))
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def test_rejects_bad_seed_and_tiny_sizes():
    with pytest.raises(ValueError, match="seed"):
        NoiseSource(-1)
    with pytest.raises(ValueError, match="fewer than 16"):
        NoiseSource(0).randn((3,))
    with pytest.raises(ValueError, match="engine"):
        NoiseSource(0, engine="cupy")
