"""Objective scaling: the units in which hypervolumes and MOQD scores are measured and plots drawn.

A hypervolume in raw units multiplies an accuracy by a parameter count and by milliseconds; its
number (2.5e5) says nothing, and the largest-ranged objective decides which points matter. Each
objective may therefore declare (``qd.problem.Objective``) or be given (the problem option
``scaling``, see ``parse``):

- ``scale="log"``: measured as ``log10(1 + value)`` (defined at 0; for counts, bytes, seconds;
  negative values count as 0);
- ``bounds=(low, high)``: the stated range of interest, mapped to [0, 1] after the scale.

Both are monotone increasing, so directions, dominance and Pareto sets are unchanged; only
volumes, contributions and axes change. When every objective has bounds and the problem states no
reference point, the reference is the worst corner of the bounds and the hypervolume is the share
of that box the front dominates (between 0 and 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qd.checks import is_finite_number

#: Allowed values of ``Objective.scale``.
SCALES = ("linear", "log")


def check_scale(scale: Any, bounds: Any, owner: str) -> tuple[float, float] | None:
    """Check one objective's ``scale`` and ``bounds``; return the bounds as two floats (or None).

    Raises:
        ValueError: naming ``owner``, the value and what is allowed.
    """
    if scale not in SCALES:
        raise ValueError(f"{owner}: scale={scale!r} is not allowed; allowed: {', '.join(map(repr, SCALES))}")
    if bounds is None:
        return None
    ok = (isinstance(bounds, Sequence) and not isinstance(bounds, str) and len(bounds) == 2
          and all(is_finite_number(b) for b in bounds) and bounds[0] < bounds[1])
    if not ok:
        raise ValueError(f"{owner}: bounds={bounds!r} is not allowed; allowed: [low, high], two finite numbers "
                         f"with low < high")
    if scale == "log" and bounds[0] < 0:
        raise ValueError(f"{owner}: bounds={list(bounds)!r} with scale='log' is not allowed; allowed: low >= 0 "
                         f"(a log scale measures non-negative quantities)")
    return float(bounds[0]), float(bounds[1])


def _scalar(scale: str, x: float) -> float:
    return math.log10(1.0 + max(x, 0.0)) if scale == "log" else x


@dataclass(frozen=True)
class Scaling:
    """Per-objective scale and bounds; ``apply`` maps (n, m) objective values to scaled units."""

    scales: tuple[str, ...]
    bounds: tuple[tuple[float, float] | None, ...]

    @classmethod
    def identity(cls, m: int) -> Scaling:
        """The scaling that changes nothing, for ``m`` objectives."""
        return cls(("linear",) * m, (None,) * m)

    @classmethod
    def of(cls, objectives: Sequence[Any]) -> Scaling:
        """From ``qd.problem.Objective`` objects (their ``scale`` and ``bounds``)."""
        return cls(tuple(o.scale for o in objectives), tuple(o.bounds for o in objectives))

    @property
    def is_identity(self) -> bool:
        """Whether every objective is linear and unbounded (``apply`` returns its input)."""
        return all(s == "linear" for s in self.scales) and all(b is None for b in self.bounds)

    @property
    def bounded(self) -> bool:
        """Every objective has stated bounds: hypervolumes are shares of the bounds' box."""
        return all(b is not None for b in self.bounds)

    def _transform(self, values: np.ndarray) -> np.ndarray:
        out = np.array(values, dtype=float, copy=True)
        for i, s in enumerate(self.scales):
            if s == "log":
                out[:, i] = np.log10(1.0 + np.maximum(out[:, i], 0.0))
        return out

    def _affine(self) -> tuple[np.ndarray, np.ndarray]:
        """Per objective: the transformed low end and the transformed width (0 and 1 without bounds)."""
        lo, width = np.zeros(len(self.scales)), np.ones(len(self.scales))
        for i, (s, b) in enumerate(zip(self.scales, self.bounds)):
            if b is not None:
                lo[i] = _scalar(s, b[0])
                width[i] = _scalar(s, b[1]) - lo[i]
        return lo, width

    def apply(self, values: np.ndarray) -> np.ndarray:
        """(n, m) objective values -> (n, m) scaled values (the same directions)."""
        values = np.asarray(values, dtype=float).reshape(-1, len(self.scales))
        if self.is_identity:
            return values
        lo, width = self._affine()
        return (self._transform(values) - lo) / width

    def invert(self, scaled: np.ndarray) -> np.ndarray:
        """(n, m) scaled values -> (n, m) objective values (``apply``'s inverse on its range)."""
        scaled = np.asarray(scaled, dtype=float).reshape(-1, len(self.scales))
        if self.is_identity:
            return scaled
        lo, width = self._affine()
        out = scaled * width + lo
        for i, s in enumerate(self.scales):
            if s == "log":
                out[:, i] = 10.0 ** out[:, i] - 1.0
        return out

    def label(self, i: int, name: str) -> str:
        """How objective ``i`` (called ``name``) is measured, for an axis or a table."""
        text = f"log10(1 + {name})" if self.scales[i] == "log" else name
        b = self.bounds[i]
        return f"{text} over {b[0]:g}..{b[1]:g}" if b is not None else text

    def describe(self, names: Sequence[str]) -> dict[str, Any]:
        """The non-linear or bounded objectives, by name (empty for the identity)."""
        return {n: {"scale": s, **({"bounds": list(b)} if b is not None else {})}
                for n, s, b in zip(names, self.scales, self.bounds) if s != "linear" or b is not None}

    def to_json(self) -> dict[str, Any]:
        """The scaling as plain JSON (``from_json``'s inverse)."""
        return {"scales": list(self.scales), "bounds": [list(b) if b is not None else None for b in self.bounds]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None, m: int) -> Scaling:
        """A scaling from ``to_json``'s output; the identity for ``m`` objectives when ``data`` is empty."""
        if not data:
            return cls.identity(m)
        return cls(tuple(data["scales"]), tuple(tuple(b) if b is not None else None for b in data["bounds"]))


def parse(spec: Any, names: Sequence[str], owner: str = "problem option scaling") -> dict[str, dict[str, Any]]:
    """Check a user's scaling: a mapping from objective name to ``"log"``, ``"linear"``,
    ``[low, high]`` (bounds on a linear scale) or ``{"scale": ..., "bounds": [low, high]}``.

    Returns:
        Objective name -> ``{"scale": str, "bounds": (low, high) | None}`` for the named objectives.

    Raises:
        ValueError: naming the objective, the value and what is allowed.
    """
    if not isinstance(spec, Mapping):
        raise ValueError(f"{owner}={spec!r} is not allowed; allowed: a table from objective name ({', '.join(names)}) "
                         f"to 'log', 'linear', [low, high] or {{scale = ..., bounds = [low, high]}}")
    out = {}
    for name, entry in spec.items():
        if name not in names:
            from qd.suggest import did_you_mean

            raise ValueError(f"{owner}: {name!r} is not an objective; allowed: {', '.join(names)}"
                             f"{did_you_mean([name], names)}")
        if isinstance(entry, str):
            scale, bounds = entry, None
        elif isinstance(entry, Mapping):
            unknown = sorted(set(entry) - {"scale", "bounds"})
            if unknown:
                raise ValueError(f"{owner}.{name}: unknown key(s) {unknown}; allowed: 'scale', 'bounds'")
            scale, bounds = entry.get("scale", "linear"), entry.get("bounds")
        else:
            scale, bounds = "linear", entry
        out[name] = {"scale": scale, "bounds": check_scale(scale, bounds, f"{owner}.{name}")}
    return out
