"""Pareto sets and hypervolume from recorded trials (moocore's routines; nothing re-written)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import moocore
import numpy as np

from qd.columns import Columns
from qd.problem import Problem
from qd.store import Store, Trial


def _minimised(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """(n, m) objective values -> (n, m) values to minimise."""
    signs = np.array([1.0 if d == "minimize" else -1.0 for d in directions])
    return values * signs


def pareto_front_mask(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """(n,) True for the non-dominated rows of (n, m) ``values`` (a repeated point kept once)."""
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
    """The problem's declared point, else the worst of (n, m) feasible ``values`` per objective
    pushed 10% of the range out (None when there are none)."""
    if problem is not None and problem.reference_point is not None:
        return Reference(tuple(float(v) for v in problem.reference_point), "problem")
    values = np.asarray(values, dtype=float).reshape(-1, len(directions))
    if not len(values):
        return None
    Y = _minimised(values, directions)
    worst, best = Y.max(axis=0), Y.min(axis=0)
    span = np.where(worst > best, worst - best, np.maximum(np.abs(worst), 1.0))
    ref_min = worst + 0.1 * span
    return Reference(tuple(float(v) for v in _minimised(ref_min[None, :], directions)[0]), "data")


def feasible(trials: Sequence[Trial]) -> list[Trial]:
    return [t for t in trials if t.feasible]


def pareto_trials(trials: Sequence[Trial], directions: Sequence[str]) -> list[Trial]:
    """The non-dominated trials among the complete, feasible ones (duplicates of a point kept once)."""
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
    """A hypervolume reference point in objective units, and where it came from."""

    point: tuple[float, ...]
    source: str  # "problem" or "data"


def reference_point(problem: Problem | None, trials: Sequence[Trial], directions: Sequence[str]) -> Reference | None:
    """The problem's declared point, else the worst feasible value per objective pushed 10% of the range out."""
    if problem is not None and problem.reference_point is not None:
        return Reference(tuple(float(v) for v in problem.reference_point), "problem")
    ok = feasible(trials)
    if not ok:
        return None
    Y = _minimised(np.array([t.values for t in ok]), directions)
    worst, best = Y.max(axis=0), Y.min(axis=0)
    span = np.where(worst > best, worst - best, np.maximum(np.abs(worst), 1.0))
    ref_min = worst + 0.1 * span
    return Reference(tuple(float(v) for v in _minimised(ref_min[None, :], directions)[0]), "data")


def hypervolume(values: np.ndarray, directions: Sequence[str], reference: Sequence[float]) -> float:
    """Hypervolume of (n, m) objective values against ``reference`` (points beyond it add nothing)."""
    values = np.asarray(values, dtype=float).reshape(-1, len(directions))
    Y = _minimised(values, directions)
    ref = _minimised(np.asarray(reference, dtype=float)[None, :], directions)[0]
    Y = Y[np.all(Y < ref, axis=1)]
    if len(Y) == 0:
        return 0.0
    return float(moocore.hypervolume(Y, ref=ref))


def hypervolume_history(trials: Sequence[Trial], directions: Sequence[str], reference: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Hypervolume after each finished evaluation: (k,) evaluation counts and (k,) hypervolumes."""
    counts, hvs, points = [], [], []
    finished = [t for t in trials if t.finished]
    for i, t in enumerate(finished, start=1):
        if t.feasible:
            points.append(t.values)
        counts.append(i)
        hvs.append(hypervolume(np.array(points), directions, reference) if points else 0.0)
    return np.array(counts), np.array(hvs)


def best_trial(trials: Sequence[Trial], direction: str, index: int = 0) -> Trial | None:
    """The feasible trial with the best value of objective ``index`` (the earliest among equals)."""
    ok = feasible(trials)
    if not ok:
        return None
    sign = 1.0 if direction == "minimize" else -1.0
    return min(ok, key=lambda t: (sign * t.values[index], t.number))


def best_so_far(trials: Sequence[Trial], direction: str, index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One objective over time: (k,) finished-evaluation counts and (k,) best feasible value so far
    (NaN until the first feasible evaluation)."""
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
    """What ``qd show --json`` prints, from the run's columns (one read of the record)."""
    cols = store.columns() if cols is None else cols
    directions = list(store.directions)
    ok = np.flatnonzero(cols.feasible)
    front = ok[pareto_front_mask(cols.values[ok], directions)] if len(ok) else ok
    front = front[np.argsort(cols.values[front, 0], kind="stable")] if len(front) else front
    # One objective: the best trial is the answer; a one-dimensional "hypervolume" is only a shifted best value.
    ref = reference_point_of_values(problem, cols.values[ok], directions) if len(directions) > 1 else None
    hv = hypervolume(cols.values[front], directions, ref.point) if (ref and len(front)) else None
    configs = store.to_trials(cols.select(front)) if len(front) else []
    failed = np.flatnonzero((cols.state == 2) & ~cols.stale)
    best = None
    if len(directions) == 1 and len(ok):
        sign = 1.0 if directions[0] == "minimize" else -1.0
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
        "hypervolume_reference": {"point": list(ref.point), "source": ref.source} if ref else None,
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
