"""DTLZ2 (Deb, Thiele, Laumanns & Zitzler 2005): M objectives, Pareto front on the unit sphere.

For ``x`` in ``[0, 1]^d`` with ``M`` objectives, position variables ``x_0 .. x_{M-2}`` and
``k = d - M + 1`` distance variables ``x_{M-1} .. x_{d-1}``, ``g = sum((x_dist - 0.5)^2)`` and

    f_i = (1 + g) * prod_{j < M-1-i} cos(x_j pi / 2) * (sin(x_{M-1-i} pi / 2) if i > 0)

(BoTorch's ``DTLZ2`` ordering). Pareto-optimal points have every distance variable at 0.5
(``g = 0``) and lie on the positive part of the unit sphere, ``sum(f_i^2) = 1``.

Reference point ``(1.1,) * M`` as in BoTorch; the maximum hypervolume (``max_hypervolume``) is
``1.1^M`` minus the volume of the positive orthant of the unit ball.

Measures (option ``measures``, default on): the distance variables split in two halves (the
first ``k // 2`` and the rest; ``k >= 2`` because ``dim > n_objectives``), and each half's mean,
in [0, 1]. Pareto-optimal points sit at (0.5, 0.5); a cell with half-means ``(m_1, m_2)`` has at
best ``g = h (m_1 - 0.5)^2 + (k - h)(m_2 - 0.5)^2`` (``h = k // 2``), so its own front is the
sphere of radius ``1 + g``.
"""

from __future__ import annotations

import math

import numpy as np

from qd.checks import check_bool, check_int
from qd.problem import BatchEvaluation, Evaluation, Measure, Objective, Problem
from qd.space import Config, Float, Space


def dtlz2_objectives(X: np.ndarray, n_objectives: int) -> np.ndarray:
    """X (n, d) in [0, 1] -> (n, n_objectives) objective values, all minimised."""
    X = np.atleast_2d(np.asarray(X, dtype=float))
    m = n_objectives
    radius = 1.0 + ((X[:, m - 1 :] - 0.5) ** 2).sum(axis=1)
    angles = X[:, : m - 1] * (math.pi / 2.0)
    # cos_prefix[:, j] = prod of cos(angles[:, :j]); j = 0 .. m-1.
    cos_prefix = np.concatenate([np.ones((len(X), 1)), np.cumprod(np.cos(angles), axis=1)], axis=1)
    columns = []
    for i in range(m):
        last = m - 1 - i
        f = radius * cos_prefix[:, last]
        if i > 0:
            f = f * np.sin(angles[:, last])
        columns.append(f)
    return np.stack(columns, axis=1)


def dtlz2_measures(X: np.ndarray, n_objectives: int) -> np.ndarray:
    """Means of the two halves of the distance variables: X (n, d) -> (n, 2) in [0, 1]."""
    X = np.atleast_2d(np.asarray(X, dtype=float))
    distance = X[:, n_objectives - 1 :]
    half = distance.shape[1] // 2
    return np.stack([distance[:, :half].mean(axis=1), distance[:, half:].mean(axis=1)], axis=1)


class DTLZ2(Problem):
    """DTLZ2: M objectives, Pareto front on the positive unit sphere; reference point (1.1, ..., 1.1)."""

    vectorized = True

    def __init__(self, dim: int = 6, n_objectives: int = 3, measures: bool = True):
        check_int(n_objectives, "n_objectives", "dtlz2", low=2)
        check_int(dim, "dim", "dtlz2", low=n_objectives + 1)
        check_bool(measures, "measures", "dtlz2")
        self.dim = int(dim)
        self.n_objectives = int(n_objectives)
        self.space = Space([Float(f"x{i}", 0.0, 1.0) for i in range(self.dim)])
        self.objectives = tuple(Objective(f"f{i + 1}") for i in range(self.n_objectives))
        self.measures = (
            (Measure("mean_distance_first_half", 0.0, 1.0), Measure("mean_distance_second_half", 0.0, 1.0))
            if measures
            else ()
        )
        self.reference_point = (1.1,) * self.n_objectives

    @property
    def max_hypervolume(self) -> float:
        """The exact maximum against (1.1, ..., 1.1): the box minus the positive orthant of the unit ball."""
        m = self.n_objectives
        positive_orthant_of_ball = math.pi ** (m / 2) / math.gamma(m / 2 + 1) / 2**m
        return 1.1**m - positive_orthant_of_ball

    def evaluate(self, config: Config, seed: int) -> Evaluation:
        """The objectives (and measures, when enabled) at ``x``; ``seed`` is unused."""
        x = np.array([[config[f"x{i}"] for i in range(self.dim)]], dtype=float)
        values = dtlz2_objectives(x, self.n_objectives)[0].tolist()
        measures = dtlz2_measures(x, self.n_objectives)[0].tolist() if self.measures else []
        return Evaluation(values=values, measures=measures)

    def evaluate_batch(self, X: np.ndarray, seeds: np.ndarray) -> BatchEvaluation:
        """X (n, dim) -> values (n, n_objectives), measures (n, 2) or None; seeds unused."""
        X = np.asarray(X, dtype=float)
        measures = dtlz2_measures(X, self.n_objectives) if self.measures else None
        return BatchEvaluation(values=dtlz2_objectives(X, self.n_objectives), measures=measures)

    def pareto_front(self, n: int = 100, seed: int = 0) -> np.ndarray:
        """``n`` random points of the true front (positive unit sphere), shape (n, n_objectives)."""
        rng = np.random.default_rng(seed)
        position = rng.random((n, self.n_objectives - 1))
        X = np.concatenate([position, np.full((n, self.dim - self.n_objectives + 1), 0.5)], axis=1)
        return dtlz2_objectives(X, self.n_objectives)
