"""The run loop: keep ``workers`` evaluations in flight, record and tell each one as it finishes.

There is no batch barrier: as soon as one evaluation finishes, its result is written to the
store, told to the strategy, and a new configuration is asked for its slot.

Budget: the number of *finished* evaluations (complete, or failed by the evaluation itself).
Resume: trials left RUNNING by a driver that died are marked failed and ``stale`` (they do not
count towards the budget) and their configurations are evaluated again first; everything else
is replayed into the strategy with ``Strategy.restore``.

One driver per run: a driver *claims* the run in the record before anything else (a
compare-and-set on the run's row: of two drivers started at the same instant exactly one wins),
and refreshes a heartbeat with every flush. A claim held by a driver still alive on this host,
or by one on another host whose heartbeat is recent (``CLAIM_STALE_S``), is refused
(``RunInUse``). A re-queued trial records the stale trial it re-runs (``requeue_of``) in the same
write that creates it, so a driver killed at any moment never re-queues one configuration twice.

Writes are grouped (``Store.flush``): cheap outcomes are flushed every ``Store.flush_s`` seconds
or ``Store.flush_rows`` outcomes, an outcome whose evaluation took ``EXPENSIVE_S`` or more at
once, and anything buffered before the loop blocks waiting for workers. A ``kill -9`` therefore
costs at most the cheap outcomes of the last ``flush_s`` seconds, or of the write still landing
beside the loop and what was buffered meanwhile (resume evaluates new
configurations in their place: the budget counts what is recorded), never an expensive result,
never a half-written trial (each flush is one transaction).

A vectorised problem (``Problem.vectorized``) on the in-process evaluator is evaluated a
strategy's batch at a time, as arrays (``Strategy.ask_raw`` / ``tell_columns``), with no Python
object per configuration on the way.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from evaluators.base import Evaluator, Job, Outcome
from qd.columns import COMPLETE, FAILED, ORIGIN_REQUEUE, ORIGIN_STRATEGY, Columns, ColumnsBuilder, dumps_metadata
from qd.experiment import ExperimentError
from qd.problem import BatchEvaluation, EvaluationError, Problem
from qd.processes import alive, identity
from qd.processes import process_start as _process_start  # noqa: F401 (tests read it here)
from qd.results import hypervolume, pareto_front_mask, reference_point_of_values
from qd.space import Config
from qd.stopping import StopOnSignals, mark_stale
from qd.store import Store, Trial
from qd.strategy import Strategy

Callback = Callable[[Store, Trial], None]

STALE_REASON = "stale: the driver stopped while this evaluation was running; its configuration was queued again"
CANCELLED_REASON = "cancelled: the wall-time limit was reached while this evaluation was running"
#: An evaluation that took this long is written at once, with everything buffered before it.
EXPENSIVE_S = 1.0
#: A vectorised run records its batches in blocks of at most this many rows and seconds: each
#: batch is evaluated and told to the strategy as it comes (the archive the next batch draws
#: from is current), and a block's bookkeeping (cells, counts, elites, the store's buffer,
#: progress) is paid once for up to 16 pyribs-sized batches. A kill can cost a block more.
BLOCK_ROWS = 4096
BLOCK_S = 0.02
#: A vectorised run with this many evaluations to go starts the record writer process at once.
EAGER_WRITER_ROWS = 100_000
#: The arrays ``step_batch`` sets in full for every row of a block (each batch, ``_fill``, the cells).
BATCH_WRITES = ("number", "raw", "seed", "t_start", "t_end", "state", "cell")
#: A claim whose heartbeat is older than this is taken as dead (drivers on other hosts).
CLAIM_STALE_S = 60.0


class RunInUse(ExperimentError):
    """The run has evaluations running in a driver that is still alive."""


# Tokens of the run() calls in progress in this process (a trial's driver may be this very process).
_LIVE_RUNS: set[str] = set()


def driver_identity(token: str) -> dict[str, object]:
    """What a trial records about the driver that starts it."""
    return {**identity(os.getpid()), "token": token}


def driver_alive(driver: dict[str, object] | None) -> bool:
    """Whether the driver that started a trial is still running (known on its own host only)."""
    if driver and driver.get("pid") == os.getpid() and driver.get("host") == socket.gethostname():
        return driver.get("token") in _LIVE_RUNS
    return alive(driver)


@dataclass
class RunReport:
    """How a session of ``run`` ended: trials finished, complete, failed and requeued, its
    seconds, and what stopped it ("budget", "time" or "strategy")."""

    finished: int
    complete: int
    failed: int
    requeued: int
    elapsed_s: float
    stopped_by: str  # "budget", "time", "strategy"

    def __repr__(self) -> str:  # what a notebook cell shows: seconds rounded
        return (f"RunReport(finished={self.finished}, complete={self.complete}, failed={self.failed}, "
                f"requeued={self.requeued}, elapsed_s={self.elapsed_s:.1f}, stopped_by={self.stopped_by!r})")


_M64 = 2**64 - 1


def evaluation_seeds(run_seed: int, numbers: np.ndarray) -> np.ndarray:
    """(n,) seeds of the evaluations of trials ``numbers`` of a run: splitmix64 of (seed, number),
    31 bits, so every trial has its own stream and a resumed run gives the same seeds."""
    # Array arithmetic on uint64 wraps silently (numpy warns only on scalar overflow).
    offset = np.uint64(((run_seed & 0xFFFFFFFF) * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15) & _M64)
    z = np.asarray(numbers, dtype=np.uint64) + offset
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z & np.uint64(0x7FFFFFFF)).astype(np.int64)


def evaluation_seed(run_seed: int, trial_number: int) -> int:
    """``evaluation_seeds`` for one trial, in Python integers (equal; a tenth of the cost)."""
    z = (int(trial_number) + (run_seed & 0xFFFFFFFF) * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return (z ^ (z >> 31)) & 0x7FFFFFFF


class _Progress:
    """Progress over the budget: evaluations finished, failed and running, the best values, the
    hypervolume (several objectives) and the strategy's ``state()`` (e.g. archive coverage).

    It reads the run's ``RunState`` (counts and the Pareto front kept there), so a refresh costs
    the same at 10 and at 10^6 trials. The hypervolume is shown only against a reference point
    the problem declares (as a share of the problem's ``max_hypervolume()`` when it knows it):
    against a point derived from the data it mixes the objectives' units and moves with the data,
    so it is left out.

    On a terminal this is a tqdm bar of fixed width whose figures are cut, whole, to the terminal's
    width. When stderr is not a terminal (a log file, a CI job, a notebook's captured stream)
    carriage-return redraws would pile up into one unreadable line, so a plain line is written every
    ``log_every_s`` seconds and once at the end instead.
    """

    BAR_FORMAT = "{desc} {n_fmt}/{total_fmt} |{bar:12}| {elapsed}<{remaining}{postfix}"

    def __init__(self, store: Store, problem: Problem, strategy: Strategy, budget: int, state: RunState,
                 enabled: bool, log_every_s: float = 10.0):
        self.store, self.problem, self.strategy, self.budget, self.state = store, problem, strategy, budget, state
        self.stream = sys.stderr
        self.enabled = enabled
        self.tty = enabled and _isatty(self.stream)
        self.bar = tqdm(total=budget, initial=min(state.n_finished, budget), desc=store.info.name,
                        disable=not self.tty, file=self.stream, bar_format=self.BAR_FORMAT, dynamic_ncols=True)
        self.log_every_s = log_every_s
        self._t0 = time.monotonic()
        self._last = 0.0  # last postfix refresh (tty)
        self._last_line = self._t0  # last log line (not a tty)
        self._logged = -1  # finished count of the last log line
        self._running = 0
        self._shown = state.n_finished
        self._max_hv: float | None | bool = False  # False: not asked yet

    @property
    def finished(self) -> int:
        return self.state.n_finished

    def _max_hypervolume(self) -> float | None:
        if self._max_hv is False:
            try:  # a benchmark's known maximum (Problem.max_hypervolume); most problems do not know theirs
                top = self.problem.max_hypervolume
                self._max_hv = float(top) if top else None
            except Exception:
                self._max_hv = None
        return self._max_hv  # type: ignore[return-value]

    def fields(self, running: int) -> dict[str, str]:
        """The figures shown, most important first, as short strings (the log line's ``key=value`` pairs)."""
        post: dict[str, str] = {}
        directions = self.problem.directions
        names = self.problem.objective_names
        front = self.state.front
        if len(front) and len(directions) == 1:
            best = front[:, 0].min() if directions[0] == "minimize" else front[:, 0].max()
            post[f"best {names[0]}"] = f"{best:.4g}"
        elif len(front):
            post["pareto"] = str(len(front))
            ref = self.problem.reference_point
            if ref is not None:
                hv = hypervolume(front, directions, ref)
                top = self._max_hypervolume()
                if top:
                    post["hv/max"] = f"{hv / top:.1%}"  # a share of the problem's known maximum
                else:
                    post["hv"] = f"{hv:.4g}"
        if self.state.n_failed:
            post["failed"] = str(self.state.n_failed)
        try:
            state = self.strategy.state()
        except Exception as e:  # progress must never stop a run
            state = {"state": f"unavailable ({type(e).__name__})"}
        for k, v in state.items():
            if k == "coverage" and isinstance(v, float):
                post[k] = f"{v:.1%}"
            else:
                post[k] = f"{v:.3g}" if isinstance(v, float) else str(v)
        post["running"] = str(running)
        return post

    def _postfix(self, running: int) -> str:
        """The figures that fit the terminal after the bar, whole ones only, in order of importance."""
        columns = shutil.get_terminal_size((80, 24)).columns
        fixed = len(self.store.info.name) + 2 * len(str(self.budget)) + 34  # desc, counts, bar, times
        room = max(0, columns - fixed - 1)
        out = ""
        for k, v in self.fields(running).items():
            item = f", {k}={v}"  # tqdm puts ", " before the postfix: the first one is dropped
            if len(out) + len(item) > room:
                break
            out += item
        return out[2:]

    def update(self, cols: Columns, running: int, force: bool = False) -> None:
        """After ``cols`` finished (already counted in the run's state)."""
        self._running = running
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            if force or now - self._last >= 1.0:
                self._last = now
                self.bar.postfix = self._postfix(running)
            self.bar.update(min(self.state.n_finished, self.budget) - min(self._shown, self.budget))
            self._shown = self.state.n_finished
        elif force or now - self._last_line >= self.log_every_s:
            self._log_line(running)

    def _log_line(self, running: int) -> None:
        self._last_line, self._logged = time.monotonic(), self.finished
        elapsed = self._last_line - self._t0
        pairs = " ".join(f"{k}={v}" if " " not in v else f"{k}=[{v}]" for k, v in self.fields(running).items())
        print(f"[{self.store.info.name}] {min(self.finished, self.budget)}/{self.budget} finished "
              f"({self.state.n_complete} complete) {pairs} elapsed={elapsed:.0f}s", file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled and not self.tty and self._logged != self.finished:
            self._log_line(self._running)
        self.bar.close()


def _isatty(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):
        return False


# --- the claim: one driver per run --------------------------------------------------------------
def claim_run(store: Store, token: str, driver: dict[str, Any], drivers_in_flight: Sequence[Any] = ()) -> None:
    """Make this driver the run's only owner, or raise ``RunInUse``.

    Refused when the recorded owner (or the driver of an in-flight trial) is alive: on this host by
    its pid and start time, elsewhere by a heartbeat younger than ``CLAIM_STALE_S``. The claim
    itself is a compare-and-set in the record, so of two drivers racing for a dead run one wins.
    """
    owner, owner_info, heartbeat = store.record.owner()
    def refuse(d: dict[str, Any] | None, why: str) -> RunInUse:
        d = d or {}
        return RunInUse(f"run {store.info.name!r} is owned by a driver that is still alive (pid {d.get('pid')} on "
                        f"{d.get('host')}; {why}); stop it before resuming this run, or choose another --name")
    if owner is not None:
        here = bool(owner_info) and owner_info.get("host") == socket.gethostname()
        if here and driver_alive(owner_info):
            raise refuse(owner_info, "it holds the run's claim")
        if here and alive(owner_info.get("writer")):  # a write of the dead driver may still land
            raise refuse(owner_info, f"its record writer (pid {owner_info['writer']['pid']}) is still writing")
        if not here and heartbeat is not None and time.time() - heartbeat < CLAIM_STALE_S:
            raise refuse(owner_info, f"its heartbeat is {time.time() - heartbeat:.0f} s old")
    busy = [d for d in drivers_in_flight if d and driver_alive(d)]
    if busy:
        raise refuse(busy[0], f"{len(busy)} of its evaluations are running")
    if not store.record.claim(token, driver, expected=owner):
        _, other, _ = store.record.owner()
        raise refuse(other, "it claimed the run a moment ago")
    store.owner = token


def release_run(store: Store, token: str) -> None:
    """Give up the claim ``token`` holds on the store's run (the store stops heartbeating either way)."""
    try:
        store.record.release(token)
    finally:
        store.owner = None


# --- the run's archive and metrics: one per run, shared by strategy, metrics and views -----------
class RunState:
    """What the driver holds of a run while it runs: its trials as columns, its archive (the
    strategy's own when it has the run's spec, else one kept here), the metric history, counts and
    the Pareto front so far. Views and the dashboard read this; nothing here writes the record
    except the metric history (``flush_metrics``)."""

    def __init__(self, store: Store, problem: Problem, strategy: Strategy, history: Columns, budget: int):
        from qd.archive import archive_from_spec_json
        from qd.metrics import METRICS_KEY, rows_every

        self.store, self.problem, self.budget = store, problem, budget
        # Room for the budget from the start (pages count once written; beyond 2^21 rows it grows).
        left = max(0, budget - int(history.finished.sum()))
        self._columns = ColumnsBuilder(history, capacity=len(history) + min(left, 1 << 21))
        self._columns.append(history)
        self.n_finished = int(history.finished.sum())
        self.n_complete = int(history.complete.sum())
        self.n_failed = self.n_finished - self.n_complete
        self.directions = problem.directions
        self._sign = np.array([1.0 if d == "minimize" else -1.0 for d in self.directions])  # minimised = sign * value
        self.front = np.empty((0, len(problem.objectives)))
        self._update_front(history)
        self.archive = None
        self.own_archive = False
        spec = store.archive_spec_json
        if spec is not None:
            shared = strategy.archive  # Strategy.archive: None unless it keeps one
            if shared is not None and shared.spec_json() == spec:
                self.archive = shared  # restored by the strategy from the same history
            else:
                self.archive, self.own_archive = archive_from_spec_json(problem, spec), True
                self.archive.add_columns(history)
        # The row of each cell's elite (best value, earliest trial of equals: ``qd.explore.elite_rows``),
        # kept as batches arrive, so a publish at 10^6 trials does not sort them all to find 400.
        self._elites: _EliteRows | None = None
        if self.archive is not None and self.archive.kind == "elite":
            self._elites = _EliteRows(self.archive)
            self._elites.add(history, 0)
        self.metrics_key = METRICS_KEY
        self.every = rows_every(budget)
        self.metrics: list[dict[str, Any]] = [r for r in store.attrs().get(METRICS_KEY, [])
                                              if r.get("evaluations", 0) <= self.n_finished]
        self._metrics_dirty, self._metrics_flushed = False, time.monotonic()
        self._told = 0  # finished rows of the block in progress, seen by ``told``

    # trials
    def add(self, cols: Columns, told: bool = False) -> None:
        """Finished trials (already recorded and told to the strategy).

        Args:
            cols: The rows.
            told: Whether ``told`` has seen them batch by batch already (a vectorised block): the
                run's own archive and the metric history then have them.
        """
        at = len(self._columns)
        self._columns.append(cols)
        if self._elites is not None:
            self._elites.add(cols, at)
        if len(cols) == 1:  # a trial at a time (the per-configuration loop): no array reductions
            state = int(cols.state[0])
            comp = int(state == COMPLETE)
            fin = int(comp or (state == FAILED and not cols.stale[0]))
        else:
            fin = int(cols.finished.sum())
            comp = int(cols.complete.sum())
        before = self.n_finished
        self.n_finished += fin
        self.n_complete += comp
        self.n_failed += fin - comp
        self._update_front(cols)
        if told:
            self._told = 0
            return
        if self.own_archive:
            self.archive.add_columns(cols)
        if self.archive is not None and self.n_finished // self.every > before // self.every:
            self.append_metrics()

    def told(self, part: Columns, finished: int | None = None) -> None:
        """One batch of a block, just told to the strategy: the run's own archive takes it, and a
        metrics row is taken where one falls due, so a block of many batches keeps the history's
        resolution (the block itself is recorded, then given to ``add`` with ``told=True``).

        Args:
            part: The batch's rows.
            finished: How many of them are finished, when the caller knows (default: counted).
        """
        if self.own_archive:
            self.archive.add_columns(part)
        before = self.n_finished + self._told
        self._told += int(part.finished.sum()) if finished is None else finished
        after = self.n_finished + self._told
        if self.archive is not None and after // self.every > before // self.every:
            self.append_metrics(after)

    def reserve(self, n: int, written: Sequence[str] = ()) -> Columns:
        """n blank rows for the next batch, filled in place, then given to ``add`` (``written``:
        arrays the caller sets in full, left unset here; see ``ColumnsBuilder.reserve``)."""
        return self._columns.reserve(n, written)

    def trim(self, n: int) -> Columns:
        """The first ``n`` rows of the block ``reserve`` gave (a block that ended early), for ``add``."""
        return self._columns.trim(n)

    def columns(self) -> Columns:
        """Every trial finished so far, in the order recorded (views of the run's arrays)."""
        return self._columns.view()

    def elite_rows(self) -> np.ndarray | None:
        """Row indices (into ``columns()``) of the archive's elites, one per occupied cell in cell
        order, as ``qd.explore.elite_rows`` finds them; None where the archive is not an elite one."""
        return None if self._elites is None else self._elites.rows()

    def cells(self, cols: Columns) -> np.ndarray:
        """(n,) int64 archive cell of each row of ``cols``; -1 where none (or no archive)."""
        return np.full(len(cols), -1, dtype=np.int64) if self.archive is None else self.archive.cells_of(cols)

    def _update_front(self, cols: Columns) -> None:
        if len(cols) == 1:  # a trial at a time: scalar tests, no masks
            if cols.state[0] != COMPLETE or (cols.constraints.shape[1] and not (cols.constraints[0] <= 0).all()):
                return
            new = cols.values
        else:
            ok = cols.feasible
            if not ok.any():
                return
            new = cols.values[ok]
        if len(self.directions) == 1 and len(new) > 1:  # one objective: the front is the best row
            new = new[[int(np.argmin(self._sign[0] * new[:, 0]))]]
        if len(self.front) and len(new) == 1:  # a trial at a time: most are dominated, which is cheap to see
            if len(self.directions) == 1:
                if self._sign[0] * self.front[0, 0] <= self._sign[0] * new[0, 0]:
                    return
            elif np.any(np.all(self.front * self._sign <= new[0] * self._sign, axis=1)):  # dominated or equal
                return
        Y = np.vstack([self.front, new])
        self.front = Y[pareto_front_mask(Y, self.directions)]

    # metrics
    def append_metrics(self, evaluations: int | None = None) -> None:
        """Add the archive's metrics at ``evaluations`` (default: the finished count so far), stored
        every 5 s at most."""
        evaluations = self.n_finished if evaluations is None else evaluations
        row = {"evaluations": evaluations, **self.archive.metrics()}
        if self.metrics and self.metrics[-1]["evaluations"] == evaluations:
            self.metrics[-1] = row
        else:
            self.metrics.append(row)
        self._metrics_dirty = True
        if time.monotonic() - self._metrics_flushed >= 5.0:
            self.flush_metrics()

    def flush_metrics(self) -> None:
        """Store the metric history in the record if it changed since last stored."""
        if self._metrics_dirty:
            self.store.set_attr(self.metrics_key, self.metrics)
            self._metrics_dirty, self._metrics_flushed = False, time.monotonic()

    def close(self) -> None:
        """Add the final metrics and store the history (at the end of a session)."""
        if self.archive is not None and self.n_finished:
            self.append_metrics()
        self.flush_metrics()


class _EliteRows:
    """Per cell of an elite archive: the row, score (``sign * value``) and number of its best trial."""

    def __init__(self, archive: Any):
        self.factor, self.objective = archive.spec.score_factor, archive.spec.objective_index
        self.row = np.full(archive.n_cells, -1, dtype=np.int64)
        self.score = np.full(archive.n_cells, -np.inf)
        self.number = np.full(archive.n_cells, np.iinfo(np.int64).max, dtype=np.int64)

    def add(self, cols: Columns, first_row: int) -> None:
        if len(cols) == 1:  # a trial at a time: scalars, not array passes
            cell = int(cols.cell[0])
            if cell >= 0:
                score, number = self.factor * float(cols.values[0, self.objective]), int(cols.number[0])
                if score > self.score[cell] or (score == self.score[cell] and number < self.number[cell]):
                    self.row[cell], self.score[cell], self.number[cell] = first_row, score, number
            return
        rows = np.flatnonzero(cols.cell >= 0)
        if not len(rows):
            return
        from qd.archive import best_of_cells

        cell, number = cols.cell[rows], cols.number[rows]
        score = self.factor * cols.values[rows, self.objective]
        first = best_of_cells(cell, score, number, len(self.row))  # per cell: best score, then the earliest trial
        rows, cell, number, score = rows[first], cell[first], number[first], score[first]
        better = (score > self.score[cell]) | ((score == self.score[cell]) & (number < self.number[cell]))
        cell = cell[better]
        self.row[cell], self.score[cell], self.number[cell] = rows[better] + first_row, score[better], number[better]

    def rows(self) -> np.ndarray:
        return self.row[self.row >= 0]


class Listener:
    """Something that watches a run (the dashboard publisher): ``update`` is called at most every
    ``every_s`` seconds and ``close`` once at the end, both with the run's ``RunState``."""

    every_s: float = 10.0

    def update(self, state: RunState) -> None:
        """Called at most every ``every_s`` seconds while the run runs; does nothing by default."""
        pass

    def close(self, state: RunState) -> None:
        """Called once when the session ends; does nothing by default."""
        pass


# --- the loop -----------------------------------------------------------------------------------
class _Loop:
    """One session of a run: claim, recover, then evaluate until the budget (see the module docstring)."""

    def __init__(self, problem: Problem, strategy: Strategy, evaluator: Evaluator, store: Store, *, budget: int,
                 workers: int, time_limit_s: float | None, timeout_s: float | None, progress: bool,
                 callbacks: Sequence[Callback], listeners: Sequence[Listener]):
        self.problem, self.strategy, self.evaluator, self.store = problem, strategy, evaluator, store
        self.budget, self.workers, self.time_limit_s, self.timeout_s = budget, workers, time_limit_s, timeout_s
        self.callbacks, self.listeners = list(callbacks), list(listeners)
        self.show_progress = progress
        self.t_start = time.monotonic()
        self.token = uuid.uuid4().hex
        self.driver = driver_identity(self.token)
        self.in_flight: dict[int, Trial] = {}
        self.requeue: deque[tuple[int, np.ndarray]] = deque()
        self.stopped_by = "budget"
        self._last_listen = time.monotonic()
        self.space = problem.space
        self.vectorised = bool(problem.vectorized) and bool(getattr(evaluator, "synchronous", False)) \
            and not self.callbacks

    # steps
    def recover(self) -> Columns:
        """Claim the run, fail trials left in flight as stale, queue their configurations again."""
        # Claim first, read after: a driver that read the run before another one finished and
        # released it would otherwise resume from a stale picture (and reuse its trial numbers).
        claim_run(self.store, self.token, self.driver, self.store.record.running_drivers())
        self.store.sync_numbers()
        cols = self.store.columns()
        running = cols.state == 0
        if running.any():
            stale = cols.select(running)
            stale.state[:] = FAILED
            stale.stale[:] = True
            stale.t_end[:] = time.time()
            stale.reason = [STALE_REASON] * len(stale)
            stale.metadata = [dumps_metadata({"requeue": True})] * len(stale)
            self.store.finish_many(stale)
            self.store.flush()
            cols = self.store.columns()
        relaunched = set(cols.requeue_of[cols.requeue_of >= 0].tolist())
        for i in np.flatnonzero(cols.stale).tolist():
            number = int(cols.number[i])
            if number not in relaunched and cols.metadata_of(i).get("requeue"):
                self.requeue.append((number, cols.raw[i].copy()))
        return cols

    def out_of_time(self) -> bool:
        return self.time_limit_s is not None and time.monotonic() - self.t_start >= self.time_limit_s

    def notify(self, force: bool = False) -> None:
        now = time.monotonic()
        for listener in self.listeners:
            if force or now - self._last_listen >= listener.every_s:
                listener.update(self.state)
        if self.listeners and (force or now - self._last_listen >= min(l.every_s for l in self.listeners)):
            self._last_listen = now

    # per-configuration path (any evaluator)
    def launch(self, config: Config, origin: str, requeue_of: int | None = None, raw: np.ndarray | None = None) -> None:
        if raw is None:
            config = self.space.validate(config)
        number = int(self.store.next_numbers(1)[0])
        seed = evaluation_seed(self.store.info.seed, number)
        trial = self.store.start(config, None, origin=origin, seed=seed, driver=self.driver, requeue_of=requeue_of,
                                 raw=raw, number=number)
        trial.started = time.time()
        self.in_flight[number] = trial
        self.evaluator.submit(Job(number, config, seed))

    def record(self, outcome: Outcome) -> tuple[Trial, Columns]:
        trial = self.in_flight.pop(outcome.key)
        meta = dict(outcome.metadata)
        cols = self.store._finished_row(trial)
        cols.t_start[0] = getattr(trial, "started", np.nan)
        ok = False
        if outcome.ok:
            try:
                values, measures, constraints = self.problem.normalise(outcome.evaluation)
                meta.update(outcome.evaluation.metadata or {})
                ok = True
            except EvaluationError as e:
                reason = f"invalid result: {e}"
        else:
            reason = f"{outcome.kind}: {outcome.error}"
        if ok:
            cols.state[0] = COMPLETE
            cols.values[0] = values
            if measures:
                cols.measures[0] = measures
            if constraints:
                cols.constraints[0] = constraints
            cols.cell[0] = self.state.cells(cols)[0]
            trial.state, trial.values = "complete", values
            trial.measures, trial.constraints = measures, constraints
        else:
            cols.state[0] = FAILED
            cols.reason[0] = reason[-4000:]
            trial.state, trial.reason = "failed", reason
        cols.metadata[0] = dumps_metadata(meta)
        trial.metadata = meta
        expensive = float(meta.get("wall_time_s", 0.0) or 0.0) >= EXPENSIVE_S
        self.store.finish_many(cols, urgent=expensive)
        return trial, cols

    def step(self) -> bool:
        """Fill free slots, wait for outcomes and record them; False when the run is over."""
        out_of_time = self.out_of_time()
        slots = min(self.workers - len(self.in_flight), self.budget - self.state.n_finished - len(self.in_flight))
        if slots > 0 and not out_of_time:
            while self.requeue and slots > 0:
                number, raw = self.requeue.popleft()
                self.launch(self.space.from_raw(raw[None])[0], "requeue", requeue_of=number, raw=raw)
                slots -= 1
            if slots > 0:
                asked = self.strategy.ask(slots, pending=_Pending(self.in_flight))
                for config in asked[:slots]:  # qd.background hands out fallbacks at an ask's time limit
                    self.launch(config, self.strategy.origin_of(config))
        proposing = self.strategy.busy  # an ask computed beside the loop (qd.background)
        if not self.in_flight and proposing and not out_of_time:
            self.strategy.wait(0.05)  # then ask again: the proposal, or a fallback at its time limit
            return True
        if not self.in_flight:
            if out_of_time:
                self.stopped_by = "time"
            elif self.state.n_finished < self.budget:
                self.stopped_by = "strategy"
            return False
        if out_of_time:
            self.stopped_by = "time"
            for trial in list(self.in_flight.values()):
                self.store.fail(trial, CANCELLED_REASON, stale=True, metadata={"requeue": True})
            self.in_flight.clear()
            return False
        wait_for = None if self.time_limit_s is None else \
            max(0.05, self.time_limit_s - (time.monotonic() - self.t_start))
        if proposing:
            wait_for = 0.05 if wait_for is None else min(wait_for, 0.05)
        if not getattr(self.evaluator, "synchronous", False):
            # The loop is about to block: what is due goes now (cheap outcomes written by the
            # store's writer thread while the loop waits), the rest within its interval.
            self.store.maybe_flush(wait=False)
            due = self.store.seconds_to_flush()
            if due is not None:
                wait_for = due if wait_for is None else min(wait_for, due)
        for outcome in self.evaluator.wait(timeout=wait_for):
            trial, cols = self.record(outcome)
            self.strategy.tell(trial)
            self.state.add(cols)
            for cb in self.callbacks:
                cb(self.store, trial)
            self.progress.update(cols, len(self.in_flight), force=self.state.n_finished >= self.budget)
        self.store.maybe_flush(wait=False)  # expensive (urgent) outcomes are written before it returns
        self.notify()
        return True

    # batch path (vectorised problem, in-process evaluator)
    def _next_raws(self, most: int) -> tuple[np.ndarray, int, list[int] | None]:
        """Up to ``most`` configurations to evaluate next: (raw (n, d), origin code, the numbers
        they re-run or None): the re-queued ones first, else the strategy's next batch."""
        if self.requeue:
            numbers, raws = [], []
            while self.requeue and len(raws) < most:
                number, raw = self.requeue.popleft()
                numbers.append(number)
                raws.append(raw)
            return np.vstack(raws), ORIGIN_REQUEUE, numbers
        return self.strategy.ask_raw(most)[:most], ORIGIN_STRATEGY, None

    def step_batch(self) -> bool:
        """Evaluate a block of batches (``BLOCK_ROWS``, ``BLOCK_S``) and record it; False when the run is over."""
        if self.out_of_time():
            self.stopped_by = "time"
            return False
        left = self.budget - self.state.n_finished
        if left <= 0:
            return False
        hint = max(1, self.strategy.batch_hint)
        # Filled in place, no copy; the arrays every batch sets below (and _fill, and cells) are not blanked first.
        block = self.state.reserve(min(left, max(hint, BLOCK_ROWS - BLOCK_ROWS % hint)), BATCH_WRITES)
        # This loop is the run's only numberer, so the block's numbers are consecutive: their seeds
        # are drawn once for the block (a batch numbered otherwise gets its own).
        first = self.store.next_number
        seeds = evaluation_seeds(self.store.info.seed, np.arange(first, first + len(block)))
        at, urgent, more, t_block = 0, False, True, time.perf_counter()
        while at < len(block):
            R, origin, requeue_of = self._next_raws(min(len(block) - at, hint))
            if len(R) == 0:
                self.stopped_by, more = "strategy", False
                break
            end = at + len(R)
            part = block.rows(at, end)
            part.number[:] = self.store.next_numbers(len(R))
            part.raw[:] = R
            if requeue_of is not None:
                part.origin[:], part.requeue_of[:] = origin, requeue_of
            part.seed[:] = seeds[at:end] if part.number[0] == first + at else \
                evaluation_seeds(self.store.info.seed, part.number)
            part.t_start[:] = time.time()
            t0 = time.perf_counter()
            try:
                be = self.problem.evaluate_batch(R, part.seed)
                batch_error = None
            except Exception as e:  # a vectorised evaluation that raises fails its whole batch
                be, batch_error = None, f"exception: {type(e).__name__}: {e}"
            part.t_end[:] = time.time()
            if not _fill(part, be, batch_error, self.problem):  # reasons live in the part's own list
                block.reason[at:end] = part.reason
            urgent |= time.perf_counter() - t0 >= EXPENSIVE_S
            self.strategy.tell_columns(part)
            self.state.told(part, len(part))  # metrics rows where due: the archive as after this batch
            at = end
            if urgent or time.perf_counter() - t_block >= BLOCK_S or self.out_of_time():
                break
        cols = self.state.trim(at)
        if at:
            cols.cell[:] = self.state.cells(cols)
            self.store.finish_many(cols, urgent=urgent)
            self.state.add(cols, told=True)
            self.progress.update(cols, 0, force=self.state.n_finished >= self.budget)
            self.store.maybe_flush(wait=False)  # cheap outcomes: written beside the next block
            self.notify()
        return more

    def execute(self) -> RunReport:
        _LIVE_RUNS.add(self.token)  # before the claim: a thread of this process must see it as alive
        try:
            history = self.recover()
        except BaseException:
            _LIVE_RUNS.discard(self.token)
            raise
        n_requeued = len(self.requeue)
        if len(history):  # a fresh run keeps the strategy exactly as its seed made it
            self.strategy.restore_columns(history, self.store)
        self.state = RunState(self.store, self.problem, self.strategy, history, self.budget)
        del history  # the state holds its own copy, with room for the budget
        self.progress = _Progress(self.store, self.problem, self.strategy, self.budget, self.state, self.show_progress)
        self.store.autoflush = False
        if self.vectorised and self.budget - self.state.n_finished >= EAGER_WRITER_ROWS:
            self.store.start_writer()
        stop = None
        try:
            self.evaluator.start(self.problem, self.workers, self.timeout_s)
            # SIGINT/SIGTERM/SIGHUP -> Interrupted here; after start (ray.init sets SIGTERM's handler).
            stop = StopOnSignals()
            if self.vectorised:
                while self.step_batch():
                    pass
            else:
                while self.step():
                    pass
        except BaseException as e:  # stopped or broken: what was running is evaluated again on resume
            mark_stale(self.store, self.in_flight.values(), e)
            self.in_flight.clear()
            raise
        finally:
            _LIVE_RUNS.discard(self.token)
            try:
                self.strategy.close()
                self.evaluator.close()
                try:
                    self.store.flush()
                finally:
                    self.store.close_writer()
                self.state.close()
                for listener in self.listeners:
                    listener.close(self.state)
            finally:
                self.store.autoflush = True
                release_run(self.store, self.token)
                self.progress.close()
                if stop is not None:
                    stop.restore()  # last: a signal during the cleanup above is ignored
        # The run's state counts what the record holds (its history plus what this session
        # flushed): reading 10^6 rows back to count them would cost seconds and their memory twice.
        return RunReport(finished=self.state.n_finished, complete=self.state.n_complete, failed=self.state.n_failed,
                         requeued=n_requeued, elapsed_s=time.monotonic() - self.t_start, stopped_by=self.stopped_by)


class _Pending(Sequence):
    """The configurations in flight, built only if a strategy reads them (hundreds of workers)."""

    def __init__(self, in_flight: dict[int, Trial]):
        self._in_flight = in_flight
        self._list: list[Config] | None = None

    def _items(self) -> list[Config]:
        if self._list is None:
            self._list = [t.params for t in self._in_flight.values()]
        return self._list

    def __len__(self) -> int:
        return len(self._in_flight)

    def __getitem__(self, i):  # type: ignore[override]
        return self._items()[i]

    def __iter__(self):
        return iter(self._items())


def _fill(cols: Columns, be: BatchEvaluation | None, batch_error: str | None, problem: Problem) -> bool:
    """Write a batch's results into ``cols``: complete rows, and failed ones with their reason.

    Returns:
        Whether every row is complete.
    """
    n = len(cols)
    m, k, c = len(problem.objectives), len(problem.measures), len(problem.constraints)
    if be is None:
        cols.state[:] = FAILED
        cols.reason = [batch_error] * n
        return False
    values = np.asarray(be.values, dtype=float).reshape(n, m)
    measures = np.asarray(be.measures, dtype=float).reshape(n, k) if k else np.empty((n, 0))
    constraints = np.asarray(be.constraints, dtype=float).reshape(n, c) if c else np.empty((n, 0))
    errors = list(be.errors) if be.errors is not None else None
    if (errors is None or not any(e is not None for e in errors)) and \
            np.isfinite(values).all() and np.isfinite(measures).all() and np.isfinite(constraints).all():
        # the common case: whole-array checks, whole arrays written, no masked copies
        cols.state[:] = COMPLETE
        cols.values[:], cols.measures[:], cols.constraints[:] = values, measures, constraints
        return True
    finite = np.isfinite(values).all(axis=1) & np.isfinite(measures).all(axis=1) & np.isfinite(constraints).all(axis=1)
    ok = finite if errors is None else finite & np.array([e is None for e in errors], dtype=bool)
    errors = errors or [None] * n
    cols.state[:] = np.where(ok, COMPLETE, FAILED)
    cols.values[ok], cols.measures[ok], cols.constraints[ok] = values[ok], measures[ok], constraints[ok]
    for i in np.flatnonzero(~ok).tolist():
        cols.reason[i] = errors[i] or (f"invalid result: values {values[i].tolist()}, measures "
                                       f"{measures[i].tolist()}, constraints {constraints[i].tolist()} "
                                       f"are not all finite")
    return bool(ok.all())


def run(
    problem: Problem,
    strategy: Strategy,
    evaluator: Evaluator,
    store: Store,
    *,
    budget: int,
    workers: int = 1,
    time_limit_s: float | None = None,
    timeout_s: float | None = None,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
    listeners: Sequence[Listener] = (),
) -> RunReport:
    """Run until ``budget`` evaluations have finished (or ``time_limit_s`` passed); resumable.

    Args:
        problem: What is evaluated (``qd.session.prepare`` builds the four parts).
        strategy: What proposes configurations.
        evaluator: Where evaluations run.
        store: The run's record (``Store.create``).
        budget: finished evaluations (complete or failed by the evaluation) the run ends with.
        workers: evaluations in flight at once.
        time_limit_s: stop launching after this long; running evaluations are cancelled (stale).
        timeout_s: bound on one evaluation (evaluators that support it).
        progress: show a progress bar (a terminal) or log lines (otherwise).
        callbacks: ``callback(store, trial)`` after each finished trial (forces the per-trial path).
        listeners: ``Listener`` objects updated every few seconds (the dashboard publisher).

    Returns:
        A ``RunReport`` of this session. Failed evaluations are recorded with their reason and the
        run goes on.

    Raises:
        ValueError: a budget or workers below 1.
        RunInUse: another driver owns the run.
    """
    if budget < 1:
        raise ValueError(f"budget={budget}: must be >= 1")
    if workers < 1:
        raise ValueError(f"workers={workers}: must be >= 1")
    return _Loop(problem, strategy, evaluator, store, budget=budget, workers=workers, time_limit_s=time_limit_s,
                 timeout_s=timeout_s, progress=progress, callbacks=callbacks, listeners=listeners).execute()
