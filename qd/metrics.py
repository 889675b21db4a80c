"""QD metrics over time, stored with the run so they survive resume and reach ``qd show``/``qd plot``.

The run loop keeps one archive per run (``qd.run.RunState``: the strategy's own when it has the
run's recorded spec, else one of its own) and appends a row every ``rows_every(budget)`` finished
evaluations and at the end, written to the record (attribute ``qd_metrics``) at most every few
seconds and at the end; a crash loses at most the last few seconds of rows, and ``replay``
recomputes them from the trials.

A row: ``evaluations`` (finished so far), ``coverage``, ``qd_score``, ``norm_qd_score``,
``num_elites``, ``best`` (elite archives: the best value; Pareto archives: the best value per
objective) and, for Pareto archives, ``moqd_score`` and ``global_hypervolume``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from qd.archive import RunArchive, archive_from_spec_json
from qd.columns import Columns
from qd.problem import Problem
from qd.store import Store, Trial

METRICS_KEY = "qd_metrics"
DEFAULT_EVERY = 10
#: Rows a run's history holds at most (about): longer runs record a row every budget/MAX_ROWS.
MAX_ROWS = 1000


def rows_every(budget: int) -> int:
    """Finished evaluations between two metric rows for a run of ``budget`` evaluations."""
    return max(DEFAULT_EVERY, -(-int(budget) // MAX_ROWS))


def _row(evaluations: int, archive: RunArchive) -> dict[str, Any]:
    return {"evaluations": evaluations, **archive.metrics()}


def replay(problem: Problem, trials: Sequence[Trial], make_archive: Callable[[], RunArchive],
           every: int = DEFAULT_EVERY) -> list[dict[str, Any]]:
    """Metric rows computed by inserting ``trials`` (creation order) into ``make_archive()``: a
    row every ``every`` finished evaluations and one at the end. For runs without a recorded
    history, and for inserting one strategy's trials into another's archive (benchmarks)."""
    archive = make_archive()
    rows: list[dict[str, Any]] = []
    finished = 0
    for t in trials:
        if not t.finished:
            continue
        finished += 1
        if t.state == "complete":
            archive.add_trials([t])
        if finished % every == 0:
            rows.append(_row(finished, archive))
    if finished and (not rows or rows[-1]["evaluations"] != finished):
        rows.append(_row(finished, archive))
    return rows


def replay_columns(problem: Problem, cols: Columns, make_archive: Callable[[], RunArchive],
                   every: int = DEFAULT_EVERY) -> list[dict[str, Any]]:
    """``replay`` for trials as columns (number order): a row every ``every`` finished evaluations."""
    import numpy as np

    archive = make_archive()
    rows: list[dict[str, Any]] = []
    fin = np.flatnonzero(cols.finished)
    for start in range(0, len(fin), every):
        chunk = fin[start:start + every]
        archive.add_columns(cols.select(chunk))
        rows.append(_row(start + len(chunk), archive))
    return rows


def history(store: Store, problem: Problem, cols: Columns | None = None) -> list[dict[str, Any]]:
    """The run's recorded metric rows, or rows replayed from its trials when none were recorded."""
    recorded = store.attrs().get(METRICS_KEY)
    if recorded:
        return recorded
    spec = store.archive_spec_json
    if spec is None:
        return []
    cols = store.columns() if cols is None else cols
    every = rows_every(int(cols.finished.sum()))
    return replay_columns(problem, cols, lambda: archive_from_spec_json(problem, spec), every)
