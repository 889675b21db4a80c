"""Sphere and Rastrigin with linear-projection measures: the standard QD benchmark of pyribs.

This is the set-up of Fontaine et al. (CMA-ME, 2020; CMA-MAE, 2023) and pyribs'
``examples/sphere.py``, with parameters ``x_i`` in [-5.12, 5.12]:

- The optimum is moved to ``x_i = 0.4 * 5.12 = 2.048``.
- The objective is a score to maximise, ``(raw - worst) / (best - worst) * 100`` with
  ``best = 0`` and ``worst`` the raw value at ``x = (-5.12, ..., -5.12)``:
  sphere ``raw = sum((x - 2.048)^2)``, whose worst over the box is that corner, so the score
  lies in [0, 100]; Rastrigin ``raw = 10 d + sum(z^2 - 10 cos(2 pi z))`` with ``z = x - 2.048``,
  normalised by the same corner as the CMA-MAE code does, so its score reaches 100 at the
  optimum but dips to about -10 where the corner is not the worst point.
- The measures are the sums of the clipped parameters of the first ``d // 2`` and of the
  remaining ``d - d // 2`` coordinates (clipping maps ``|x_i| > 5.12`` to ``5.12 / x_i``; inside
  the box it changes nothing). Their bounds are exactly ``+-5.12`` times each half's length,
  which for even ``d`` is pyribs' ``+-d * 5.12 / 2``.

``dim`` defaults to 20 to keep runs cheap; the papers use 100 (and 1000 for DQD).
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from qd.checks import check_int
from qd.problem import BatchEvaluation, Evaluation, Measure, Objective, Problem
from qd.space import Config, Float, Space

BOUND = 5.12
SHIFT = 0.4 * BOUND


def sphere_raw(X: np.ndarray) -> np.ndarray:
    """X (n, d) -> (n,) shifted sphere value, 0 at the optimum."""
    return ((X - SHIFT) ** 2).sum(axis=1)


def rastrigin_raw(X: np.ndarray) -> np.ndarray:
    """X (n, d) -> (n,) shifted Rastrigin value (A = 10), 0 at the optimum."""
    z = X - SHIFT
    return 10.0 * X.shape[1] + (z**2 - 10.0 * np.cos(2.0 * math.pi * z)).sum(axis=1)


RAW_FUNCTIONS = {"sphere": sphere_raw, "rastrigin": rastrigin_raw}


def projection_score(X: np.ndarray, function: str) -> np.ndarray:
    """X (n, d) -> (n,) normalised score, 100 at x_i = 2.048 (``function``: sphere or rastrigin)."""
    X = np.atleast_2d(np.asarray(X, dtype=float))
    raw = RAW_FUNCTIONS[function]
    worst = raw(np.full((1, X.shape[1]), -BOUND))[0]
    return (raw(X) - worst) / (0.0 - worst) * 100.0


def projection_measures(X: np.ndarray) -> np.ndarray:
    """X (n, d) -> (n, 2): sums of the clipped first d // 2 and last d - d // 2 coordinates."""
    X = np.atleast_2d(np.asarray(X, dtype=float))
    clipped = X.copy()
    outside = np.abs(clipped) > BOUND
    clipped[outside] = BOUND / clipped[outside]
    half = X.shape[1] // 2
    return np.stack([clipped[:, :half].sum(axis=1), clipped[:, half:].sum(axis=1)], axis=1)


class _Projection(Problem):
    function: ClassVar[str]
    vectorized = True

    def __init__(self, dim: int = 20):
        self.dim = check_int(dim, "dim", self.function, low=2)
        self.space = Space([Float(f"x{i}", -BOUND, BOUND) for i in range(self.dim)])
        self.objectives = (Objective("score", "maximize"),)
        first, second = self.dim // 2, self.dim - self.dim // 2
        self.measures = (
            Measure("sum_first_half", -BOUND * first, BOUND * first),
            Measure("sum_second_half", -BOUND * second, BOUND * second),
        )

    def evaluate(self, config: Config, seed: int) -> Evaluation:
        x = np.array([[config[f"x{i}"] for i in range(self.dim)]], dtype=float)
        return Evaluation(
            values=[float(projection_score(x, self.function)[0])],
            measures=projection_measures(x)[0].tolist(),
        )

    def evaluate_batch(self, X: np.ndarray, seeds: np.ndarray) -> BatchEvaluation:
        """X (n, dim) raw values (the x_i in order) -> values (n, 1), measures (n, 2); seeds unused."""
        X = np.asarray(X, dtype=float)
        return BatchEvaluation(values=projection_score(X, self.function)[:, None], measures=projection_measures(X))


class Sphere(_Projection):
    """Sphere linear projection (pyribs/CMA-ME): maximise a 0-100 score over x in [-5.12, 5.12]^d."""

    function = "sphere"


class Rastrigin(_Projection):
    """Rastrigin linear projection (CMA-ME/CMA-MAE): maximise a score (100 at optimum) over [-5.12, 5.12]^d."""

    function = "rastrigin"
