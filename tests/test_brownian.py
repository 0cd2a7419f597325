"""The numpy Brownian tree against torchsde's BrownianTree and k-diffusion's BrownianTreeNoiseSampler.

Same seed and query points -> the same increments: bit for bit when our normals come from torch's
generator (it is loaded here), to float32 rounding with the numpy generator (NoiseSource's numpy
engine equals torch's CPU normals to one ulp). Then the properties SDE samplers rely on.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from coreml_sd.brownian import BrownianNoise, BrownianTree
from coreml_sd.rng import NoiseSource
from coreml_sd.sampler_noise import ImageNoise

# torchsde warns when a query starts at sigma_min itself, just below its tree's t0 rounded up.
pytestmark = pytest.mark.filterwarnings("ignore:Should have:UserWarning")

SIGMA_MIN, SIGMA_MAX = 0.029167532920837402, 14.614646911621094  # SD's training range (float32 values)
SHAPE = (4, 8, 8)


def _queries(seed: int, count: int = 25) -> list[tuple[float, float]]:
    """Random intervals, some tiny, some spanning the range, some sharing an end point."""
    rng = np.random.default_rng(seed)
    pairs = [tuple(sorted(rng.uniform(SIGMA_MIN, SIGMA_MAX, 2))) for _ in range(count)]
    pairs += [(SIGMA_MIN, SIGMA_MAX), (1.0, 1.0 + 3e-6), (0.5, 2.0), (2.0, 7.25)]
    return [(float(a), float(b)) for a, b in pairs]


@pytest.mark.parametrize("engine", ["auto", "numpy"])
@pytest.mark.parametrize("seed", [0, 42, 2**32 - 1])
def test_tree_equals_torchsde(seed, engine):
    torch = pytest.importorskip("torch")
    torchsde = pytest.importorskip("torchsde")

    ref = torchsde.BrownianTree(SIGMA_MIN, torch.zeros(SHAPE), SIGMA_MAX, entropy=seed, tol=1e-6, pool_size=24)
    ours = BrownianTree(SIGMA_MIN, SIGMA_MAX, SHAPE, seed, engine=engine)
    for a, b in _queries(seed):
        want = ref(a, b).numpy()
        got = ours(a, b)
        assert got.dtype == np.float32 and got.shape == SHAPE
        if engine == "auto":  # torch is loaded: torch's own normals, torchsde's arithmetic order
            np.testing.assert_array_equal(got, want, err_msg=f"[{a}, {b}]")
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(want).max()))


def test_noise_sampler_equals_kdiffusion_for_a_batch():
    torch = pytest.importorskip("torch")
    from kdiffusion_ref import load

    sampling, _ = load()
    seeds = [7, 8, 1234]
    x = torch.zeros((len(seeds),) + SHAPE)
    ref = sampling.BrownianTreeNoiseSampler(x, torch.tensor(SIGMA_MIN), torch.tensor(SIGMA_MAX), seed=seeds)
    ours = BrownianNoise(seeds, SHAPE, SIGMA_MIN, SIGMA_MAX)
    sigmas = np.float32([SIGMA_MAX, 9.1, 5.47, 3.17, 1.75, 0.91, 0.45, 0.2, 0.08, SIGMA_MIN])
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        want = ref(torch.tensor(sigma), torch.tensor(sigma_next)).numpy()
        np.testing.assert_array_equal(ours(float(sigma), float(sigma_next)), want)


def test_numpy_tree_needs_no_torch():
    code = ("import sys, numpy as np; from coreml_sd.brownian import BrownianNoise; "
            f"n = BrownianNoise([5], {SHAPE}, {SIGMA_MIN}, {SIGMA_MAX})(3.0, 1.0); "
            "assert n.shape == (1, 4, 8, 8) and 'torch' not in sys.modules; print(float(n.sum()))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    torch = pytest.importorskip("torch")
    torchsde = pytest.importorskip("torchsde")
    tree = torchsde.BrownianTree(SIGMA_MIN, torch.zeros(SHAPE), SIGMA_MAX, entropy=5, tol=1e-6, pool_size=24)
    want = float((-tree(1.0, 3.0) / 2.0**0.5).sum())
    assert float(out) == pytest.approx(want, rel=1e-5, abs=1e-4)


def test_increments_add_up_and_refine_consistently():
    """W over [a, c] = W over [a, b] + W over [b, c]: more steps see a refinement of the same path."""
    tree = BrownianTree(SIGMA_MIN, SIGMA_MAX, SHAPE, 3)
    a, b, c = 0.4, 2.5, 11.0
    np.testing.assert_allclose(tree(a, c), tree(a, b) + tree(b, c), rtol=0, atol=2e-6)
    # A 10-step and a 20-step sampler cover [a, c] with different points: the same total increment.
    coarse = sum(tree(x, y) for x, y in zip(np.linspace(a, c, 11)[:-1], np.linspace(a, c, 11)[1:]))
    fine = sum(tree(x, y) for x, y in zip(np.linspace(a, c, 21)[:-1], np.linspace(a, c, 21)[1:]))
    np.testing.assert_allclose(coarse, fine, rtol=0, atol=1e-5)
    np.testing.assert_allclose(coarse, tree(a, c), rtol=0, atol=1e-5)


def test_increments_are_standard_normal_once_scaled_and_independent():
    noise = BrownianNoise([11], (4, 64, 64), SIGMA_MIN, SIGMA_MAX)
    first, second = noise(10.0, 6.0), noise(6.0, 3.0)  # disjoint intervals
    for n in (first, second):
        assert abs(float(n.mean())) < 0.03 and abs(float(n.std()) - 1.0) < 0.03
    assert abs(float(np.corrcoef(first.ravel(), second.ravel())[0, 1])) < 0.03


def test_same_seed_same_noise_other_seed_other_noise():
    a = BrownianNoise([1], SHAPE, SIGMA_MIN, SIGMA_MAX)(5.0, 4.0)
    b = BrownianNoise([1], SHAPE, SIGMA_MIN, SIGMA_MAX)(5.0, 4.0)
    c = BrownianNoise([2], SHAPE, SIGMA_MIN, SIGMA_MAX)(5.0, 4.0)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.5


def test_an_image_gets_the_same_tree_alone_or_in_a_batch():
    batch = ImageNoise([NoiseSource(s) for s in (41, 42, 43)], np.asarray).brownian((3,) + SHAPE, SIGMA_MIN, SIGMA_MAX)
    alone = ImageNoise([NoiseSource(42)], np.asarray).brownian((1,) + SHAPE, SIGMA_MIN, SIGMA_MAX)
    np.testing.assert_array_equal(batch(7.0, 2.0)[1], alone(7.0, 2.0)[0])


def test_queries_outside_the_range_are_clamped_and_reversed_ones_refused():
    tree = BrownianTree(SIGMA_MIN, SIGMA_MAX, SHAPE, 0)
    np.testing.assert_array_equal(tree(0.0, 20.0), tree(SIGMA_MIN, SIGMA_MAX))
    assert not tree(3.0, 3.0).any()
    with pytest.raises(ValueError, match="ta <= tb"):
        tree(3.0, 2.0)
    with pytest.raises(ValueError, match="t0 < t1"):
        BrownianTree(2.0, 1.0, SHAPE, 0)
