"""Planar arm repertoire (Cully et al. 2015; Vassiliades & Mouret 2018; pyribs' arm tutorial).

An arm of ``dof`` links of length 1, joint angles ``theta_i`` in [-pi, pi], fixed at the origin.
Link ``i`` points at the cumulative angle ``theta_0 + ... + theta_i``; the measures are the
end-effector position ``(x, y) = (sum cos(cum_theta), sum sin(cum_theta))``, bounded by
``[-dof, dof]`` each (the reachable set is the disk of radius ``dof``).

The objective, as in pyribs' tutorial, prefers arms whose joints bend evenly:
``score = (1 - var(theta)) * 100``, maximised. It is 100 exactly when all angles are equal (the
end-effector then lies on one curve through ``(dof, 0)``; other cells have a lower best) and falls
to ``(1 - pi^2) * 100 ~ -887`` when the angles split evenly between -pi and pi.

Option ``objectives=2`` adds a second objective, ``bend = mean |theta_i|`` (minimised, in
[0, pi]): how far the joints turn from straight. It conflicts with evenness within a cell: a
point off the even-bend curve is reached either by bending every joint evenly and far, or by
bending a few joints only. The reference point is then the worst of both,
``((1 - pi^2) * 100, pi)``, so MOME-style scores count every front.
"""

from __future__ import annotations

import math

import numpy as np

from qd.checks import check_choice, check_int
from qd.problem import BatchEvaluation, Evaluation, Measure, Objective, Problem
from qd.space import Config, Float, Space


def arm_score(theta: np.ndarray) -> np.ndarray:
    """Joint angles (n, dof) -> (n,) score (1 - variance) * 100, 100 when all angles are equal."""
    return (1.0 - np.var(np.atleast_2d(theta), axis=1)) * 100.0


def arm_bend(theta: np.ndarray) -> np.ndarray:
    """Joint angles (n, dof) -> (n,) mean absolute joint angle, 0 for a straight arm."""
    return np.abs(np.atleast_2d(theta)).mean(axis=1)


def arm_end_effector(theta: np.ndarray) -> np.ndarray:
    """Joint angles (n, dof) -> (n, 2) end-effector position with unit links."""
    cumulative = np.cumsum(np.atleast_2d(np.asarray(theta, dtype=float)), axis=1)
    return np.stack([np.cos(cumulative).sum(axis=1), np.sin(cumulative).sum(axis=1)], axis=1)


class Arm(Problem):
    """Planar arm repertoire (pyribs tutorial): maximise joint evenness, map end-effector (x, y)."""

    vectorized = True

    def __init__(self, dof: int = 12, objectives: int = 1):
        self.dof = check_int(dof, "dof", "arm", low=2)
        self.n_objectives = check_choice(objectives, "objectives", "arm", (1, 2))
        self.space = Space([Float(f"theta{i}", -math.pi, math.pi) for i in range(self.dof)])
        self.objectives = (Objective("score", "maximize"),)
        if self.n_objectives == 2:
            self.objectives += (Objective("bend", "minimize"),)
            self.reference_point = ((1 - math.pi**2) * 100, math.pi)
        reach = float(self.dof)
        self.measures = (Measure("x", -reach, reach), Measure("y", -reach, reach))

    def evaluate(self, config: Config, seed: int) -> Evaluation:
        """One arm: its joint evenness and end-effector (x, y); ``seed`` is unused."""
        theta = np.array([[config[f"theta{i}"] for i in range(self.dof)]], dtype=float)
        return Evaluation(values=self._values(theta)[0].tolist(), measures=arm_end_effector(theta)[0].tolist())

    def _values(self, theta: np.ndarray) -> np.ndarray:
        """(n, dof) -> (n, 1) score, or (n, 2) score and bend."""
        columns = [arm_score(theta), arm_bend(theta)][:self.n_objectives]
        return np.stack(columns, axis=1)

    def evaluate_batch(self, X: np.ndarray, seeds: np.ndarray) -> BatchEvaluation:
        """X (n, dof) joint angles -> values (n, 1) (or (n, 2) with bend), measures (n, 2); seeds unused."""
        theta = np.asarray(X, dtype=float)
        return BatchEvaluation(values=self._values(theta), measures=arm_end_effector(theta))
