"""Archives of a run: built from the problem's measures and the strategy's options, rebuilt from the store.

The store is the only record of a run, so an archive is never pickled: ``archive_for_run`` builds
an empty one from the problem and the run's recorded strategy options, and ``add_trials`` inserts
the run's complete trials in creation order. The strategies (on resume), the metrics recorder,
``qd show`` and ``qd plot`` all build their archive this way, so they agree.

Two kinds:

- ``EliteArchive``: one objective, one elite per cell; a pyribs ``GridArchive`` (``bins`` per
  measure) or ``CVTArchive`` (``cells`` centroids). With CMA-MAE's ``learning_rate`` it holds two
  pyribs archives: the thresholded one the emitters learn from and a plain *result* archive that
  keeps the best solution per cell; metrics always come from the result archive.
- ``ParetoArchive``: MOME's grid (pyribs does not have one). Each cell keeps a Pareto front of
  at most ``front_size`` points; moocore decides non-domination and computes hypervolumes.

Conventions:

- A solution is the encoded vector of the configuration that was evaluated,
  ``space.encode(trial.params)``, so a rebuilt archive holds exactly what a live one held.
- Only complete, feasible trials (constraints <= 0) with measures are inserted; failed and
  infeasible ones are left out (they are in the store, not in the map).
- pyribs maximises. An elite archive stores ``score_factor * value`` (``score_factor`` = +1 to
  maximise, -1 to minimise: minus the objective's ``sign``) and reports values back in the objective's own units. ``qd_score_offset`` is given
  in objective units: the value that counts as zero in the QD score (default: the problem's
  reference point for that objective if it declares one, else 0), so every elite adds
  ``|value - offset|`` when it is better than the offset.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import moocore
import numpy as np

from qd.checks import OptionError, is_finite_number, is_int
from qd.columns import Columns
from qd.problem import Problem, sign_of
from qd.scaling import Scaling
from qd.store import Store, Trial

if TYPE_CHECKING:  # pyribs imports torch, sklearn and numba: seconds that `qd show` need not pay
    from ribs.archives import ArchiveBase

ArchiveKind = Literal["grid", "cvt"]
ARCHIVE_KINDS: tuple[str, ...] = ("grid", "cvt")
#: Cells per measure when ``bins`` is not given: about 400 cells in all, at most 20 per measure.
DEFAULT_TOTAL_CELLS = 400
MAX_DEFAULT_BINS = 20
#: Uniform samples per centroid for the CVT's k-means (pyribs' default of 100,000 samples takes
#: seconds; 10 per cell gives centroids whose cell volumes differ by a few percent).
CVT_SAMPLES_PER_CELL = 10


class ArchiveOptionError(OptionError):
    """A bad option of a run's archive (bins, cells, reference point, learning rate, ...)."""


# --- options ------------------------------------------------------------------------------------
def default_bins(n_measures: int, measures: Sequence[Any] = ()) -> tuple[int, ...]:
    """Bins per measure: one per value for integer and categorical measures (``Measure.integer``),
    and for the continuous ones about ``DEFAULT_TOTAL_CELLS`` cells in all, at most 20 per measure.

    Args:
        n_measures: the number of measures k (used when ``measures`` is empty).
        measures: the problem's ``Measure`` objects, when known.

    Returns:
        k bin counts.
    """
    counts = [len(m.values) if getattr(m, "integer", False) else None for m in measures] or [None] * n_measures
    fixed = int(np.prod([c for c in counts if c is not None] or [1]))
    free = sum(c is None for c in counts)
    per = min(MAX_DEFAULT_BINS, max(2, round(max(2.0, DEFAULT_TOTAL_CELLS / fixed) ** (1.0 / free)))) if free else 0
    return tuple(per if c is None else c for c in counts)


def parse_bins(bins: Any, problem: Problem, owner: str) -> tuple[int, ...]:
    """Check the ``bins`` option of a grid archive.

    Args:
        bins: one int >= 1 for every measure, one int >= 1 per measure, or None (``default_bins``).
        problem: the problem whose measures the grid covers.
        owner: who takes the option, for the error message.

    Returns:
        k bin counts, one per measure.

    Raises:
        ArchiveOptionError: ``bins`` is none of the above.
    """
    m = len(problem.measures)
    if bins is None:
        return default_bins(m, problem.measures)
    allowed = (f"one integer >= 1, or a list of {m} integers >= 1 (one per measure: "
               f"{', '.join(problem.measure_names)})")
    if is_int(bins) and bins >= 1:
        return (int(bins),) * m
    if isinstance(bins, Sequence) and not isinstance(bins, str) and len(bins) == m \
            and all(is_int(b) and b >= 1 for b in bins):
        return tuple(int(b) for b in bins)
    raise ArchiveOptionError(f"{owner}: option bins={bins!r} is not allowed; allowed: {allowed}")


def objective_index(problem: Problem, objective: str | None, owner: str) -> int:
    """The index of the objective an elite archive ranks by.

    Args:
        problem: the problem.
        objective: an objective name, or None for the first.
        owner: who takes the option, for the error message.

    Returns:
        Its index in ``problem.objectives``.

    Raises:
        ArchiveOptionError: ``objective`` is not one of the problem's.
    """
    if objective is None:
        return 0
    names = problem.objective_names
    if objective not in names:
        raise ArchiveOptionError(f"{owner}: option objective={objective!r} is not allowed; allowed: one of {names}")
    return names.index(objective)


def _finite_number(value: Any, option: str, owner: str) -> float:
    if not is_finite_number(value):
        raise ArchiveOptionError(f"{owner}: option {option}={value!r} is not allowed; allowed: a finite number")
    return float(value)


def require_measures(problem: Problem, owner: str) -> None:
    """Raise ``ArchiveOptionError`` (naming ``owner``) when ``problem`` declares no measures."""
    if not problem.measures:
        raise ArchiveOptionError(
            f"{owner} needs a problem with measures; problem {problem.name or type(problem).__name__!r} declares none "
            f"(see `qd problems` for the measures of each problem)"
        )


@dataclass(frozen=True)
class EliteSpec:
    """What an ``EliteArchive`` is made of. Objective-dependent numbers are in objective units.

    Build it with ``elite_spec``, which checks the options; the record keeps it as ``spec_to_json``.
    """

    kind: ArchiveKind
    bins: tuple[int, ...] | None  # grid
    cells: int | None  # cvt
    objective: str
    objective_index: int
    direction: str
    qd_score_offset: float
    learning_rate: float | None = None  # CMA-MAE: the thresholded archive's learning rate
    threshold_min: float | None = None  # CMA-MAE: initial cell threshold (objective units)
    seed: int = 0
    #: Repeated evaluations of one configuration are averaged (``qd.noise``): it is placed by its
    #: mean measures and ranked by its mean objective, so one lucky seed cannot hold a cell.
    aggregate: bool = False
    #: Only trials whose ``fidelity`` parameter is at ``fidelity_top`` (its most faithful value)
    #: are inserted: lower-fidelity evaluations of a multi-fidelity search stay out of the map.
    fidelity: str | None = None
    fidelity_top: Any = None

    @property
    def score_factor(self) -> float:
        """Multiply an objective value by this to get the number pyribs maximises (``-sign_of``)."""
        return -sign_of(self.direction)

    def describe(self) -> dict[str, Any]:
        """The spec as a plain dict for ``qd show`` and reports (only the fields in use)."""
        out: dict[str, Any] = {"kind": self.kind, "objective": self.objective, "direction": self.direction,
                               "qd_score_offset": self.qd_score_offset}
        out.update({"bins": list(self.bins)} if self.kind == "grid" else {"cells": self.cells})
        if self.learning_rate is not None:
            out.update(learning_rate=self.learning_rate, threshold_min=self.threshold_min)
        if self.aggregate:
            out["aggregate"] = "mean over repeated evaluations of a configuration"
        if self.fidelity is not None:
            out["fidelity"] = {"parameter": self.fidelity, "value": self.fidelity_top}
        return out


def elite_spec(problem: Problem, *, archive: str = "grid", bins: Any = None, cells: Any = None,
               objective: str | None = None, qd_score_offset: Any = None, learning_rate: Any = None,
               threshold_min: Any = None, seed: int = 0, owner: str = "archive", aggregate: bool = False,
               fidelity: str | None = None) -> EliteSpec:
    """Check the archive options of a single-objective QD run and fill in the defaults.

    Args:
        problem: the problem; it must declare measures.
        archive: ``"grid"`` or ``"cvt"``.
        bins: grid only: see ``parse_bins``.
        cells: CVT only: the number of centroids, an int >= 2 (default: as many as the default grid).
        objective: the objective to rank by (default: the first).
        qd_score_offset: the value that counts as zero in the QD score, in objective units
            (default: the problem's reference point for that objective, else 0).
        learning_rate: CMA-MAE's archive learning rate in [0, 1] (None: plain elitism).
        threshold_min: CMA-MAE's initial cell threshold in objective units (default: the offset).
        seed: seeds the CVT's centroids.
        owner: who takes the options, for error messages.
        aggregate: average repeated evaluations per configuration (not with ``learning_rate``).
        fidelity: a parameter name; only trials at its most faithful value (``top_value``) count.

    Returns:
        The checked ``EliteSpec``.

    Raises:
        ArchiveOptionError: any option above not allowed, or a problem without measures.
    """
    require_measures(problem, owner)
    if archive not in ARCHIVE_KINDS:
        raise ArchiveOptionError(f"{owner}: option archive={archive!r} is not allowed; allowed: {list(ARCHIVE_KINDS)}")
    if archive == "grid":
        if cells is not None:
            raise ArchiveOptionError(f"{owner}: option cells={cells!r} is only for archive='cvt'; "
                                     f"a grid archive takes bins (per measure or one int)")
        grid_bins, n_cells = parse_bins(bins, problem, owner), None
    else:
        if bins is not None:
            raise ArchiveOptionError(f"{owner}: option bins={bins!r} is only for archive='grid'; "
                                     f"a CVT archive takes cells (the number of centroids)")
        if cells is None:
            cells = int(np.prod(default_bins(len(problem.measures), problem.measures)))
        if not is_int(cells) or cells < 2:
            raise ArchiveOptionError(f"{owner}: option cells={cells!r} is not allowed; allowed: an integer >= 2")
        grid_bins, n_cells = None, int(cells)
    index = objective_index(problem, objective, owner)
    obj = problem.objectives[index]
    if qd_score_offset is None:
        ref = problem.reference_point
        qd_score_offset = float(ref[index]) if ref is not None else 0.0
    offset = _finite_number(qd_score_offset, "qd_score_offset", owner)
    if learning_rate is not None:
        lr = _finite_number(learning_rate, "learning_rate", owner)
        if not 0.0 <= lr <= 1.0:
            raise ArchiveOptionError(f"{owner}: option learning_rate={learning_rate!r} is not allowed; "
                                     f"allowed: a number in [0, 1]")
        threshold = offset if threshold_min is None else _finite_number(threshold_min, "threshold_min", owner)
    else:
        lr, threshold = None, None
    if aggregate and lr is not None:
        raise ArchiveOptionError(f"{owner}: averaging repeated evaluations needs a plain elitist archive; "
                                 f"it is not allowed with learning_rate={learning_rate!r}")
    top = None
    if fidelity is not None:
        if fidelity not in problem.space.names:
            raise ArchiveOptionError(f"{owner}: fidelity parameter {fidelity!r} is not in the space; allowed: one of "
                                     f"{problem.space.names}")
        top = top_value(problem.space[fidelity])
    return EliteSpec(kind=archive, bins=grid_bins, cells=n_cells, objective=obj.name, objective_index=index,
                     direction=obj.direction, qd_score_offset=offset, learning_rate=lr, threshold_min=threshold,
                     seed=int(seed), aggregate=bool(aggregate), fidelity=fidelity, fidelity_top=top)


def top_value(param: Any) -> Any:
    """The most faithful value of a fidelity parameter: the high end of a range, the last choice."""
    choices = getattr(param, "choices", None)
    return choices[-1] if choices is not None else param.high


@dataclass(frozen=True)
class ParetoSpec:
    """What a ``ParetoArchive`` is made of; ``reference_point`` in objective units."""

    bins: tuple[int, ...]
    front_size: int
    reference_point: tuple[float, ...]
    reference_source: str  # "problem" or "option"
    #: The units of the per-cell hypervolumes (``qd.scaling``; empty: objective units).
    scales: tuple[str, ...] = ()
    bounds: tuple[tuple[float, float] | None, ...] = ()
    #: As ``EliteSpec.fidelity``: with ASHA, only trials at the most faithful value go in.
    fidelity: str | None = None
    fidelity_top: Any = None

    @property
    def scaling(self) -> Scaling:
        """The ``Scaling`` the per-cell hypervolumes are computed in (identity when ``scales`` is empty)."""
        if not self.scales:
            return Scaling.identity(len(self.reference_point))
        return Scaling(self.scales, self.bounds)

    def describe(self) -> dict[str, Any]:
        """The spec as a plain dict for ``qd show`` and reports."""
        return {"kind": "pareto-grid", "bins": list(self.bins), "front_size": self.front_size,
                "reference_point": list(self.reference_point), "reference_source": self.reference_source,
                **({"scaling": self.scaling.to_json()} if not self.scaling.is_identity else {}),
                **({"fidelity": {"parameter": self.fidelity, "value": self.fidelity_top}} if self.fidelity else {})}


def pareto_spec(problem: Problem, *, bins: Any = None, front_size: Any = 10, reference_point: Any = None,
                owner: str = "archive") -> ParetoSpec:
    """Check MOME's archive options and fill in the defaults.

    Args:
        problem: the problem; it must declare measures.
        bins: see ``parse_bins``.
        front_size: the most points a cell's front keeps, an int >= 1.
        reference_point: m numbers, one per objective (default: the problem's).
        owner: who takes the options, for error messages.

    Returns:
        The checked ``ParetoSpec``; its scaling is the problem's.

    Raises:
        ArchiveOptionError: an option not allowed, no reference point from either source, or a
            problem without measures.
    """
    require_measures(problem, owner)
    m = len(problem.objectives)
    if not is_int(front_size) or front_size < 1:
        raise ArchiveOptionError(f"{owner}: option front_size={front_size!r} is not allowed; allowed: an integer >= 1")
    if reference_point is None:
        if problem.reference_point is None:
            raise ArchiveOptionError(
                f"{owner}: option reference_point is needed because problem "
                f"{problem.name or type(problem).__name__!r} declares none; allowed: a list of {m} numbers, one per "
                f"objective ({', '.join(problem.objective_names)}), each worse than every value of interest")
        ref, source = tuple(float(v) for v in problem.reference_point), "problem"
    else:
        if isinstance(reference_point, str) or not isinstance(reference_point, Sequence) or len(reference_point) != m \
                or not all(is_finite_number(v)
                           for v in reference_point):
            raise ArchiveOptionError(f"{owner}: option reference_point={reference_point!r} is not allowed; allowed: "
                                     f"a list of {m} finite numbers, one per objective "
                                     f"({', '.join(problem.objective_names)})")
        ref, source = tuple(float(v) for v in reference_point), "option"
    scaling = problem.scaling
    scales, bounds = ((), ()) if scaling.is_identity else (scaling.scales, scaling.bounds)
    return ParetoSpec(bins=parse_bins(bins, problem, owner), front_size=int(front_size), reference_point=ref,
                      reference_source=source, scales=scales, bounds=bounds)


# --- archives -----------------------------------------------------------------------------------
def insertable(trial: Trial) -> bool:
    """Complete, feasible and with measures: the trials an archive takes."""
    return trial.feasible and trial.measures is not None and len(trial.measures) > 0


def _ranges(problem: Problem) -> list[tuple[float, float]]:
    return [m.map_range for m in problem.measures]  # integer measures: bins centred on their values


class RunArchive(Protocol):
    """What a run's archive offers every view and strategy; ``EliteArchive`` and ``ParetoArchive``
    implement it (``kind`` tells them apart, never ``hasattr``)."""

    #: "elite" (one objective, one elite per cell) or "pareto" (a bounded front per cell).
    kind: ClassVar[str]
    problem: Problem
    spec: EliteSpec | ParetoSpec

    @property
    def layout(self) -> ArchiveBase:
        """The pyribs archive that does the cell arithmetic (a ``GridArchive`` or ``CVTArchive``)."""

    @property
    def empty(self) -> bool:
        """Whether no solution has been inserted."""

    @property
    def n_cells(self) -> int:
        """The number of cells of the map."""

    def cell_of(self, measures: np.ndarray) -> np.ndarray:
        """Cells of measure vectors.

        Args:
            measures: (n, k) measures (one (k,) vector is taken as n = 1).

        Returns:
            (n,) integer cell indices; measures outside the bounds go to the edge cells.
        """

    def cells_of(self, cols: Columns) -> np.ndarray:
        """Cells of the rows of a run's columns.

        Args:
            cols: n rows of the record.

        Returns:
            (n,) the cell of each row the archive would take, else -1.
        """

    def add_columns(self, cols: Columns) -> None:
        """Insert the complete, feasible rows of ``cols`` that have measures, in order."""

    def add_trials(self, trials: Sequence[Trial]) -> None:
        """Insert the complete, feasible ``trials`` that have measures, in order."""

    def metrics(self) -> dict[str, Any]:
        """The archive's metrics.

        Returns:
            A dict with ``coverage``, ``qd_score`` (the MOQD score for a Pareto archive),
            ``norm_qd_score``, ``num_elites`` and ``best`` (a float, a list per objective, or None).
        """

    def describe(self) -> dict[str, Any]:
        """What the archive is: its kind, cells and options."""

    def spec_json(self) -> dict[str, Any]:
        """The spec as the record keeps it (``spec_to_json``)."""


_COMPILED = False


def compile_batch_insertion() -> None:
    """Compile pyribs' batch insertion now, once per process: its first ``add`` JIT-compiles
    numba code (numpy_groupies' ``aggregate``, about 0.7 s), which a run's loop would otherwise pay
    on its first batch. The compiled code depends on dtypes only, so a scratch archive serves."""
    global _COMPILED
    if _COMPILED:
        return
    from ribs.archives import GridArchive

    scratch = GridArchive(solution_dim=1, dims=(2,), ranges=[(0.0, 1.0)])
    scratch.add(solution=np.zeros((2, 1)), objective=np.array([0.0, 1.0]), measures=np.zeros((2, 1)))
    _COMPILED = True


class EliteArchive:
    """One objective, one elite per cell, on pyribs archives (see the module docstring).

    Args:
        problem: the problem; its measures' ``map_range`` give the bounds.
        spec: the checked options (``elite_spec``).
    """

    kind: ClassVar[str] = "elite"

    def __init__(self, problem: Problem, spec: EliteSpec):
        self.problem, self.spec, self.space = problem, spec, problem.space
        from ribs.archives import CVTArchive, GridArchive

        d, sign = problem.space.dim, spec.score_factor
        offset = sign * spec.qd_score_offset
        common = {"solution_dim": d, "ranges": _ranges(problem), "qd_score_offset": offset, "seed": spec.seed}
        if spec.kind == "grid":
            def make(**kw: Any) -> ArchiveBase:
                return GridArchive(dims=spec.bins, **common, **kw)
        else:
            samples = max(1000, CVT_SAMPLES_PER_CELL * spec.cells)
            # One set of centroids per run seed, so a rebuilt archive has the same cells.
            centroids = CVTArchive(centroids=spec.cells, samples=samples, **common).centroids

            def make(**kw: Any) -> ArchiveBase:
                return CVTArchive(centroids=centroids, **common, **kw)
        #: The plain archive: best solution per cell. Metrics and plots read this one.
        self.result: ArchiveBase = make()
        #: The archive emitters learn from: the thresholded one for CMA-MAE, else ``result``.
        self.archive: ArchiveBase = self.result
        if spec.learning_rate is not None:
            self.archive = make(learning_rate=spec.learning_rate, threshold_min=sign * spec.threshold_min)
        self.n_inserted = 0
        compile_batch_insertion()
        self._grid: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (dims, lower, interval) of a grid
        #: Per-configuration sums when ``spec.aggregate`` (``qd.noise``), else None.
        self.repeats = None
        if spec.aggregate:
            from qd.noise import RepeatStats

            self.repeats = RepeatStats(d, len(problem.measures))

    def spec_json(self) -> dict[str, Any]:
        """The spec as the record keeps it (``spec_to_json``)."""
        return spec_to_json(self.spec)

    @property
    def layout(self) -> ArchiveBase:
        """The result archive, whose cells every view reads."""
        return self.result

    def cell_of(self, measures: np.ndarray) -> np.ndarray:
        """(n, k) measures -> (n,) integer cells (outside the bounds: the edge cells)."""
        return np.asarray(self.result.index_of(np.atleast_2d(np.asarray(measures, dtype=float))), dtype=int)

    def _takes_rows(self, cols: Columns) -> np.ndarray:
        """(n,) which rows go into this archive (feasible, finite measures, top fidelity)."""
        return _elite_rows_taken(self.spec, self.space, cols)

    def add_columns(self, cols: Columns) -> None:
        """Insert the rows of ``cols`` this archive takes, in order (one pyribs batch when the
        archive is plainly elitist; one at a time for CMA-MAE's thresholds and averaged repeats)."""
        ok = self._takes_rows(cols)
        if not ok.any():
            return
        if self.repeats is not None:
            from qd.store import trials_of

            self.add_trials(trials_of(cols.select(ok), self.space))
            return
        # A plain elitist grid keeps each cell's best row (the earliest of equals, as pyribs does):
        # inserting only those builds the same archive (a resume of 10^6 trials adds 400 rows).
        best_only = self.spec.learning_rate is None and self.spec.kind == "grid" and ok.sum() > 4 * self.n_cells
        if ok.all() and not best_only:  # a run's batch: whole arrays, no copies
            self._insert(cols.raw, cols.values[:, self.spec.objective_index], cols.measures)
            return
        rows = np.flatnonzero(ok)
        if best_only:
            score = self.spec.score_factor * cols.values[rows, self.spec.objective_index]
            keep = rows[best_of_cells(self._grid_cells(cols.measures[rows]), score, cols.number[rows], self.n_cells)]
            self.n_inserted += len(rows) - len(keep)
            rows = keep
        self._insert(cols.raw[rows], cols.values[rows, self.spec.objective_index], cols.measures[rows])

    def _insert(self, raw: np.ndarray, values: np.ndarray, measures: np.ndarray) -> None:
        """Insert rows into the pyribs archive(s): raw (n, d), objective values (n,), measures (n, k)."""
        X = self.space.encode_raw(raw)
        objective = self.spec.score_factor * values
        if self.spec.learning_rate is None:
            self.archive.add(solution=X, objective=objective, measures=measures)
        else:
            for i in range(len(X)):
                self.archive.add(solution=X[i:i + 1], objective=objective[i:i + 1], measures=measures[i:i + 1])
            self.result.add(solution=X, objective=objective, measures=measures)
        self.n_inserted += len(X)

    def cells_of(self, cols: Columns) -> np.ndarray:
        """(n,) the cell of each row this archive takes, else -1."""
        ok = self._takes_rows(cols)
        if len(ok) and ok.all():  # a run's block: no masked copies
            return self._cells(cols.measures)
        out = np.full(len(cols), -1, dtype=np.int64)
        if ok.any():
            out[ok] = self._cells(cols.measures[ok])
        return out

    def _cells(self, measures: np.ndarray) -> np.ndarray:
        return self._grid_cells(measures) if self.spec.kind == "grid" else \
            np.asarray(self.result.index_of(measures), dtype=np.int64)

    def _grid_cells(self, measures: np.ndarray) -> np.ndarray:
        if self._grid is None:
            lower, upper = (np.array(b, dtype=np.float64) for b in zip(*_ranges(self.problem)))
            self._grid = (np.array(self.spec.bins, dtype=np.int32), lower, upper - lower)
        return _grid_index(*self._grid, measures)

    def takes(self, trial: Trial) -> bool:
        """Whether ``trial`` goes into this archive: insertable, and at the top fidelity when one is set."""
        if not insertable(trial):
            return False
        return self.spec.fidelity is None or trial.params.get(self.spec.fidelity) == self.spec.fidelity_top

    # objective <-> the maximised number pyribs stores
    def internal_objective(self, trials: Sequence[Trial]) -> np.ndarray:
        """(n,) maximised objective of complete trials (``score_factor * value``)."""
        i = self.spec.objective_index
        return np.array([self.spec.score_factor * t.values[i] for t in trials], dtype=float)

    def add(self, solutions: np.ndarray, trials: Sequence[Trial]) -> dict[str, np.ndarray]:
        """Insert the insertable rows of ``solutions`` (results in ``trials``) as one batch.

        Args:
            solutions: (n, d) encoded solutions, one per trial.
            trials: the n trials they were evaluated in; only those ``takes`` accepts are inserted.

        Returns:
            pyribs' add info for all n rows: ``status`` (n,) (0 not added, 1 improved, 2 new) and
            ``value`` (n,); rows not inserted get status 0 and a value below every other, so an
            emitter ranks them last. Also ``objective`` (n,) and ``measures`` (n, k), finite fillers
            for the rows without results, ready for ``emitter.tell``.
        """
        solutions = np.asarray(solutions, dtype=float).reshape(len(trials), self.space.dim)
        ok = np.array([self.takes(t) for t in trials], dtype=bool)
        n, k = len(trials), len(self.problem.measures)
        status = np.zeros(n, dtype=np.int32)
        value = np.zeros(n, dtype=float)
        objective = np.zeros(n, dtype=float)
        measures = np.tile(np.array([m.low for m in self.problem.measures], dtype=float), (n, 1)).reshape(n, k)
        if ok.any():
            good = [t for t, keep in zip(trials, ok) if keep]
            objective[ok] = self.internal_objective(good)
            measures[ok] = np.array([t.measures for t in good], dtype=float)
            if self.repeats is not None:
                repeated = [self.repeats.add(x, y, m) for x, y, m in zip(solutions[ok], objective[ok], measures[ok])]
                if any(repeated):  # a mean changed: pyribs cannot lower an elite, so re-insert all means
                    self.result.clear()
                    table = self.repeats.table()
                    self.result.add(solution=table["solution"], objective=table["objective"],
                                    measures=table["measures"])
                    self.n_inserted += int(ok.sum())
                    value[~ok] = -1.0
                    return {"status": status, "value": value, "objective": objective, "measures": measures}
            info = self.archive.add(solution=solutions[ok], objective=objective[ok], measures=measures[ok])
            if self.result is not self.archive:
                self.result.add(solution=solutions[ok], objective=objective[ok], measures=measures[ok])
            status[ok], value[ok] = info["status"], info["value"]
            self.n_inserted += int(ok.sum())
        if not ok.all():
            floor = min(value[ok].min(), 0.0) if ok.any() else 0.0
            value[~ok] = floor - 1.0
            objective[~ok] = (objective[ok].min() - 1.0) if ok.any() else 0.0
        return {"status": status, "value": value, "objective": objective, "measures": measures}

    def add_trials(self, trials: Sequence[Trial]) -> None:
        """Insert the insertable trials in order (CMA-MAE's thresholds depend on it: one at a time)."""
        good = [t for t in trials if self.takes(t)]
        if not good:
            return
        X = self.space.encode_many([t.params for t in good])
        if self.spec.learning_rate is None:  # plain elitism: a batch gives the same cells as one by one
            self.add(X, good)
        else:
            for i, t in enumerate(good):
                self.add(X[i:i + 1], [t])

    @property
    def empty(self) -> bool:
        """Whether the result archive holds no elite."""
        return self.result.empty

    @property
    def n_cells(self) -> int:
        """The number of cells of the map."""
        return int(self.result.cells)

    def best_value(self) -> float | None:
        """The best elite's objective in objective units, or None when the archive is empty."""
        best = self.result.stats.obj_max
        return None if best is None else float(self.spec.score_factor * best)

    def metrics(self) -> dict[str, Any]:
        """The result archive's metrics.

        Returns:
            ``coverage``, ``qd_score`` (offset per ``spec``), ``norm_qd_score``, ``num_elites`` and
            ``best`` (``best_value``).
        """
        stats = self.result.stats
        return {"coverage": float(stats.coverage), "qd_score": float(stats.qd_score),
                "norm_qd_score": float(stats.norm_qd_score), "num_elites": int(stats.num_elites),
                "best": self.best_value()}

    def describe(self) -> dict[str, Any]:
        """``spec.describe()`` with the number of cells."""
        return {**self.spec.describe(), "cells": self.n_cells}

    def elites(self) -> dict[str, np.ndarray]:
        """The result archive's elites, e of them.

        Returns:
            ``solution`` (e, d), ``objective`` (e,) in objective units, ``measures`` (e, k) and
            ``index`` (e,); when the spec aggregates repeats, also ``std`` (e,) and ``count`` (e,).
        """
        data = self.result.data()
        out = {"solution": data["solution"], "objective": self.spec.score_factor * data["objective"],
               "measures": data["measures"], "index": data["index"]}
        if self.repeats is not None:  # aggregated: objective and measures are means; add spread and count
            from qd.noise import config_key

            keys = [config_key(x) for x in data["solution"]]
            out["std"] = np.array([self.repeats.std(k) for k in keys])
            out["count"] = np.array([self.repeats.count(k) for k in keys], dtype=int)
        return out


def _elite_rows_taken(spec: EliteSpec | ParetoSpec, space: Any, cols: Columns) -> np.ndarray:
    """(n,) the rows an archive of ``spec`` takes: feasible, finite measures, top fidelity."""
    ok = cols.feasible
    finite = np.isfinite(cols.measures)
    if not finite.all():  # a whole-array check first: a batch's measures are all finite as a rule
        ok &= finite.all(axis=1)
    if spec.fidelity is not None:
        j = space.names.index(spec.fidelity)
        from qd.space import _raw_value

        ok &= cols.raw[:, j] == _raw_value(space.params[j], spec.fidelity_top)
    return ok


def _at_top_fidelity(spec: EliteSpec | ParetoSpec, trial: Trial) -> bool:
    return spec.fidelity is None or trial.params.get(spec.fidelity) == spec.fidelity_top


def best_of_cells(cells: np.ndarray, score: np.ndarray, number: np.ndarray, n_cells: int) -> np.ndarray:
    """(n,) mask of the rows that hold their cell: the best ``score``, the smallest ``number`` of
    equals (pyribs keeps the first of equal elites). Linear: no sort of 10^6 rows."""
    best = np.full(n_cells, -np.inf)
    np.maximum.at(best, cells, score)
    tied = score == best[cells]
    first = np.full(n_cells, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, cells[tied], number[tied])
    return tied & (number == first[cells])


#: pyribs' ``GridArchive`` default ``epsilon`` (added before flooring, against rounding).
GRID_EPSILON = 1e-6


def grid_cells(spec: EliteSpec, problem: Problem, measures: np.ndarray) -> np.ndarray:
    """(n, k) finite measures -> (n,) cells of a grid archive of ``spec``, with pyribs'
    ``GridArchive.index_of`` arithmetic (clipped to the grid), in numpy alone."""
    lower, upper = (np.array(b, dtype=np.float64) for b in zip(*_ranges(problem)))
    return _grid_index(np.array(spec.bins, dtype=np.int32), lower, upper - lower, measures)


def _grid_index(dims: np.ndarray, lower: np.ndarray, interval: np.ndarray, measures: np.ndarray) -> np.ndarray:
    index = ((dims * (np.asarray(measures, dtype=np.float64) - lower) + GRID_EPSILON) / interval).astype(np.int32)
    np.clip(index, 0, dims - 1, out=index)
    return np.ravel_multi_index(index.T, dims).astype(np.int64)


def grid_summary(problem: Problem, spec_json: Mapping[str, Any], cols: Columns) -> dict[str, Any] | None:
    """``metrics()`` and ``describe()`` of the run's result archive, from its columns with numpy
    alone, for a grid elite archive (its result archive keeps the best row of each cell, whatever
    the insertion order; CMA-MAE's thresholds only shape the archive emitters learn from).
    None for other archives (CVT, averaged repeats, Pareto): build them with ``archive_for_run``.
    The figures agree with pyribs' own to rounding (a test rebuilds the archive with pyribs)."""
    spec = spec_from_json(spec_json)
    if not isinstance(spec, EliteSpec) or spec.kind != "grid" or spec.aggregate:
        return None
    ok = _elite_rows_taken(spec, problem.space, cols)
    n_cells = int(np.prod(spec.bins))
    stored = spec.score_factor * cols.values[ok, spec.objective_index]  # what pyribs maximises
    best_of_cell = np.full(n_cells, -np.inf)
    np.maximum.at(best_of_cell, grid_cells(spec, problem, cols.measures[ok]), stored)
    elites = best_of_cell[np.isfinite(best_of_cell)]
    offset = spec.score_factor * spec.qd_score_offset
    qd_score = float(np.sum(elites) - len(elites) * offset)
    metrics = {"coverage": len(elites) / n_cells, "qd_score": qd_score, "norm_qd_score": qd_score / n_cells,
               "num_elites": int(len(elites)), "best": float(spec.score_factor * elites.max()) if len(elites) else None}
    return {**metrics, **spec.describe(), "cells": n_cells}


@dataclass
class _Front:
    """One cell's Pareto front: ``solutions`` (k, d), ``values`` (k, m) in objective units."""

    solutions: np.ndarray
    values: np.ndarray
    numbers: list[int] = field(default_factory=list)
    hypervolume: float = 0.0


class ParetoArchive:
    """MOME's archive: a grid over the measures; each cell keeps a bounded Pareto front.

    Insertion into a cell: the new point joins the cell's front if no member dominates it (or
    equals it), and removes the members it dominates. When the front then exceeds ``front_size``
    the member with the smallest exclusive hypervolume contribution (moocore) leaves, so a full
    cell keeps the subset that covers the most hypervolume; that member may be the new point.

    Args:
        problem: the problem; its measures' ``map_range`` give the bounds.
        spec: the checked options (``pareto_spec``).
    """

    kind: ClassVar[str] = "pareto"

    def __init__(self, problem: Problem, spec: ParetoSpec):
        self.problem, self.spec, self.space = problem, spec, problem.space
        self.signs = np.array([o.sign for o in problem.objectives])  # x sign -> minimised
        self.scaling = spec.scaling  # hypervolumes in these units; dominance is the same in both
        self._ref_min = self._minimised(np.array(spec.reference_point)[None])[0]
        # pyribs' grid does the cell arithmetic (bin edges, clipping, epsilon), and nothing else.
        from ribs.archives import GridArchive

        self.grid = GridArchive(solution_dim=1, dims=spec.bins, ranges=_ranges(problem))
        self.fronts: dict[int, _Front] = {}
        self.n_inserted = 0

    @property
    def n_cells(self) -> int:
        """The number of grid cells (the product of ``spec.bins``)."""
        return int(np.prod(self.spec.bins))

    @property
    def layout(self) -> ArchiveBase:
        """The pyribs ``GridArchive`` that does the cell arithmetic (it holds no solutions)."""
        return self.grid

    @property
    def empty(self) -> bool:
        """Whether no cell holds a front."""
        return not self.fronts

    def cell_of(self, measures: np.ndarray) -> np.ndarray:
        """(n, k) measures -> (n,) integer cell indices (measures outside the bounds go to edge cells)."""
        return self.grid.index_of(np.atleast_2d(np.asarray(measures, dtype=float)))

    def _minimised(self, values: np.ndarray) -> np.ndarray:
        """(n, m) objective values -> (n, m) scaled values to minimise."""
        return self.scaling.apply(values) * self.signs

    def _hypervolume(self, values: np.ndarray) -> float:
        Y = self._minimised(values)
        Y = Y[np.all(Y < self._ref_min, axis=1)]
        return float(moocore.hypervolume(Y, ref=self._ref_min)) if len(Y) else 0.0

    def add(self, solutions: np.ndarray, trials: Sequence[Trial]) -> np.ndarray:
        """Insert solutions one by one.

        Args:
            solutions: (n, d) encoded solutions, one per trial.
            trials: the n trials they were evaluated in; only insertable ones are inserted.

        Returns:
            (n,) int32 status: 0 not added, 1 joined a front, 2 opened a new cell.
        """
        solutions = np.asarray(solutions, dtype=float).reshape(len(trials), self.space.dim)
        status = np.zeros(len(trials), dtype=np.int32)
        for i, t in enumerate(trials):
            if insertable(t) and _at_top_fidelity(self.spec, t):
                status[i] = self._add_one(solutions[i], t)
        return status

    def spec_json(self) -> dict[str, Any]:
        """The spec as the record keeps it (``spec_to_json``)."""
        return spec_to_json(self.spec)

    def add_columns(self, cols: Columns) -> None:
        """Insert the feasible rows of ``cols`` with measures (at the top fidelity), in order."""
        ok = _elite_rows_taken(self.spec, self.space, cols)
        if not ok.any():
            return
        X = self.space.encode_raw(cols.raw[ok])
        for x, v, mm, number in zip(X, cols.values[ok], cols.measures[ok], cols.number[ok].tolist()):
            self._add_one(x, _Row(number, v, mm))

    def cells_of(self, cols: Columns) -> np.ndarray:
        """(n,) the cell of each row of ``cols`` this archive takes, else -1."""
        out = np.full(len(cols), -1, dtype=np.int64)
        ok = _elite_rows_taken(self.spec, self.space, cols)
        if ok.any():
            out[ok] = self.cell_of(cols.measures[ok])
        return out

    def _add_one(self, solution: np.ndarray, trial: Any) -> int:
        self.n_inserted += 1
        cell = int(self.cell_of(np.array(trial.measures))[0])
        value = np.asarray(trial.values, dtype=float)
        front = self.fronts.get(cell)
        if front is None:
            self.fronts[cell] = _Front(solution[None].copy(), value[None].copy(), [trial.number],
                                       self._hypervolume(value[None]))
            return 2
        values = np.vstack([front.values, value])
        keep = moocore.is_nondominated(values * self.signs)  # duplicates: the older copy stays
        if not keep[-1]:
            return 0
        if keep.sum() > self.spec.front_size:
            contributions = moocore.hv_contributions(self._minimised(values[keep]), ref=self._ref_min)
            # Smallest contribution leaves; among equals (e.g. beyond the reference), the oldest.
            drop = np.flatnonzero(keep)[int(np.argmin(contributions))]
            keep[drop] = False
            if drop == len(values) - 1:
                return 0
        solutions = np.vstack([front.solutions, solution])
        numbers = front.numbers + [trial.number]
        idx = np.flatnonzero(keep)
        self.fronts[cell] = _Front(solutions[idx], values[idx], [numbers[j] for j in idx],
                                   self._hypervolume(values[idx]))
        return 1

    def add_trials(self, trials: Sequence[Trial]) -> None:
        """Insert the insertable ``trials`` in order."""
        good = [t for t in trials if insertable(t) and _at_top_fidelity(self.spec, t)]
        if good:
            self.add(self.space.encode_many([t.params for t in good]), good)

    def members(self) -> tuple[np.ndarray, np.ndarray]:
        """All front members, e of them.

        Returns:
            ``(solutions, values)``: (e, d) encoded solutions and (e, m) objective values.
        """
        if not self.fronts:
            return np.empty((0, self.space.dim)), np.empty((0, len(self.signs)))
        return (np.vstack([f.solutions for f in self.fronts.values()]),
                np.vstack([f.values for f in self.fronts.values()]))

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Draw solutions uniformly, with replacement, from all front members.

        Args:
            n: how many.
            rng: the generator to draw from.

        Returns:
            (n, d) encoded solutions.
        """
        solutions, _ = self.members()
        return solutions[rng.integers(len(solutions), size=n)]

    def cell_hypervolumes(self) -> dict[int, float]:
        """Occupied cell -> the hypervolume of its front (in ``spec.scaling``'s units)."""
        return {c: f.hypervolume for c, f in self.fronts.items()}

    def metrics(self) -> dict[str, Any]:
        """The archive's metrics.

        Returns:
            ``coverage``, ``qd_score`` and ``moqd_score`` (the sum of per-cell hypervolumes),
            ``norm_qd_score``, ``global_hypervolume`` (of all members together), ``num_elites`` (front
            members) and ``best`` (the best value per objective, or None when empty).
        """
        _, values = self.members()
        moqd = float(sum(f.hypervolume for f in self.fronts.values()))
        best = None
        if len(values):
            best = [float(v) for v in np.where(self.signs > 0, values.min(axis=0), values.max(axis=0))]
        return {"coverage": len(self.fronts) / self.n_cells, "qd_score": moqd, "norm_qd_score": moqd / self.n_cells,
                "num_elites": int(len(values)), "best": best, "moqd_score": moqd,
                "global_hypervolume": self._hypervolume(values) if len(values) else 0.0}

    def describe(self) -> dict[str, Any]:
        """``spec.describe()`` with the number of cells."""
        return {**self.spec.describe(), "cells": self.n_cells}


@dataclass
class _Row:
    """The fields of a trial ``ParetoArchive`` reads, for rows that come as columns."""

    number: int
    values: np.ndarray
    measures: np.ndarray




# --- archive specs as recorded with a run -------------------------------------------------------
def spec_to_json(spec: EliteSpec | ParetoSpec) -> dict[str, Any]:
    """A spec as plain JSON (what the record keeps; equal specs give equal JSON)."""
    kind = "pareto" if isinstance(spec, ParetoSpec) else "elite"
    return json.loads(json.dumps({"type": kind, **dataclasses.asdict(spec)}))


def spec_from_json(data: Mapping[str, Any]) -> EliteSpec | ParetoSpec:
    """A spec from its recorded JSON (``spec_to_json``'s inverse).

    Args:
        data: the recorded dict, with ``type`` ``"elite"`` or ``"pareto"``.

    Returns:
        The ``EliteSpec`` or ``ParetoSpec``.
    """
    data = dict(data)
    kind = data.pop("type")
    if kind == "pareto":
        return ParetoSpec(bins=tuple(data["bins"]), front_size=int(data["front_size"]),
                          reference_point=tuple(data["reference_point"]), reference_source=data["reference_source"],
                          scales=tuple(data.get("scales", ())),
                          bounds=tuple(tuple(b) if b is not None else None for b in data.get("bounds", ())),
                          fidelity=data.get("fidelity"), fidelity_top=data.get("fidelity_top"))
    if data.get("bins") is not None:
        data["bins"] = tuple(data["bins"])
    return EliteSpec(**data)


def archive_from_spec_json(problem: Problem, data: Mapping[str, Any]) -> RunArchive:
    """An empty archive of the spec a run recorded.

    Args:
        problem: the run's problem.
        data: the recorded spec (``spec_to_json``).

    Returns:
        An empty ``EliteArchive`` or ``ParetoArchive``.
    """
    return build_archive(problem, spec_from_json(data))


# --- a run's archive ----------------------------------------------------------------------------
def spec_for_run(problem: Problem, strategy: str, options: Mapping[str, Any], seed: int) -> EliteSpec | ParetoSpec:
    """The archive of a run: the strategy's own when it has one (``archive_spec``), else a default.

    The default, for runs of other strategies on problems with measures, inserts them into the map
    a QD strategy would use: a Pareto grid for multi-objective problems with a reference point,
    otherwise a grid on the first objective.

    Args:
        problem: the run's problem (with measures).
        strategy: the registered strategy name.
        options: the strategy's options.
        seed: the run's seed.

    Returns:
        The spec.

    Raises:
        ArchiveOptionError: an archive option of the strategy is not allowed.
    """
    from qd.strategies import strategy_class

    try:
        cls = strategy_class(strategy)
    except ValueError:
        cls = None
    spec = cls.archive_spec(problem, seed, dict(options)) if cls is not None else None
    if spec is None:
        spec = pareto_spec(problem) if len(problem.objectives) > 1 and problem.reference_point is not None \
            else elite_spec(problem, seed=seed)
    if options.get("fidelity") == "asha" and problem.fidelity and spec.fidelity is None:
        # ASHA's lower rungs are cheap estimates: the run's map holds full-fidelity results only.
        spec = dataclasses.replace(spec, fidelity=problem.fidelity,
                                   fidelity_top=top_value(problem.space[problem.fidelity]))
    return spec


def build_archive(problem: Problem, spec: EliteSpec | ParetoSpec) -> RunArchive:
    """An empty archive for ``spec``: a ``ParetoArchive`` for a ``ParetoSpec``, else an ``EliteArchive``."""
    return ParetoArchive(problem, spec) if isinstance(spec, ParetoSpec) else EliteArchive(problem, spec)


def archive_for_run(store: Store, problem: Problem, cols: Columns | None = None) -> RunArchive:
    """The run's archive (the spec it recorded), rebuilt by inserting its trials in number order.

    Args:
        store: the run's store.
        problem: the run's problem.
        cols: the run's columns when already read (default: ``store.columns()``).

    Returns:
        The filled ``EliteArchive`` or ``ParetoArchive``.

    Raises:
        ValueError: the run records no archive (its problem has no measures).
    """
    spec = store.archive_spec_json
    if spec is None:
        raise ValueError(f"run {store.info.name!r} has no archive: its problem declares no measures")
    archive = archive_from_spec_json(problem, spec)
    archive.add_columns(store.columns() if cols is None else cols)
    return archive
