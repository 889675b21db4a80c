"""Branin-Currin: BoTorch's two-objective test function on [0, 1]^2, both minimised.

    branin(x) = (b - 5.1 a^2 / (4 pi^2) + 5 a / pi - 6)^2 + 10 (1 - 1 / (8 pi)) cos(a) + 10,
                with a = 15 x_0 - 5, b = 15 x_1
    currin(x) = (1 - exp(-1 / (2 x_1))) (2300 x_0^3 + 1900 x_0^2 + 2092 x_0 + 60)
                / (100 x_0^3 + 500 x_0^2 + 4 x_0 + 20)

This is ``botorch.test_functions.multi_objective.BraninCurrin`` (which BoTorch maximises as
``negate=True``); here both are minimised, with BoTorch's reference point (18, 6), so hypervolumes
compare with BoTorch's published maximum 59.36011874867746 (``max_hypervolume``, found by NSGA-II).
At ``x_1 = 0`` Currin's factor is taken at its limit, 1.

Option ``noise`` (default 0) adds Gaussian noise of that standard deviation to both objectives,
drawn from ``(seed, config)``; the noise-free values are in the metadata under ``noise_free_values``.
``evaluate_batch`` equals ``evaluate`` row by row, noise included, and leaves out the metadata.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from problems.zdt import batch_noise, noise_rng
from qd.checks import check_number
from qd.problem import BatchEvaluation, Evaluation, Objective, Problem
from qd.space import Config, Float, Space

REFERENCE_POINT = (18.0, 6.0)


def branin_currin_objectives(X: np.ndarray) -> np.ndarray:
    """X (n, 2) in [0, 1]^2 -> (n, 2): (branin, currin), both minimised."""
    X = np.atleast_2d(np.asarray(X, dtype=float))
    x0, x1 = X[:, 0], X[:, 1]
    a, b = 15.0 * x0 - 5.0, 15.0 * x1
    branin = (b - 5.1 / (4.0 * math.pi**2) * a**2 + 5.0 / math.pi * a - 6.0) ** 2
    branin += 10.0 * (1.0 - 1.0 / (8.0 * math.pi)) * np.cos(a) + 10.0
    with np.errstate(divide="ignore"):  # x_1 = 0: exp(-inf) = 0, the limit
        factor = 1.0 - np.exp(-1.0 / (2.0 * x1))
    numerator = 2300.0 * x0**3 + 1900.0 * x0**2 + 2092.0 * x0 + 60.0
    denominator = 100.0 * x0**3 + 500.0 * x0**2 + 4.0 * x0 + 20.0
    return np.stack([branin, factor * numerator / denominator], axis=1)


class BraninCurrin(Problem):
    """Branin-Currin (BoTorch): two objectives on [0,1]^2, minimised; reference point (18, 6), max HV 59.36."""

    max_hypervolume = 59.36011874867746
    vectorized = True

    def __init__(self, noise: float = 0.0):
        self.noise = check_number(noise, "noise", "branin-currin", low=0)
        self.space = Space([Float("x0", 0.0, 1.0), Float("x1", 0.0, 1.0)])
        self.objectives = (Objective("branin"), Objective("currin"))
        self.reference_point = REFERENCE_POINT

    def evaluate(self, config: Config, seed: int) -> Evaluation:
        """Both objectives at (x0, x1); ``seed`` draws the noise, if any."""
        x = np.array([config["x0"], config["x1"]], dtype=float)
        values = branin_currin_objectives(x[None])[0]
        metadata: dict[str, Any] = {}
        if self.noise > 0:
            metadata["noise_free_values"] = values.tolist()
            values = values + noise_rng(seed, x).normal(0.0, self.noise, size=2)
        return Evaluation(values=values.tolist(), metadata=metadata)

    def evaluate_batch(self, X: np.ndarray, seeds: np.ndarray) -> BatchEvaluation:
        """X (n, 2) -> values (n, 2); seeds (n,) draw the noise, if any. No metadata."""
        X = np.asarray(X, dtype=float)
        values = branin_currin_objectives(X)
        if self.noise > 0:
            values = values + batch_noise(X, seeds, self.noise, 2)
        return BatchEvaluation(values=values)
