"""QD metrics over time, stored with the run so they survive resume and reach ``qd show``/``qd plot``.

``MetricsRecorder`` is a run-loop callback. It keeps its own copy of the run's archive
(``qd.archive.archive_for_run``: independent of the strategy, so any strategy on a problem with
measures gets the same numbers, and they match an archive rebuilt from the store), inserts each
complete trial as it finishes, and appends a row every ``every`` finished evaluations and at the
end. Rows are written to the store (study attribute ``qd_metrics``) at most every ``flush_s``
seconds and at the end: rewriting the growing list on every row would cost a database write per
row; a crash loses at most the last few seconds of rows, and ``replay`` recomputes them.

A row: ``evaluations`` (finished so far), ``coverage``, ``qd_score``, ``norm_qd_score``,
``num_elites``, ``best`` (elite archives: the best value; Pareto archives: the best value per
objective) and, for Pareto archives, ``moqd_score`` and ``global_hypervolume``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from qd.archive import RunArchive, archive_for_run, build_archive, spec_for_run
from qd.problem import Problem
from qd.store import Store, Trial

METRICS_KEY = "qd_metrics"
DEFAULT_EVERY = 10


def _row(evaluations: int, archive: RunArchive) -> dict[str, Any]:
    return {"evaluations": evaluations, **archive.metrics()}


class MetricsRecorder:
    """Callback ``recorder(store, trial)``; call ``close()`` when the run ends."""

    def __init__(self, store: Store, problem: Problem, every: int = DEFAULT_EVERY, flush_s: float = 5.0):
        if every < 1:
            raise ValueError(f"metrics: every={every!r} is not allowed; allowed: an integer >= 1")
        self.store, self.every, self.flush_s = store, int(every), float(flush_s)
        trials = store.trials()
        self.archive = archive_for_run(store, problem, trials)
        self.finished = sum(t.finished for t in trials)
        # Rows past the recorded trials (none, unless the store was edited) are dropped.
        self.history: list[dict[str, Any]] = [r for r in store.attrs().get(METRICS_KEY, [])
                                              if r.get("evaluations", 0) <= self.finished]
        self._dirty = False
        self._last_flush = time.monotonic()

    def __call__(self, store: Store, trial: Trial) -> None:
        if not trial.finished:
            return
        self.finished += 1
        if trial.state == "complete":
            self.archive.add_trials([trial])
        if self.finished % self.every == 0:
            self._append()
        if self._dirty and time.monotonic() - self._last_flush >= self.flush_s:
            self.flush()

    def _append(self) -> None:
        if self.history and self.history[-1]["evaluations"] == self.finished:
            self.history[-1] = _row(self.finished, self.archive)
        else:
            self.history.append(_row(self.finished, self.archive))
        self._dirty = True

    def flush(self) -> None:
        self.store.set_attr(METRICS_KEY, self.history)
        self._dirty = False
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Record the final row and write the history."""
        if self.finished:
            self._append()
        if self._dirty:
            self.flush()


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


def history(store: Store, problem: Problem, trials: Sequence[Trial] | None = None) -> list[dict[str, Any]]:
    """The run's recorded metric rows, or rows replayed from its trials when none were recorded."""
    recorded = store.attrs().get(METRICS_KEY)
    if recorded:
        return recorded
    info = store.info
    spec = spec_for_run(problem, info.strategy, info.strategy_options, info.seed)
    return replay(problem, store.trials() if trials is None else trials, lambda: build_archive(problem, spec))
