"""Pareto sets and hypervolume from recorded trials (moocore's routines; nothing re-written)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import moocore
import numpy as np

from qd.columns import Columns
from qd.problem import Problem, sign_of, signs_of
from qd.scaling import Scaling
from qd.store import Store, Trial


def _minimised(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """(n, m) objective values -> (n, m) values to minimise."""
    return values * signs_of(directions)


def pareto_front_mask(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """The non-dominated rows of a set of objective values.

    Args:
        values: (n, m) objective values.
        directions: m directions, ``"minimize"`` or ``"maximize"``.

    Returns:
        (n,) bool mask, True for the non-dominated rows; a repeated point is kept once (its first
        row). With one objective: the first best row.
    """
    values = np.asarray(values, dtype=float).reshape(-1, len(directions))
    mask = np.zeros(len(values), dtype=bool)
    if not len(values):
        return mask
    Y = _minimised(values, directions)
    if Y.shape[1] == 1:
        mask[int(np.argmin(Y[:, 0]))] = True
        return mask
    candidates = np.flatnonzero(moocore.is_nondominated(Y))
    _, first = np.unique(Y[candidates], axis=0, return_index=True)
    mask[candidates[np.sort(first)]] = True
    return mask


def reference_point_of_values(problem: Problem | None, values: np.ndarray, directions: Sequence[str]) -> Reference | None:
    """The hypervolume reference of a run of ``problem``: ``reference_of`` with its scaling and
    declared point.

    Args:
        problem: the run's problem, or None (raw units, a point from the data).
        values: (n, m) feasible objective values.
        directions: m directions.

    Returns:
        The ``Reference``, or None when there is neither a declared point nor a value.
    """
    return reference_of(values, directions, problem.scaling if problem is not None else None,
                        problem.reference_point if problem is not None else None)


def reference_of(values: np.ndarray, directions: Sequence[str], scaling: Scaling | None = None,
                 declared: Sequence[float] | None = None) -> Reference | None:
    """A hypervolume reference in objective units, measured in ``scaling``'s units.

    The ``declared`` point (a problem's); else, when every objective has bounds (``qd.scaling``),
    the bounds' worst corner; else the worst of the feasible ``values`` per objective pushed 10% of
    the range out, in scaled units.

    Args:
        values: (n, m) feasible objective values.
        directions: m directions.
        scaling: the units the hypervolume is measured in (None: raw units).
        declared: a reference point of m numbers, or None.

    Returns:
        The ``Reference`` (its ``source`` says which of the three it is), or None when there is
        neither a point nor a value.
    """
    scaling = scaling if scaling is not None else Scaling.identity(len(directions))
    if declared is not None:
        return Reference(tuple(float(v) for v in declared), "problem", scaling)
    if scaling.bounded:
        corner = [b[1] if d == "minimize" else b[0] for b, d in zip(scaling.bounds, directions)]
        return Reference(tuple(float(v) for v in corner), "bounds", scaling)
    values = np.asarray(values, dtype=float).reshape(-1, len(directions))
    if not len(values):
        return None
    Y = _minimised(scaling.apply(values), directions)
    worst, best = Y.max(axis=0), Y.min(axis=0)
    span = np.where(worst > best, worst - best, np.maximum(np.abs(worst), 1.0))
    ref_min = worst + 0.1 * span
    point = scaling.invert(_minimised(ref_min[None, :], directions))[0]
    return Reference(tuple(float(v) for v in point), "data", scaling)


def feasible(trials: Sequence[Trial]) -> list[Trial]:
    """The complete trials whose constraints all hold (``Trial.feasible``), in order."""
    return [t for t in trials if t.feasible]


def pareto_trials(trials: Sequence[Trial], directions: Sequence[str]) -> list[Trial]:
    """The non-dominated trials among the complete, feasible ones.

    Args:
        trials: any trials.
        directions: m directions.

    Returns:
        The non-dominated trials in their order; of several with the same values, the first.
    """
    ok = feasible(trials)
    if not ok:
        return []
    Y = _minimised(np.array([t.values for t in ok]), directions)
    mask = moocore.is_nondominated(Y)
    seen, out = set(), []
    for t, keep in zip(ok, mask):
        if keep and tuple(t.values) not in seen:
            seen.add(tuple(t.values))
            out.append(t)
    return out


@dataclass(frozen=True)
class Reference:
    """A hypervolume reference point in objective units, where it came from ("problem", "bounds",
    "data" or "option"), and the scaling the hypervolume is measured in (``qd.scaling``)."""

    point: tuple[float, ...]
    source: str
    scaling: Scaling | None = None

    def caption(self, names: Sequence[str]) -> str:
        """E.g. "reference (0.5, 1e+06) from the data; params on a log scale": what a hypervolume
        figure is measured against and in which units.

        Args:
            names: the m objective names.

        Returns:
            The caption.
        """
        text = f"reference ({', '.join(f'{v:.4g}' for v in self.point)}) from the {self.source}"
        if self.scaling is not None and not self.scaling.is_identity:
            scaled = [self.scaling.label(i, n) for i, n in enumerate(names)
                      if self.scaling.scales[i] != "linear" or self.scaling.bounds[i] is not None]
            text += "; measured in " + ", ".join(scaled)
        if self.source == "bounds":
            text += " (1 = the whole box of the bounds)"
        return text

    def describe(self, names: Sequence[str]) -> dict[str, Any]:
        """What ``qd show --json`` and the reports print about it."""
        scaled = self.scaling.describe(names) if self.scaling is not None else {}
        return {"point": list(self.point), "source": self.source, **({"scaling": scaled} if scaled else {})}


def reference_point(problem: Problem | None, trials: Sequence[Trial], directions: Sequence[str]) -> Reference | None:
    """``reference_point_of_values`` over the feasible ones of ``trials``.

    Args:
        problem: the run's problem, or None.
        trials: the run's trials.
        directions: m directions.

    Returns:
        The ``Reference``, or None without a declared point and without feasible trials.
    """
    ok = feasible(trials)
    values = np.array([t.values for t in ok]) if ok else np.empty((0, len(directions)))
    return reference_point_of_values(problem, values, directions)


def hypervolume(values: np.ndarray, directions: Sequence[str], reference: Reference | Sequence[float]) -> float:
    """Hypervolume of objective values against a reference (moocore); points beyond it add nothing.

    Args:
        values: (n, m) objective values (n may be 0).
        directions: m directions.
        reference: a ``Reference``, which carries the scaling the volume is measured in, or a bare
            point of m numbers in raw units.

    Returns:
        The hypervolume, >= 0.
    """
    scaling = reference.scaling if isinstance(reference, Reference) else None
    point = reference.point if isinstance(reference, Reference) else reference
    values = np.asarray(values, dtype=float).reshape(-1, len(directions))
    point = np.asarray(point, dtype=float)[None, :]
    if scaling is not None and not scaling.is_identity:
        values, point = scaling.apply(values), scaling.apply(point)
    Y = _minimised(values, directions)
    ref = _minimised(point, directions)[0]
    Y = Y[np.all(Y < ref, axis=1)]
    if len(Y) == 0:
        return 0.0
    return float(moocore.hypervolume(Y, ref=ref))


def hypervolume_history(trials: Sequence[Trial], directions: Sequence[str],
                        reference: Reference | Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Hypervolume after each finished evaluation.

    Args:
        trials: the run's trials in number order.
        directions: m directions.
        reference: as for ``hypervolume``.

    Returns:
        ``(counts, hypervolumes)``: (k,) finished-evaluation counts 1..k and (k,) hypervolumes of
        the feasible ones so far.
    """
    counts, hvs, points = [], [], []
    finished = [t for t in trials if t.finished]
    for i, t in enumerate(finished, start=1):
        if t.feasible:
            points.append(t.values)
        counts.append(i)
        hvs.append(hypervolume(np.array(points), directions, reference) if points else 0.0)
    return np.array(counts), np.array(hvs)


def best_trial(trials: Sequence[Trial], direction: str, index: int = 0) -> Trial | None:
    """The feasible trial with the best value of one objective.

    Args:
        trials: any trials.
        direction: that objective's direction.
        index: that objective's index.

    Returns:
        The trial (the lowest number among equals), or None when none is feasible.
    """
    ok = feasible(trials)
    if not ok:
        return None
    sign = sign_of(direction)
    return min(ok, key=lambda t: (sign * t.values[index], t.number))


def best_so_far(trials: Sequence[Trial], direction: str, index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One objective over time.

    Args:
        trials: the run's trials in number order.
        direction: that objective's direction.
        index: that objective's index.

    Returns:
        ``(counts, best)``: (k,) finished-evaluation counts 1..k and (k,) the best feasible value so
        far (NaN until the first feasible evaluation).
    """
    better = min if direction == "minimize" else max
    counts, best, out = [], None, []
    for i, t in enumerate((t for t in trials if t.finished), start=1):
        if t.feasible:
            best = t.values[index] if best is None else better(best, t.values[index])
        counts.append(i)
        out.append(np.nan if best is None else best)
    return np.array(counts, dtype=int), np.array(out, dtype=float)


#: Failures listed by ``summary`` (the count covers them all).
MAX_LISTED_FAILURES = 100


def summary(store: Store, problem: Problem | None = None, cols: Columns | None = None) -> dict[str, Any]:
    """What ``qd show --json`` prints, from the run's columns (one read of the record).

    Args:
        store: the run's store.
        problem: the run's problem (needed for its reference point, scaling and archive), or None.
        cols: the run's columns when already read (default: ``store.columns()``).

    Returns:
        A JSON-ready dict: the run's identity (``name``, ``problem``, ``strategy``, options,
        ``seed``), ``objectives``, trial counts, ``pareto_front`` (sorted by the first objective),
        ``best`` (one objective), ``hypervolume`` and ``hypervolume_reference`` (several),
        ``failures`` (at most ``MAX_LISTED_FAILURES``), and ``archive`` when the run has one.
    """
    cols = store.columns() if cols is None else cols
    directions = list(store.directions)
    ok = np.flatnonzero(cols.feasible)
    front = ok[pareto_front_mask(cols.values[ok], directions)] if len(ok) else ok
    front = front[np.argsort(cols.values[front, 0], kind="stable")] if len(front) else front
    # One objective: the best trial is the answer; a one-dimensional "hypervolume" is only a shifted best value.
    ref = reference_point_of_values(problem, cols.values[ok], directions) if len(directions) > 1 else None
    hv = hypervolume(cols.values[front], directions, ref) if (ref and len(front)) else None
    configs = store.to_trials(cols.select(front)) if len(front) else []
    failed = np.flatnonzero((cols.state == 2) & ~cols.stale)
    best = None
    if len(directions) == 1 and len(ok):
        sign = sign_of(directions[0])
        i_best = ok[np.lexsort((cols.number[ok], sign * cols.values[ok, 0]))[0]]
        best = store.to_trials(cols.select(np.array([i_best])))[0]
    return {
        "name": store.info.name,
        "problem": store.info.problem,
        "problem_options": store.info.problem_options,
        "strategy": store.info.strategy,
        "strategy_options": store.info.strategy_options,
        "seed": store.info.seed,
        "objectives": [{"name": n, "direction": d} for n, d in zip(store.objective_names, directions)],
        **cols.counts(),
        "pareto_front": [{"number": t.number, "params": t.params, "values": t.values,
                          **({"measures": t.measures} if t.measures else {})} for t in configs],
        "best": {"number": best.number, "value": best.values[0], "params": best.params} if best else None,
        "hypervolume": hv,
        "hypervolume_reference": ref.describe(store.objective_names) if ref else None,
        "failures": [{"number": int(cols.number[i]), "reason": (cols.reason[i] or "").split("\n")[0]}
                     for i in failed[:MAX_LISTED_FAILURES].tolist()],
        **({"archive": _archive_summary(store, problem, cols)}
           if problem is not None and store.archive_spec_json is not None else {}),
    }


def _archive_summary(store: Store, problem: Problem, cols: Columns) -> dict[str, Any]:
    """The run's archive rebuilt from its trials: metrics and what the archive is (qd.archive)."""
    from qd.archive import archive_for_run, grid_summary

    quick = grid_summary(problem, store.archive_spec_json, cols)  # grids without pyribs (its import costs seconds)
    if quick is not None:
        return quick
    archive = archive_for_run(store, problem, cols)
    return {**archive.metrics(), **archive.describe()}
