"""ZDT1, ZDT2, ZDT3 (Zitzler, Deb & Thiele 2000): two objectives with analytic Pareto fronts.

For ``x`` in ``[0, 1]^d``, with ``g(x) = 1 + 9 * mean(x_1 .. x_{d-1})`` and ``r = x_0 / g``:

- ZDT1: ``f = (x_0, g * (1 - sqrt(r)))``; convex front ``f_2 = 1 - sqrt(f_1)``.
- ZDT2: ``f = (x_0, g * (1 - r^2))``; concave front ``f_2 = 1 - f_1^2``.
- ZDT3: ``f = (x_0, g * (1 - sqrt(r) - r * sin(10 pi x_0)))``; five disconnected pieces.

The front is reached when every distance variable ``x_1 .. x_{d-1}`` is 0 (``g = 1``).
ZDT3 multiplies by ``g`` as in the original paper; BoTorch's ``ZDT3`` leaves the ``g`` factor
out of ``f_2``, which changes nothing on the front (``g = 1``) but does elsewhere.

Hypervolume uses BoTorch's reference point (11, 11), so the maxima (``max_hypervolume``) are
BoTorch's: 120 + 2/3 (ZDT1), 120 + 1/3 (ZDT2), 128.7781... (ZDT3).

Measures (option ``measures``, default on): the distance variables split in two halves,
``x_1 .. x_h`` and ``x_{h+1} .. x_{d-1}`` with ``h = (d - 1) // 2``, and each half's mean, in
[0, 1]. Global Pareto-optimal points all sit in the cell (0, 0); a cell with means
``(m_1, m_2)`` has its own front, the global one scaled by
``g = 1 + 9 * (h * m_1 + (d - 1 - h) * m_2) / (d - 1)``, so a multi-objective illumination
(MOME) can be checked cell by cell. Two non-empty halves need ``dim >= 3``.

Option ``noise`` (default 0) adds Gaussian noise of that standard deviation to both objectives,
drawn from ``(seed, config)`` so an evaluation is reproducible; the noise-free values are in the
metadata under ``noise_free_values``.

``evaluate_batch`` computes a batch with array operations and equals ``evaluate`` row by row,
noise included; it leaves out the metadata (the noise-free values can be recomputed from the
configuration). With noise it draws each row's noise from that row's own generator (``noise_rng``,
so the noise stream is ``evaluate``'s): the one per-row step, which dominates a noisy batch's cost.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, ClassVar

import numpy as np

from qd.checks import check_bool, check_int, check_number
from qd.problem import BatchEvaluation, Evaluation, Measure, Objective, Problem
from qd.space import Config, Float, Space

REFERENCE_POINT = (11.0, 11.0)

# Intervals of x_0 (= f_1) on which ZDT3's front lies (BoTorch's values).
ZDT3_FRONT_PIECES = (
    (0.0, 0.0830015349),
    (0.1822287280, 0.2577623634),
    (0.4093136748, 0.4538821041),
    (0.6183967944, 0.6525117038),
    (0.8233317983, 0.8518328654),
)


def zdt_objectives(X: np.ndarray, variant: int) -> np.ndarray:
    """Objective values of ZDT``variant`` (1, 2 or 3): X (n, d) in [0, 1] -> (n, 2), both minimised."""
    X = np.atleast_2d(np.asarray(X, dtype=float))
    f1 = X[:, 0]
    g = 1.0 + 9.0 * X[:, 1:].mean(axis=1)
    r = f1 / g
    if variant == 1:
        h = 1.0 - np.sqrt(r)
    elif variant == 2:
        h = 1.0 - r**2
    elif variant == 3:
        h = 1.0 - np.sqrt(r) - r * np.sin(10.0 * math.pi * f1)
    else:
        raise ValueError(f"ZDT variant {variant!r} is not implemented; allowed: 1, 2, 3")
    return np.stack([f1, g * h], axis=1)


def zdt_measures(X: np.ndarray) -> np.ndarray:
    """Means of the two halves of the distance variables: X (n, d), d >= 3 -> (n, 2) in [0, 1]."""
    X = np.atleast_2d(np.asarray(X, dtype=float))
    distance = X[:, 1:]
    half = distance.shape[1] // 2
    return np.stack([distance[:, :half].mean(axis=1), distance[:, half:].mean(axis=1)], axis=1)


def zdt_front(n: int, variant: int) -> np.ndarray:
    """``n`` points of ZDT``variant``'s Pareto front, shape (n, 2), ordered by f_1."""
    if variant in (1, 2):
        f1 = np.linspace(0.0, 1.0, n)
    else:
        # Spread the points over the pieces in proportion to their lengths.
        lengths = np.array([hi - lo for lo, hi in ZDT3_FRONT_PIECES])
        grid = np.linspace(0.0, lengths.sum(), n)
        starts = np.concatenate([[0.0], np.cumsum(lengths)[:-1]])
        piece = np.clip(np.searchsorted(starts, grid, side="right") - 1, 0, len(lengths) - 1)
        f1 = np.array([lo for lo, _ in ZDT3_FRONT_PIECES])[piece] + np.minimum(grid - starts[piece], lengths[piece])
    X = np.zeros((n, 2))
    X[:, 0] = f1
    return zdt_objectives(X, variant)


def noise_rng(seed: int, x: np.ndarray) -> np.random.Generator:
    """A generator fixed by the seed and the point, so a noisy evaluation can be repeated."""
    return np.random.default_rng([int(seed) % 2**32, zlib.crc32(np.ascontiguousarray(x, dtype=float).tobytes())])


def batch_noise(X: np.ndarray, seeds: np.ndarray, std: float, size: int) -> np.ndarray:
    """Noise (n, size) of rows X (n, d) under seeds (n,): row i is ``noise_rng(seeds[i], X[i])``'s draw."""
    X = np.ascontiguousarray(X, dtype=float)
    rows = [noise_rng(s, x).normal(0.0, std, size=size) for s, x in zip(np.asarray(seeds).tolist(), X)]
    return np.array(rows).reshape(len(X), size)


class _ZDT(Problem):
    variant: ClassVar[int]
    max_hypervolume: ClassVar[float]
    vectorized = True

    def __init__(self, dim: int = 6, measures: bool = True, noise: float = 0.0):
        label = type(self).__name__.lower()
        check_int(dim, "dim", label, low=2)
        check_bool(measures, "measures", label)
        if measures and dim < 3:
            raise ValueError(
                f"{label}: option dim={dim!r} is not allowed with measures=True; allowed: dim >= 3 "
                "(the measures split x1..x{dim-1} in two halves), or measures=False"
            )
        check_number(noise, "noise", label, low=0)
        self.dim = int(dim)
        self.noise = float(noise)
        self.space = Space([Float(f"x{i}", 0.0, 1.0) for i in range(self.dim)])
        self.objectives = (Objective("f1"), Objective("f2"))
        self.measures = (
            (Measure("mean_x_first_half", 0.0, 1.0), Measure("mean_x_second_half", 0.0, 1.0)) if measures else ()
        )
        self.reference_point = REFERENCE_POINT

    def evaluate(self, config: Config, seed: int) -> Evaluation:
        x = np.array([config[f"x{i}"] for i in range(self.dim)], dtype=float)
        values = zdt_objectives(x[None], self.variant)[0]
        metadata: dict[str, Any] = {}
        if self.noise > 0:
            metadata["noise_free_values"] = values.tolist()
            values = values + noise_rng(seed, x).normal(0.0, self.noise, size=2)
        measures = zdt_measures(x[None])[0].tolist() if self.measures else []
        return Evaluation(values=values.tolist(), measures=measures, metadata=metadata)

    def evaluate_batch(self, X: np.ndarray, seeds: np.ndarray) -> BatchEvaluation:
        """X (n, dim) -> values (n, 2), measures (n, 2) or None; seeds (n,) draw the noise, if any.

        No metadata: ``noise_free_values`` is ``zdt_objectives`` of the row.
        """
        X = np.asarray(X, dtype=float)
        values = zdt_objectives(X, self.variant)
        if self.noise > 0:
            values = values + batch_noise(X, seeds, self.noise, 2)
        return BatchEvaluation(values=values, measures=zdt_measures(X) if self.measures else None)

    def pareto_front(self, n: int = 100) -> np.ndarray:
        """``n`` points of the true Pareto front, shape (n, 2)."""
        return zdt_front(n, self.variant)


class ZDT1(_ZDT):
    """ZDT1: two objectives, convex Pareto front f2 = 1 - sqrt(f1); reference point (11, 11)."""

    variant = 1
    max_hypervolume = 120.0 + 2.0 / 3.0


class ZDT2(_ZDT):
    """ZDT2: two objectives, concave Pareto front f2 = 1 - f1^2; reference point (11, 11)."""

    variant = 2
    max_hypervolume = 120.0 + 1.0 / 3.0


class ZDT3(_ZDT):
    """ZDT3: two objectives, Pareto front in five disconnected pieces; reference point (11, 11)."""

    variant = 3
    max_hypervolume = 128.77811613069076
