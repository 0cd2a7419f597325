"""Brownian-tree noise for SDE samplers, seeded by the image's seed, in numpy.

AUTOMATIC1111 gives its SDE samplers (DPM++ SDE, DPM++ 2M SDE, 2M SDE Heun, 3M SDE) the noise of
a Brownian motion W(sigma) per image, k-diffusion's `BrownianTreeNoiseSampler` over
`torchsde.BrownianTree(entropy=seed)`, and each step takes the normalised increment
(W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|). `BrownianTree` here is that tree
rebuilt with numpy, node for node, so a Mac running Core ML (no torch) draws the same noise:

* The interval [t0, t1] is split at its (rounded to 1e-6) midpoint, recursively: a fixed dyadic
  tree, whatever the order or spacing of the queries (torchsde's `halfway_tree=True`, tol 1e-6).
* Each split draws the left child's increment from a Brownian bridge, W_left = W * l / h +
  sqrt(l * r / h) * z, with z = torch.randn(shape) under the seed that numpy's `SeedSequence(entropy
  = seed, spawn_key = (node key, depth), pool_size = 24)` gives the node; the right child gets the
  rest. The root draws W(t1) - W(t0) likewise. `coreml_sd.rng.NoiseSource` reproduces torch's
  generator, so the increments equal torchsde's on the CPU to float32 rounding
  (tests/test_brownian.py; on CUDA, torch draws other normals).
* A query [a, b] is the sum of the tree nodes that tile it, which torchsde adds left to right.

What this guarantees: the same seed gives the same noise for the same query, bit for bit on one
machine; increments over disjoint intervals are independent N(0, |b - a|); the increment over
[a, c] is exactly the sum of those over [a, b] and [b, c], so a sampler with more steps sees a
refinement of the same Brownian path (images change smoothly with the step count, rather than
being redrawn); each image of a batch has its own tree, so an image does not depend on its batch.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Callable, Sequence

import numpy as np

from coreml_sd.rng import NoiseSource

TOL_DIGITS = 6  # torchsde BrownianTree's tol=1e-6: points rounded to 6 decimals
POOL_SIZE = 24  # torchsde BrownianTree's default entropy pool
CACHE_SIZE = 64  # node increments kept; queries walk down from the root, reusing the upper nodes


def _seeds(entropy: int, spawn_key: tuple[int, ...], count: int) -> list[int]:
    sequence = np.random.SeedSequence(entropy=entropy, spawn_key=spawn_key, pool_size=POOL_SIZE)
    return [int(s) for s in sequence.generate_state(count)]


class BrownianTree:
    """W(tb) - W(ta) for one seed on [t0, t1], equal to torchsde.BrownianTree(t0, zeros(shape), t1, entropy=seed)."""

    def __init__(self, t0: float, t1: float, shape: Sequence[int], seed: int, *, engine: str = "auto"):
        if not t0 < t1:
            raise ValueError(f"a Brownian tree needs t0 < t1; got t0={t0}, t1={t1}")
        self.shape = tuple(int(s) for s in shape)
        self.seed = int(seed)
        self.engine = engine  # NoiseSource's: "auto" uses torch's generator only where torch is loaded
        self.t0, self.t1 = self._round(t0), self._round(t1)
        root_w_seed = _seeds(self.seed, (), 3)[0]
        self._root = (self.t0, self.t1, 0, 0)  # (start, end, spawn key, depth)
        self._root_w = self._randn(root_w_seed) * np.float32(math.sqrt(t1 - t0))
        self._cache: OrderedDict[tuple, np.ndarray] = OrderedDict()

    @staticmethod
    def _round(t: float) -> float:
        return round(float(t), TOL_DIGITS)

    def _randn(self, seed: int) -> np.ndarray:
        return NoiseSource(seed, engine=self.engine).randn(self.shape)

    def __call__(self, ta: float, tb: float) -> np.ndarray:
        """The increment over [ta, tb] (ta <= tb), float32; points outside [t0, t1] are clamped, as torchsde does."""
        ta = min(max(float(ta), self.t0), self.t1)
        tb = min(max(float(tb), self.t0), self.t1)
        if ta > tb:
            raise ValueError(f"query times must satisfy ta <= tb; got ta={ta}, tb={tb}")
        ta, tb = self._round(ta), self._round(tb)
        if ta == tb:
            return np.zeros(self.shape, np.float32)
        out = None
        for node in self._tiling(ta, tb):
            w = self._increment(node)
            out = w if out is None else out + w
        return out

    def _tiling(self, ta: float, tb: float) -> list[tuple]:
        """The tree nodes that exactly tile [ta, tb], left to right (torchsde's _loc on a halfway tree)."""
        out, pending = [], [(self._root, ta, tb)]
        while pending:
            node, a, b = pending.pop()
            start, end = node[0], node[1]
            if a == start and b == end:
                out.append(node)
                continue
            left, right = self._children(node)
            mid = left[1]
            if b <= mid:
                pending.append((left, a, b))
            elif a >= mid:
                pending.append((right, a, b))
            else:  # right first on the stack, so the left piece is emitted first
                pending += [(right, mid, b), (left, a, mid)]
        return out

    def _children(self, node: tuple) -> tuple[tuple, tuple]:
        start, end, key, depth = node
        mid = self._round(0.5 * (end + start))
        return (start, mid, 2 * key, depth + 1), (mid, end, 2 * key + 1, depth + 1)

    def _parent(self, node: tuple) -> tuple:
        """The node whose split made `node` (walking down from the root: node keys encode the path)."""
        start, end, key, depth = node
        current = self._root
        for level in range(depth - 1):
            go_right = (key >> (depth - 1 - level)) & 1
            current = self._children(current)[go_right]
        return current

    def _increment(self, node: tuple) -> np.ndarray:
        if node[3] == 0:
            return self._root_w
        if node in self._cache:
            self._cache.move_to_end(node)
            return self._cache[node]
        parent = self._parent(node)
        w_parent = self._increment(parent)
        value = self._bridge(parent, w_parent, is_left=node[2] % 2 == 0)
        self._cache[node] = value
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return value

    def _bridge(self, parent: tuple, w: np.ndarray, is_left: bool) -> np.ndarray:
        """A child's increment given its parent's: the Brownian bridge at the parent's midpoint.

        float32 arithmetic in torchsde's order (coefficients rounded to float32 first), so the
        numbers agree with its tensors to the last bit where the normals do.
        """
        start, end, key, depth = parent
        mid = self._round(0.5 * (end + start))
        w_seed = _seeds(self.seed, (key, depth), 4)[0]  # torchsde's W seed for this split
        h_reciprocal = 1.0 / (end - start)
        left_diff, right_diff = mid - start, end - mid
        mean = w * np.float32(left_diff) * np.float32(h_reciprocal)
        std = np.float32(math.sqrt(left_diff * right_diff * h_reciprocal))
        left_w = mean + self._randn(w_seed) * std
        return left_w if is_left else w - left_w


class BrownianNoise:
    """k-diffusion's BrownianTreeNoiseSampler for a batch: row i from a tree seeded with seeds[i].

    `noise(sigma, sigma_next)` -> (W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|), a
    standard-normal array of shape (len(seeds), *shape), via `asarray` (e.g. to torch).
    """

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], sigma_min: float, sigma_max: float,
                 asarray: Callable[[np.ndarray], Any] = np.asarray):
        self.trees = [BrownianTree(sigma_min, sigma_max, shape, seed) for seed in seeds]
        self.asarray = asarray

    def __call__(self, sigma: float, sigma_next: float):
        a, b = float(sigma), float(sigma_next)
        sign = np.float32(1.0) if a <= b else np.float32(-1.0)
        low, high = min(a, b), max(a, b)
        rows = [tree(low, high) * sign for tree in self.trees]
        # k-diffusion divides by |t1 - t0| ** 0.5 computed on float32 tensors of the two points.
        scale = np.sqrt(np.abs(np.float32(b) - np.float32(a)))
        return self.asarray(np.stack(rows) / scale)
