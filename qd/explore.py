"""Exploring a finished (or running) run from a notebook.

```python
from qd.explore import load_run

run = load_run("sqlite:///runs.db", "sphere-map-elites")
run             # a short summary of the run
run.trials      # one row per trial (params.*, values.*, measures.*, cell, ...)
run.query("score > 90 and x0 < 0")   # rows by short column names, no backticks
run.elites      # the archive's elites (one per cell; Pareto-archive runs: every cell's front)
run.pareto      # the non-dominated complete, feasible trials
run.heatmap()   # the archive as a heatmap (matplotlib)
run.front()     # the objectives with the Pareto set
picked = run.select(5, among="elites")              # a small, spread-out subset
table = run.reevaluate(int(picked.number.iloc[0]), seeds=5, problem_options={"noise": 0.0})
```

Everything is read from the store, the run's single record; the archive is rebuilt from it with
``qd.archive.archive_for_run``, exactly as ``qd show`` and resumed strategies do.

Post-hoc selection (``select``) picks ``k`` rows that cover the set rather than cluster in its
best corner:

- ``maxmin``: greedy max-min distance (farthest-point traversal) in a normalised space
  (measures scaled by their declared bounds for elites, objectives by the set's range for
  Pareto members), starting from the best row. Every pick is the row farthest from all picks
  so far, so the subset's smallest pairwise distance is at least half the optimum's.
- ``hypervolume``: greedy hypervolume subset selection for fronts: every pick adds the most
  hypervolume to the picks so far (a (1 - 1/e)-approximation of the best k-subset, since
  hypervolume is monotone submodular).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from qd.checks import check_int, is_int
from qd.problem import Problem, signs_of
from qd.columns import Columns
from qd.results import Reference, hypervolume, pareto_front_mask, pareto_trials, reference_point, reference_point_of_values
from qd.space import Config
from qd.store import Store, Trial

if TYPE_CHECKING:
    import matplotlib.pyplot as plt

    from qd.archive import RunArchive

Among = Literal["elites", "pareto", "trials"]
Method = Literal["maxmin", "hypervolume"]
SELECT_AMONG: tuple[str, ...] = ("elites", "pareto", "trials")
SELECT_METHODS: tuple[str, ...] = ("maxmin", "hypervolume")


# --- archive cells and elites ------------------------------------------------------------------
def run_archive(store: Store, problem: Problem | None, cols: Columns | None = None) -> RunArchive | None:
    """The run's archive (its recorded spec) rebuilt from the record.

    Args:
        store: the run's store.
        problem: the run's problem, or None when it cannot be built.
        cols: the run's columns when already read.

    Returns:
        An ``EliteArchive`` or ``ParetoArchive``, or None without a problem or without measures.
    """
    if problem is None or store.archive_spec_json is None:
        return None
    from qd.archive import archive_for_run

    return archive_for_run(store, problem, cols)


def elite_rows(cols: Columns, archive: RunArchive) -> np.ndarray:
    """Row indices of ``cols`` holding the archive's elites, one per occupied cell (cell order).

    A Pareto archive knows its members' trial numbers. An elite archive keeps encoded solutions,
    so each cell's elite is the best trial inserted there (the earliest of equal values, as pyribs
    keeps the first).

    Args:
        cols: the run's n rows.
        archive: the run's archive, built from ``cols``.

    Returns:
        (e,) int row indices into ``cols``.
    """
    if archive.kind == "pareto":
        wanted = {n for f in archive.fronts.values() for n in f.numbers}
        return np.flatnonzero(np.isin(cols.number, list(wanted)))
    cells = archive.cells_of(cols)
    rows = np.flatnonzero(cells >= 0)
    if not len(rows):
        return rows
    score = archive.spec.score_factor * cols.values[rows, archive.spec.objective_index]
    order = np.lexsort((cols.number[rows], -score, cells[rows]))
    ordered = cells[rows][order]
    first = np.r_[True, ordered[1:] != ordered[:-1]]
    return rows[order][first]


def cells_of(archive: RunArchive, measures: np.ndarray) -> np.ndarray:
    """(n, k) measures -> (n,) integer archive cells (outside the bounds: the edge cells)."""
    measures = np.atleast_2d(np.asarray(measures, dtype=float))
    if len(measures) == 0:
        return np.empty(0, dtype=int)
    return np.asarray(archive.cell_of(measures), dtype=int)


def grid_index(archive: RunArchive, cells: np.ndarray) -> np.ndarray | None:
    """(n,) cells -> (n, k) per-measure bin indices for grid archives (None for a CVT archive)."""
    from ribs.archives import GridArchive

    grid = archive.layout
    if not isinstance(grid, GridArchive):
        return None
    cells = np.asarray(cells, dtype=int)
    if len(cells) == 0:
        return np.empty((0, len(grid.dims)), dtype=int)
    return np.asarray(grid.int_to_grid_index(cells), dtype=int)


def elite_numbers(archive: RunArchive, trials: Sequence[Trial]) -> dict[int, list[int]]:
    """Trial numbers of the archive's elites, by cell.

    An elite archive stores encoded solutions, not trial numbers: each elite is matched to the
    earliest trial in its cell with its objective value (pyribs keeps the first of equal values).
    A Pareto archive records the numbers of its front members itself.

    Args:
        archive: the run's archive.
        trials: the trials it was built from.

    Returns:
        Cell -> trial numbers (one for an elite archive, the front's for a Pareto archive).
    """
    if archive.kind == "pareto":
        return {int(c): list(f.numbers) for c, f in archive.fronts.items()}
    from qd.archive import insertable

    elites = archive.elites()
    if len(elites["index"]) == 0:
        return {}
    good = [t for t in trials if insertable(t)]
    i = archive.spec.objective_index
    by_cell: dict[int, list[Trial]] = {}
    for t, c in zip(good, cells_of(archive, np.array([t.measures for t in good]))):
        by_cell.setdefault(int(c), []).append(t)
    out: dict[int, list[int]] = {}
    for cell, value in zip(elites["index"], elites["objective"]):
        match = next((t.number for t in by_cell.get(int(cell), []) if np.isclose(t.values[i], value)), None)
        if match is not None:
            out[int(cell)] = [match]
    return out


# --- selection --------------------------------------------------------------------------------
def maxmin_subset(points: np.ndarray, k: int, start: int = 0,
                  bounds: tuple[np.ndarray, np.ndarray] | None = None) -> list[int]:
    """Indices of ``k`` rows of ``points`` chosen by greedy max-min distance.

    Columns are scaled to [0, 1] by ``bounds`` or else by the points' own range, so no column
    dominates by its units. The first pick is ``start``; ties go to the lower index.

    Args:
        points: (n, m) points.
        k: how many to pick (>= 1).
        start: the first pick's row.
        bounds: ``(low, high)``, two (m,) arrays, or None.

    Returns:
        At most ``k`` row indices in pick order; fewer when only duplicates of picks are left.

    Raises:
        ValueError: ``k < 1`` or ``start`` outside ``[0, n)``.
    """
    points = np.asarray(points, dtype=float)
    n = len(points)
    if k < 1:
        raise ValueError(f"k={k}: must be >= 1")
    if n == 0:
        return []
    if not 0 <= start < n:
        raise ValueError(f"start={start} is not allowed; allowed: 0 <= start < {n}")
    low, high = (points.min(axis=0), points.max(axis=0)) if bounds is None else map(np.asarray, bounds)
    scale = np.where(high > low, high - low, 1.0)
    X = (points - low) / scale
    picked = [start]
    dist = np.linalg.norm(X - X[start], axis=1)
    while len(picked) < min(k, n):
        nxt = int(np.argmax(dist))
        if dist[nxt] <= 0:  # only duplicates of picked points are left
            break
        picked.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(X - X[nxt], axis=1))
    return picked


def hypervolume_subset(values: np.ndarray, directions: Sequence[str], reference: Sequence[float], k: int) -> list[int]:
    """Indices of ``k`` rows of objective ``values`` chosen greedily by hypervolume gain.

    Rows that add nothing (dominated by the picks, or beyond the reference point) are never picked,
    so fewer than ``k`` indices come back when fewer rows add hypervolume.

    Args:
        values: (n, m) objective values.
        directions: m directions.
        reference: the reference point (or a ``Reference``), as for ``qd.results.hypervolume``.
        k: how many to pick (>= 1).

    Returns:
        At most ``k`` row indices in pick order.

    Raises:
        ValueError: ``k < 1``.
    """
    values = np.asarray(values, dtype=float)
    if k < 1:
        raise ValueError(f"k={k}: must be >= 1")
    picked: list[int] = []
    current = 0.0
    while len(picked) < min(k, len(values)):
        best, best_gain = None, 0.0
        for i in range(len(values)):
            if i in picked:
                continue
            gain = hypervolume(values[picked + [i]], directions, reference) - current
            if gain > best_gain + 1e-15:
                best, best_gain = i, gain
        if best is None:
            break
        picked.append(best)
        current += best_gain
    return picked


# --- the run ---------------------------------------------------------------------------------
@dataclass
class Run:
    """A run opened for exploration (``load_run``): its store, problem, archive and three DataFrames.

    Attributes:
        trials: one row per trial (``Store.dataframe``: ``number``, ``state``, ``params.*``,
            ``values.*``, ``measures.*``, ...; plus ``cell`` where the run has an archive).
        elites: the archive's members, the rows of ``trials`` with their ``cell`` (empty without
            measures).
        pareto: the non-dominated complete, feasible trials.
        archive: the rebuilt ``EliteArchive`` or ``ParetoArchive``, or None.
        problem: the run's problem, or None when it cannot be built here.
        reference: the hypervolume ``Reference``, or None without feasible trials.
    """

    store: Store
    problem: Problem | None
    archive: RunArchive | None
    trials: pd.DataFrame
    elites: pd.DataFrame
    pareto: pd.DataFrame
    reference: Reference | None
    #: The run's trials as columns (``qd.columns``), as read when the run was loaded.
    columns: Columns | None = None
    #: The run loop's report when the run was made by ``qd.optimize`` in this process.
    report: Any = None

    def __repr__(self) -> str:  # a short summary; the DataFrames are one attribute away
        info = self.store.info
        objectives = ", ".join(f"{n} ({d[:3]})" for n, d in zip(self.objectives, self.directions))
        parts = [f"Run({self.name!r}: {info.problem} / {info.strategy}, seed {info.seed}",
                 f"  {len(self.trials)} trials, objectives {objectives}"]
        if len(self.objectives) > 1:
            parts.append(f"  Pareto set: {len(self.pareto)} trials")
        elif len(self.pareto):
            best = self.pareto.iloc[0]
            parts.append(f"  best {self.objectives[0]}: {best[f'values.{self.objectives[0]}']:.4g} "
                         f"(trial #{int(best['number'])})")
        if self.archive is not None:
            m = self.archive.metrics()
            parts.append(f"  archive over {', '.join(self.measures)}: {len(self.elites)} elites, "
                         f"coverage {m['coverage']:.1%}")
        parts.append("  .trials .elites .pareto (DataFrames), .query(...), .heatmap(), .front(), .select(k))")
        return "\n".join(parts)

    def query(self, expr: str, among: Among = "trials") -> pd.DataFrame:
        """Rows of ``trials``, ``elites`` or ``pareto`` matching a pandas expression that names columns
        without their prefix and without backticks: ``run.query("accuracy > 0.8 and depth <= 2")``.

        Short names are the objectives, measures and parameters (``values.``, ``measures.``,
        ``params.`` dropped; where two share a name, the objective wins, then the measure); full
        names work in backticks as in ``DataFrame.query``.

        Args:
            expr: the expression, as for ``DataFrame.eval``.
            among: ``"trials"``, ``"elites"`` or ``"pareto"``.

        Returns:
            The matching rows.

        Raises:
            ValueError: ``among`` is not allowed. Errors of ``expr`` come from pandas.
        """
        if among not in SELECT_AMONG:
            raise ValueError(f"query: among={among!r} is not allowed; allowed: {list(SELECT_AMONG)}")
        frame = {"trials": self.trials, "elites": self.elites, "pareto": self.pareto}[among]
        short: dict[str, str] = {}
        for prefix in ("params.", "measures.", "values."):  # later prefixes win
            for col in frame.columns:
                if col.startswith(prefix):
                    short[col[len(prefix):]] = col
        resolvers = {k: frame[v] for k, v in short.items() if k.isidentifier()}
        return frame[frame.eval(expr, resolvers=(resolvers,))]

    @property
    def name(self) -> str:
        """The run's name."""
        return self.store.info.name

    @property
    def objectives(self) -> list[str]:
        """The objectives' names, as the run recorded them."""
        return list(self.store.objective_names)

    @property
    def directions(self) -> list[str]:
        """Each objective's "minimize" or "maximize", as the run recorded them."""
        return list(self.store.directions)

    @property
    def measures(self) -> list[str]:
        """The measures' names, as the run recorded them."""
        return list(self.store.measure_names)

    def config(self, number: int) -> Config:
        """The configuration trial ``number`` evaluated.

        Raises:
            KeyError: no trial ``number`` in the run.
        """
        cols = self.store.columns() if self.columns is None else self.columns
        rows = np.flatnonzero(cols.number == number)
        if not len(rows):
            raise KeyError(f"trial number={number!r} is not in run {self.name!r}; allowed: 0..{len(cols) - 1}")
        return self.store.to_trials(cols.select(rows[:1]))[0].params

    def summary(self) -> dict[str, Any]:
        """``qd show --json``'s summary, plus the archive's metrics when there is one."""
        from qd.results import summary

        out = summary(self.store, self.problem)
        if self.archive is not None:
            out["archive"] = {**self.archive.describe(), **self.archive.metrics()}
        return out

    # --- figures ------------------------------------------------------------------------------
    def heatmap(self) -> plt.Figure:
        """The archive heatmap of ``qd.plots_archive`` (the map ``qd plot`` and ``qd report`` draw):
        the objective per cell, or the hypervolume of each cell's front for a Pareto archive.

        Returns:
            The matplotlib figure.

        Raises:
            ValueError: the run has no archive (its problem declares no measures).
        """
        if self.archive is None:
            raise ValueError(f"run {self.name!r} has no archive: problem {self.store.info.problem!r} declares no "
                             f"measures, so there is no map to draw; allowed: runs of problems with measures")
        from qd.plots_archive import elite_heatmap_figure, moqd_heatmap_figure

        draw = moqd_heatmap_figure if self.archive.kind == "pareto" else elite_heatmap_figure
        return draw(self.archive, self.problem, f"{self.name}: {self.store.info.problem} / {self.store.info.strategy}")

    def metrics(self) -> pd.DataFrame:
        """Archive metrics against finished evaluations (``qd.metrics.history``).

        Returns:
            One row per recorded point (coverage, QD score, ...); empty without an archive.
        """
        if self.archive is None:
            return pd.DataFrame()
        from qd.metrics import history

        return pd.DataFrame(history(self.store, self.problem))

    def front(self, highlight: pd.DataFrame | None = None) -> plt.Figure:
        """All complete trials and the Pareto set.

        Args:
            highlight: rows to circle and label (e.g. ``select``'s), drawn with two objectives.

        Returns:
            The matplotlib figure.
        """
        from qd.plots import pareto_figure

        fig = pareto_figure(self.store.trials(), self.objectives, self.directions,
                            f"{self.name}: {self.store.info.problem} / {self.store.info.strategy}")
        if highlight is not None and len(highlight) and len(self.objectives) == 2:
            ax = fig.axes[0]
            cols = [f"values.{n}" for n in self.objectives]
            ax.scatter(highlight[cols[0]], highlight[cols[1]], s=140, facecolors="none", edgecolors="C3", lw=1.5,
                       label=f"selected ({len(highlight)})", zorder=5)
            for _, row in highlight.iterrows():
                ax.annotate(f"#{int(row['number'])}", (row[cols[0]], row[cols[1]]), textcoords="offset points",
                            xytext=(6, 6), fontsize=8, color="C3")
            ax.legend()
        return fig

    # --- selection ----------------------------------------------------------------------------
    def select(self, k: int, among: Among = "pareto", method: Method | None = None) -> pd.DataFrame:
        """``k`` spread-out rows of ``elites``, ``pareto`` or complete ``trials`` (see the module doc).

        Args:
            k: how many (>= 1); fewer come back when the set is smaller or has duplicates.
            among: ``"elites"``, ``"pareto"`` or ``"trials"``.
            method: ``"maxmin"`` (default for elites and trials: in measure space, scaled by the
                measures' bounds) or ``"hypervolume"`` (default for a multi-objective Pareto set: greedy
                hypervolume contributions against the run's reference point). For the Pareto set,
                ``maxmin`` works in objective space scaled by the set's range.

        Returns:
            The picked rows in pick order, with a ``pick`` column (1, 2, ...) first.

        Raises:
            ValueError: ``k``, ``among`` or ``method`` not allowed, ``"elites"`` for a run without an
                archive, or ``"hypervolume"`` with one objective or no feasible trial.
        """
        if among not in SELECT_AMONG:
            raise ValueError(f"select: among={among!r} is not allowed; allowed: {list(SELECT_AMONG)}")
        if method is None:
            method = "hypervolume" if among == "pareto" and len(self.objectives) > 1 else "maxmin"
        if method not in SELECT_METHODS:
            raise ValueError(f"select: method={method!r} is not allowed; allowed: {list(SELECT_METHODS)}")
        check_int(k, "k", "select", low=1)
        rows = {"elites": self.elites, "pareto": self.pareto,
                "trials": self.trials[self.trials["state"] == "complete"] if len(self.trials) else self.trials}[among]
        if among == "elites" and self.archive is None:
            raise ValueError(f"select: among='elites' is not allowed for run {self.name!r}, which has no archive "
                             f"(its problem declares no measures); allowed: 'pareto' or 'trials'")
        if rows.empty:
            return rows.copy()
        rows = rows.reset_index(drop=True)
        value_cols = [f"values.{n}" for n in self.objectives]
        Y = rows[value_cols].to_numpy(dtype=float)
        signs = signs_of(self.directions)
        if method == "hypervolume":
            if len(self.objectives) < 2:
                raise ValueError(f"select: method='hypervolume' is not allowed for run {self.name!r} with one "
                                 f"objective; allowed: 'maxmin'")
            if self.reference is None:
                raise ValueError(f"select: run {self.name!r} has no feasible trials, so no hypervolume reference")
            picked = hypervolume_subset(Y, self.directions, self.reference, int(k))
        else:
            use_measures = among != "pareto" and self.measures and self.problem is not None
            if use_measures:
                points = rows[[f"measures.{m}" for m in self.measures]].to_numpy(dtype=float)
                bounds = (np.array([m.low for m in self.problem.measures]),
                          np.array([m.high for m in self.problem.measures]))
            else:
                points, bounds = Y, None
            # Start from the best row: on the first objective for elites/trials, the ideal-nearest for fronts.
            if use_measures or len(self.objectives) == 1:
                i = getattr(getattr(self.archive, "spec", None), "objective_index", 0)
                start = int(np.argmin(Y[:, i] * signs[i]))
            else:
                Z = Y * signs
                span = np.where(Z.max(0) > Z.min(0), Z.max(0) - Z.min(0), 1.0)
                start = int(np.argmin(np.linalg.norm((Z - Z.min(0)) / span, axis=1)))
            picked = maxmin_subset(points, int(k), start=start, bounds=bounds)
        out = rows.iloc[picked].copy()
        out.insert(0, "pick", range(1, len(out) + 1))
        return out.reset_index(drop=True)

    # --- re-evaluation ------------------------------------------------------------------------
    def reevaluate(self, what: int | Mapping[str, Any], seeds: int | Sequence[int] = 5, *,
                   problem_options: Mapping[str, Any] | None = None, evaluator: str = "inprocess",
                   evaluator_options: Mapping[str, Any] | None = None, workers: int = 1,
                   timeout_s: float | None = None) -> pd.DataFrame:
        """Evaluate one configuration again, under several seeds.

        Args:
            what: a trial number of the run, or a configuration dict.
            seeds: how many (seeds 0..n-1) or which (distinct).
            problem_options: override the run's problem options (e.g. a test split, no noise).
            evaluator: where it runs: ``"inprocess"``, ``"process"`` or ``"ray"``.
            evaluator_options: the evaluator's options.
            workers: evaluations at once.
            timeout_s: a bound on one evaluation (None: none).

        Returns:
            One row per seed (the index: the seed) with ``ok``, ``error``, ``wall_time_s``,
            ``values.*`` and ``measures.*``, then rows ``mean`` and ``std`` (sample standard
            deviation, ddof=1) over the seeds that succeeded.

        Raises:
            ValueError: bad ``seeds``, ``what`` or ``problem_options``, or a configuration not valid
                for the problem. A failing evaluation is a row with ``ok`` False, not an error.
        """
        return reevaluate(self.store, what, seeds, problem_options=problem_options, evaluator=evaluator,
                          evaluator_options=evaluator_options, workers=workers, timeout_s=timeout_s)


def load_run(storage: str, name: str) -> Run:
    """Open a run with its trials, elites and Pareto set.

    A problem that cannot be rebuilt here (a plug-in not installed) only warns: the record is still
    read, without an archive, with a reference point from the data.

    Args:
        storage: an Optuna storage URL (``sqlite:///PATH``, ``postgresql://...``,
            ``journal:///PATH``).
        name: the run's name.

    Returns:
        The ``Run``.

    Raises:
        StorageError: ``storage`` is not allowed or (SQLite) does not exist.
        RunNotFound: no run ``name`` there (the message lists the runs).
    """
    from qd.session import problem_of

    store = Store.open(storage, name)
    try:
        problem: Problem | None = problem_of(store)
    except Exception as e:  # e.g. a plug-in not installed here: the record can still be read
        import warnings

        warnings.warn(f"run {name!r}: problem {store.info.problem!r} cannot be rebuilt ({e}); "
                      f"no archive, and the hypervolume reference comes from the data", stacklevel=2)
        problem = None
    return build_run(store, problem)


def build_run(store: Store, problem: Problem | None) -> Run:
    """A ``Run`` from an open store (and its problem, when it can be built): one read of the
    record's columns, every table derived from them.

    Args:
        store: the run's store.
        problem: the run's problem, or None.

    Returns:
        The ``Run``.
    """
    cols = store.columns()
    frame = store.dataframe(cols)
    if frame.empty:
        frame = pd.DataFrame(columns=["number", "state"])
    directions = list(store.directions)
    archive = run_archive(store, problem, cols)
    if archive is not None:
        cells = archive.cells_of(cols)
        frame["cell"] = pd.array(np.where(cells >= 0, cells, 0), dtype="Int64")
        frame.loc[cells < 0, "cell"] = pd.NA
        rows = elite_rows(cols, archive)
        elites = frame.iloc[rows].copy()
    else:
        elites = frame.iloc[0:0].copy()
    ok = np.flatnonzero(cols.feasible)
    front = ok[pareto_front_mask(cols.values[ok], directions)] if len(ok) else ok
    pareto = frame.iloc[front].copy()
    ref = reference_point_of_values(problem, cols.values[ok], directions)
    return Run(store=store, problem=problem, archive=archive, trials=frame.reset_index(drop=True),
               elites=elites.reset_index(drop=True), pareto=pareto.reset_index(drop=True), reference=ref,
               columns=cols)


def reevaluate(store: Store, what: int | Mapping[str, Any], seeds: int | Sequence[int] = 5, *,
               problem_options: Mapping[str, Any] | None = None, evaluator: str = "inprocess",
               evaluator_options: Mapping[str, Any] | None = None, workers: int = 1,
               timeout_s: float | None = None) -> pd.DataFrame:
    """``Run.reevaluate`` for the run of ``store`` (see it for arguments, result and errors)."""
    from evaluators import Job, make_evaluator
    from qd.registry import get_problem

    if isinstance(seeds, (bool, np.bool_)) or (is_int(seeds) and seeds < 1):
        raise ValueError(f"reevaluate: seeds={seeds!r} is not allowed; allowed: an integer >= 1 or a list of seeds")
    seed_list = list(range(int(seeds))) if is_int(seeds) else [int(s) for s in seeds]
    if not seed_list or len(set(seed_list)) != len(seed_list):
        raise ValueError(f"reevaluate: seeds={seeds!r} is not allowed; allowed: a non-empty list of distinct seeds")
    options = {**store.info.problem_options, **dict(problem_options or {})}
    try:
        problem = get_problem(store.info.problem, **options)
    except (TypeError, ValueError) as e:
        raise ValueError(f"reevaluate: problem_options={dict(problem_options or {})!r}: {e}") from None
    if is_int(what):
        by_number = {t.number: t for t in store.trials()}
        if int(what) not in by_number:
            raise ValueError(f"reevaluate: trial number {what!r} is not in run {store.info.name!r}; "
                             f"allowed: 0..{len(by_number) - 1}")
        config = dict(by_number[int(what)].params)
    elif isinstance(what, Mapping):
        config = dict(what)
    else:
        raise ValueError(f"reevaluate: what={what!r} is not allowed; allowed: a trial number or a configuration dict")
    try:
        config = problem.space.validate(config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"reevaluate: configuration {config!r} is not valid for {store.info.problem!r}: {e}") from None

    engine = make_evaluator(evaluator, **dict(evaluator_options or {}))
    engine.start(problem, max(1, min(workers, len(seed_list))), timeout_s)
    outcomes = {}
    try:
        for i, seed in enumerate(seed_list):
            engine.submit(Job(i, config, seed))
        while len(outcomes) < len(seed_list):
            got = engine.wait()
            if not got:
                raise RuntimeError(f"evaluator {evaluator!r} returned no results for {len(seed_list) - len(outcomes)} "
                                   f"pending evaluations")
            outcomes.update({o.key: o for o in got})
    finally:
        engine.close()

    rows = []
    for i, seed in enumerate(seed_list):
        o = outcomes[i]
        row: dict[str, Any] = {"seed": seed, "ok": o.ok, "error": None, "wall_time_s": o.metadata.get("wall_time_s")}
        values: list[float] = [np.nan] * len(problem.objectives)
        measures: list[float] = [np.nan] * len(problem.measures)
        if o.ok:
            try:
                values, measures, _ = problem.normalise(o.evaluation)
            except ValueError as e:
                row.update(ok=False, error=f"invalid result: {e}")
        else:
            row["error"] = f"{o.kind}: {(o.error or '').splitlines()[0]}"
        row.update({f"values.{n}": v for n, v in zip(problem.objective_names, values)})
        row.update({f"measures.{n}": v for n, v in zip(problem.measure_names, measures)})
        rows.append(row)
    table = pd.DataFrame(rows).set_index("seed")
    numeric = [c for c in table.columns if c.startswith(("values.", "measures.")) or c == "wall_time_s"]
    good = table[table["ok"]][numeric].astype(float)
    stats = pd.DataFrame([good.mean(), good.std(ddof=1)], index=["mean", "std"])
    table.index = table.index.astype(object)
    return pd.concat([table, stats])
