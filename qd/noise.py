"""Repeated evaluations of one configuration: per-configuration mean and spread.

The run loop gives every trial its own evaluation seed, so asking for the same configuration
twice evaluates it again under another seed. With noisy evaluations one lucky seed could hold an
archive cell for ever; an archive that *aggregates* (``EliteSpec.aggregate``) instead places each
configuration by the mean of its measures and ranks it by the mean of its objective over all
its evaluations, and reports the spread (sample standard deviation) and the count per elite.

A configuration is identified by its encoded vector (``space.encode(params)``), rounded against
float noise (``qd.space.config_key``), the same identity every strategy uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qd.space import config_key


@dataclass
class _Sums:
    solution: np.ndarray  # (d,)
    count: int
    objective: float  # sum of objective values
    objective_sq: float  # sum of squares (for the spread)
    measures: np.ndarray  # (k,) sum of measures


class RepeatStats:
    """Running sums per configuration, in first-seen order.

    ``add`` one evaluation at a time; ``table`` gives every configuration's means, ready for a
    batch insertion into a pyribs archive.
    """

    def __init__(self, solution_dim: int, measure_dim: int):
        self.solution_dim, self.measure_dim = int(solution_dim), int(measure_dim)
        self._rows: dict[bytes, _Sums] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: bytes) -> bool:
        return key in self._rows

    def add(self, solution: np.ndarray, objective: float, measures: np.ndarray) -> bool:
        """Record one evaluation of ``solution`` (d,); True when the configuration was seen before."""
        solution = np.asarray(solution, dtype=float).reshape(self.solution_dim)
        measures = np.asarray(measures, dtype=float).reshape(self.measure_dim)
        key = config_key(solution)
        row = self._rows.get(key)
        if row is None:
            self._rows[key] = _Sums(solution.copy(), 1, float(objective), float(objective) ** 2, measures.copy())
            return False
        row.count += 1
        row.objective += float(objective)
        row.objective_sq += float(objective) ** 2
        row.measures = row.measures + measures
        return True

    def count(self, key: bytes) -> int:
        """Evaluations recorded for one configuration (0 if none)."""
        row = self._rows.get(key)
        return 0 if row is None else row.count

    def mean(self, key: bytes) -> tuple[float, np.ndarray]:
        """(mean objective, mean measures (k,)) of one configuration."""
        row = self._rows[key]
        return row.objective / row.count, row.measures / row.count

    def std(self, key: bytes) -> float:
        """Sample standard deviation of the objective (0 for a single evaluation)."""
        row = self._rows[key]
        if row.count < 2:
            return 0.0
        var = (row.objective_sq - row.objective**2 / row.count) / (row.count - 1)
        return float(np.sqrt(max(var, 0.0)))

    def table(self) -> dict[str, np.ndarray]:
        """All configurations: ``solution`` (c, d), ``objective`` (c,) mean, ``measures`` (c, k) mean,
        ``std`` (c,) objective spread, ``count`` (c,)."""
        rows = list(self._rows.values())
        if not rows:
            return {"solution": np.empty((0, self.solution_dim)), "objective": np.empty(0),
                    "measures": np.empty((0, self.measure_dim)), "std": np.empty(0), "count": np.empty(0, dtype=int)}
        count = np.array([r.count for r in rows], dtype=int)
        total = np.array([r.objective for r in rows])
        total_sq = np.array([r.objective_sq for r in rows])
        var = np.where(count > 1, (total_sq - total**2 / count) / np.maximum(count - 1, 1), 0.0)
        return {"solution": np.stack([r.solution for r in rows]), "objective": total / count,
                "measures": np.stack([r.measures for r in rows]) / count[:, None],
                "std": np.sqrt(np.maximum(var, 0.0)), "count": count}
