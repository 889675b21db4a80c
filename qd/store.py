"""The record of a run: qd's own columnar tables (``qd.record``), mirrored into an Optuna study.

The record is the single source of truth: strategies, archives and metrics are rebuilt from it
on resume, and ``qd show``, ``qd plot``, ``qd report``, ``qd export``, ``load_run`` and the
dashboard all read it (``Store.columns``), so they agree. Each run also has an Optuna study of
the same name in the same storage, for optuna-dashboard: ``qd.mirror`` copies trials into it in
batches (every trial of a small run; beyond a cap the elites and the Pareto set only).

Storage URLs: ``sqlite:///run.db`` (default), ``postgresql://...`` for a shared server, and
``journal:///path/run.log`` for Optuna's journal file (the record then lives beside it, in
``run.log.qd.db``). See ``qd.storage_url`` for what is refused and why.

Writing: the run loop writes through ``start``/``complete``/``fail`` (or their array forms
``start_many``/``finish_many``) with ``autoflush`` off and calls ``flush`` on its schedule; every
flush is one transaction. With ``autoflush`` on (the default, for scripts and tests) every call
is written at once.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import optuna
import pandas as pd

from qd.columns import (COMPLETE, FAILED, ORIGIN_CODES, ORIGIN_NAMES, RUNNING, STATE_NAMES, Columns,
                        dumps_metadata)
from qd.problem import Problem
from qd.record import Record, engine_for, sqlite_pragmas, running_json, running_row
from qd.processes import identity
from qd.record_writer import RecordWriter
from qd.space import Config
from qd.storage_url import RunNotFound, check_run_name, check_storage, mask  # noqa: F401 (RunNotFound: re-exported)

optuna.logging.set_verbosity(optuna.logging.WARNING)

State = Literal["running", "complete", "failed"]
#: Reasons and metadata longer than this are cut (the end is kept: that is where causes are).
MAX_REASON_CHARS = 4000
#: Flushes may take at most this share of a run's time (their interval stretches beyond ``flush_s``).
MAX_FLUSH_SHARE = 0.05
#: While a write is landing, a cheap flush that falls due waits for it; callers poll this often.
WRITER_POLL_S = 0.005
#: The record writer process (``qd.record_writer``) starts once the run loop has spent this long
#: writing cheap flushes itself: a short run never pays for a process (about a second of CPU).
WRITER_AFTER_S = 0.3
#: The owner's heartbeat is refreshed with a flush at most this often.
HEARTBEAT_S = 5.0


def resolve_storage(storage: str) -> str:
    """The SQLAlchemy URL of a storage: a plain ``postgresql://`` names the psycopg2 driver when
    psycopg 3 is absent (SQLAlchemy 2.1 maps the plain URL to psycopg 3, which this project does
    not depend on)."""
    if storage.startswith("postgresql://"):
        import importlib.util

        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
            return "postgresql+psycopg2://" + storage[len("postgresql://"):]
    return storage


def journal_path(storage: str) -> str | None:
    """The journal file of a ``journal:///path`` URL, else None."""
    return storage[len("journal://"):] if storage.startswith("journal://") else None


def record_url(storage: str) -> str:
    """The database that holds qd's tables for a storage URL.

    URLs are checked by ``qd.storage_url.check_storage`` before they get here.
    """
    path = journal_path(storage)
    if path is not None:
        return f"sqlite:///{path}.qd.db"
    return resolve_storage(storage)


def optuna_storage(storage: str) -> Any:
    """What to hand to Optuna for a storage URL (the study the dashboard reads)."""
    path = journal_path(storage)
    if path is not None:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(path))
    url = resolve_storage(storage)
    if url.startswith("sqlite"):
        engine_for(url)  # WAL mode on the file before Optuna opens it
        rdb = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
        # As the record's own connections: in WAL mode a killed process loses nothing committed, and
        # commits do not wait for the disk (Optuna writes a mirrored trial in tens of statements).
        import sqlalchemy as sa

        sa.event.listen(rdb.engine, "connect", lambda dbapi_connection, _record: sqlite_pragmas(dbapi_connection))

        rdb.engine.dispose()  # connections made while Optuna checked its schema get the pragma too
        return rdb
    return url


@dataclass
class Trial:
    """One evaluation as recorded (built from ``Columns`` on request; views use the columns)."""

    number: int
    params: Config
    state: State
    values: list[float] | None = None
    measures: list[float] | None = None
    constraints: list[float] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    origin: str = "strategy"
    stale: bool = False
    seed: int = 0
    driver: dict[str, Any] | None = None
    requeue_of: int | None = None

    @property
    def feasible(self) -> bool:
        """Complete with every constraint <= 0."""
        return self.state == "complete" and all(c <= 0 for c in (self.constraints or []))

    @property
    def finished(self) -> bool:
        """Counts towards the budget: complete, or failed by its own evaluation (not stale)."""
        return self.state == "complete" or (self.state == "failed" and not self.stale)


@dataclass(frozen=True)
class RunInfo:
    """What a run was made with: its name, problem, strategy (each with its options) and seed."""

    name: str
    problem: str
    problem_options: dict[str, Any]
    strategy: str
    strategy_options: dict[str, Any]
    seed: int

    def to_json(self) -> dict[str, Any]:
        """The fields but ``name`` as a JSON-serialisable dict (recorded with the run)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "name"}


def describe_params(problem: Problem) -> list[dict[str, Any]]:
    """What the record keeps of a space to turn raw rows back into configurations."""
    from qd.space import Categorical, Int

    out = []
    for p in problem.space.params:
        kind = "categorical" if isinstance(p, Categorical) else "int" if isinstance(p, Int) else "float"
        out.append({"name": p.name, "type": kind, **({"choices": list(p.choices)} if kind == "categorical" else {})})
    return out


class _RawDecoder:
    """Raw rows -> configurations, from the record's parameter description (no problem needed)."""

    def __init__(self, params: list[dict[str, Any]]):
        self.params = params

    def config(self, row: np.ndarray) -> Config:
        out: Config = {}
        for p, v in zip(self.params, row.tolist()):
            if v != v:
                continue
            if p["type"] == "categorical":
                out[p["name"]] = p["choices"][int(v)]
            elif p["type"] == "int":
                out[p["name"]] = int(v)
            else:
                out[p["name"]] = v
        return out


class _Buffer:
    """What the run loop has written but not flushed: in-flight rows and finished rows."""

    def __init__(self) -> None:
        # number -> in-flight row not yet written: its JSON, or running_json's arguments
        self.started: dict[int, str | tuple] = {}
        self.finished: list[Columns] = []
        self.ended: list[int] = []  # written in-flight rows to delete
        self.n_finished = 0
        self.since: float | None = None  # when the oldest unflushed item arrived
        self.urgent = False  # an expensive outcome waits: flush now

    def __bool__(self) -> bool:
        return bool(self.started or self.finished or self.ended)


class Store:
    """Read and write one run. Build with ``Store.create`` or ``Store.open``."""

    def __init__(self, storage: str, record: Record, info: RunInfo, meta: dict[str, Any]):
        self.storage, self.record, self.info, self.meta = storage, record, info, meta
        self.measure_names: list[str] = list(meta["measure_names"])
        self.objective_names: list[str] = list(meta["objective_names"])
        self.directions: list[str] = list(meta["directions"])
        self.dims = record.dims
        self._decoder = _RawDecoder(meta["params"])
        self._study: optuna.Study | None = None
        self._next = record.max_number() + 1
        self._buffer = _Buffer()
        self._in_db_running: set[int] = set()
        #: Write every call at once (scripts, tests); the run loop turns it off and flushes itself.
        self.autoflush = True
        #: The claim token of the driver writing through this store (heartbeats go with flushes).
        self.owner: str | None = None
        #: Cheap outcomes wait at most this long for a flush, unless flushing costs more than
        #: ``MAX_FLUSH_SHARE`` of the time: then the interval stretches to keep that share.
        self.flush_s = 0.05
        self.flush_rows = 4096
        self.n_flushes = 0
        self._blank: Columns | None = None  # a blank row to copy (``_finished_row``)
        self._raws: dict[int, np.ndarray] = {}  # raw rows of trials started here, until they finish
        self._writer: RecordWriter | None = None  # writes flush(wait=False) beside the loop; made on first use
        self._writer_warned = False
        self._own_write_s = 0.0  # time spent writing flush(wait=False)s here (``WRITER_AFTER_S``)
        self._flush_cost = 0.0
        self._last_heartbeat = 0.0

    # --- opening ----------------------------------------------------------------------------
    @classmethod
    def create(cls, storage: str, info: RunInfo, problem: Problem, *, resume: bool = False,
               archive: dict[str, Any] | None = None) -> Store:
        """Create the run (its record row and its Optuna study), or open an existing one.

        Args:
            storage: The storage URL (SQLite path or PostgreSQL URL).
            info: The run's name, problem, strategy and seed.
            problem: The problem; its space, objectives, measures and constraints are recorded.
            resume: Open the run if it exists instead of failing; it must match ``info``.
            archive: The run's archive spec (``qd.archive.spec_to_json``), recorded so every view
                rebuilds the same map; None builds it from the problem and strategy.

        Returns:
            The run's store. When two drivers create the same run at once, one creates it and the
            other opens it.

        Raises:
            StorageError: ``storage`` is not a usable storage URL, or the run name is not allowed.
            ValueError: The run exists and ``resume`` is False, or it was made with another
                problem, problem options or strategy.
        """
        check_storage(storage, create=True)
        check_run_name(info.name)
        try:
            existing = cls.open(storage, info.name)
        except RunNotFound:
            existing = None
        if existing is None:
            if archive is None and problem.measures:
                from qd.archive import spec_for_run, spec_to_json

                archive = spec_to_json(spec_for_run(problem, info.strategy, info.strategy_options, info.seed))
            meta = {**info.to_json(), "measure_names": problem.measure_names,
                    "objective_names": problem.objective_names, "directions": problem.directions,
                    "constraints": len(problem.constraints), "params": describe_params(problem),
                    "archive": archive, "created_by": "qd"}
            engine = engine_for(record_url(storage))
            run_id = Record.insert_run(engine, info.name, meta)
            if run_id is not None:
                store = cls(storage, Record(engine, run_id, _dims(meta)), info, meta)
                store._create_study()
                return store
            existing = cls.open(storage, info.name)  # another driver created it just now
        if not resume:
            raise ValueError(f"run {info.name!r} already exists in {mask(storage)}; pass --resume to continue it, "
                             f"or choose another --name")
        if (existing.info.problem, existing.info.problem_options) != (info.problem, info.problem_options):
            raise ValueError(f"run {info.name!r} was made with problem {existing.info.problem!r} "
                             f"{existing.info.problem_options}, not {info.problem!r} {info.problem_options}")
        if existing.info.strategy != info.strategy:
            raise ValueError(f"run {info.name!r} was made with strategy {existing.info.strategy!r}, "
                             f"not {info.strategy!r}")
        return existing

    @classmethod
    def open(cls, storage: str, name: str) -> Store:
        """Open an existing run for reading and writing.

        Args:
            storage: The storage URL.
            name: The run's name.

        Returns:
            The run's store.

        Raises:
            StorageError: ``storage`` is not a usable storage URL.
            RunNotFound: No run of that name is there (the message lists those that are).
        """
        check_storage(storage, create=False)
        found = Record.find(engine_for(record_url(storage)), name)
        if found is None:
            raise RunNotFound(f"no run named {name!r} in {mask(storage)}; runs there: {cls.run_names(storage)}")
        run_id, meta = found
        info = RunInfo(name=name, problem=meta["problem"], problem_options=meta["problem_options"],
                       strategy=meta["strategy"], strategy_options=meta["strategy_options"], seed=meta["seed"])
        return cls(storage, Record(engine_for(record_url(storage)), run_id, _dims(meta)), info, meta)

    @staticmethod
    def run_names(storage: str) -> list[str]:
        """The names of the runs in ``storage``.

        Raises:
            StorageError: ``storage`` is not a usable storage URL.
        """
        check_storage(storage, create=False)
        return Record.names(engine_for(record_url(storage)))

    # --- the Optuna study (optuna-dashboard's view) -----------------------------------------
    def _create_study(self) -> None:
        try:
            study = optuna.create_study(storage=optuna_storage(self.storage), study_name=self.info.name,
                                        directions=self.directions)
        except optuna.exceptions.DuplicatedStudyError:
            return
        with warnings.catch_warnings():  # marked experimental in Optuna; the dashboard reads it
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(self.objective_names)
        study.set_user_attr("qd", self.info.to_json())
        self._study = study

    @property
    def study(self) -> optuna.Study:
        """The run's Optuna study (created on first use if missing)."""
        if self._study is None:
            try:
                self._study = optuna.load_study(study_name=self.info.name, storage=optuna_storage(self.storage))
            except KeyError:
                self._create_study()
                if self._study is None:
                    self._study = optuna.load_study(study_name=self.info.name, storage=optuna_storage(self.storage))
        return self._study

    @property
    def archive_spec_json(self) -> dict[str, Any] | None:
        """The archive spec recorded when the run was created (None: the problem has no measures)."""
        return self.meta.get("archive")

    # --- writing ----------------------------------------------------------------------------
    def sync_numbers(self) -> None:
        """Continue numbering after what the record holds now (a driver calls it once it owns the run:
        the previous owner may have written trials since this store was opened)."""
        self._next = max(self._next, self.record.max_number() + 1)

    @property
    def next_number(self) -> int:
        """The number ``next_numbers`` gives next."""
        return self._next

    def next_numbers(self, n: int) -> np.ndarray:
        """Reserve the next ``n`` trial numbers (the driver that owns a run numbers its trials).

        Returns:
            Array of shape (n,), int64, consecutive.
        """
        out = np.arange(self._next, self._next + n, dtype=np.int64)
        self._next += n
        return out

    def start_many(self, cols: Columns, driver: dict[str, Any] | None = None) -> None:
        """Record in-flight trials (buffered; written at the next flush, or now with ``autoflush``).

        Args:
            cols: The trials, in RUNNING state, numbers from ``next_numbers``.
            driver: Who runs them (host, pid, ...), JSON-serialisable; kept with each row.
        """
        buf = self._buffer
        for i in range(len(cols)):
            buf.started[int(cols.number[i])] = running_row(cols, i, driver)
        self._touch()

    def finish_many(self, cols: Columns, urgent: bool = False) -> None:
        """Record finished trials (complete or failed); their in-flight rows, if any, go.

        Args:
            cols: The finished trials, their state, values, measures, reasons and metadata set.
            urgent: An expensive result: flushed at the next ``maybe_flush`` whatever the interval.
        """
        buf = self._buffer
        if buf.started or self._in_db_running:  # not so for a vectorised batch: it is never in flight
            for number in cols.number.tolist():
                if buf.started.pop(number, None) is None and number in self._in_db_running:
                    buf.ended.append(number)
                    self._in_db_running.discard(number)
        buf.finished.append(cols)
        buf.n_finished += len(cols)
        buf.urgent |= urgent
        self._touch()

    def _touch(self) -> None:
        if self._buffer.since is None:
            self._buffer.since = time.monotonic()
        if self.autoflush:
            self.flush()

    def flush_due(self) -> bool:
        """Whether the buffer should be written now (urgent, ``flush_rows`` full, or its interval passed)."""
        buf = self._buffer
        if not buf:
            return False
        interval = max(self.flush_s, self._flush_cost / MAX_FLUSH_SHARE)
        return buf.urgent or buf.n_finished >= self.flush_rows or time.monotonic() - buf.since >= interval

    def seconds_to_flush(self) -> float | None:
        """How long until the buffer is due (0: now; None: nothing buffered)."""
        buf = self._buffer
        if not buf:
            return None
        if buf.urgent:
            return 0.0
        due = 0.0 if buf.n_finished >= self.flush_rows else \
            max(0.0, max(self.flush_s, self._flush_cost / MAX_FLUSH_SHARE) - (time.monotonic() - buf.since))
        return max(due, WRITER_POLL_S) if self._writing() else due

    def _writing(self) -> bool:
        """Whether a ``flush(wait=False)`` write is still landing."""
        return self._writer is not None and self._writer.busy()

    def maybe_flush(self, wait: bool = True) -> bool:
        """``flush`` if due.

        Args:
            wait: False writes cheap outcomes beside the caller (see ``flush``), and leaves them
                buffered while the previous such write is still landing, so the caller never
                waits on the disk for them; urgent ones are written before it returns.

        Returns:
            Whether a flush was made.
        """
        if not self.flush_due():
            return False
        if not (wait or self._buffer.urgent) and self._writing():
            return False  # cheap outcomes wait for the write in flight instead of the caller waiting for it
        self.flush(wait=wait or self._buffer.urgent)
        return True

    def flush(self, wait: bool = True) -> None:
        """Write everything buffered in one transaction.

        ``wait=False`` hands the transaction to the record writer process (``qd.record_writer``)
        and returns at once (the database's I/O then overlaps the caller's work, without slowing
        it): the run loop does so for cheap outcomes. At most one such write is in flight; every
        other call of this store (a flush, a read) waits for it first, and re-raises its error. A
        kill before it lands costs those outcomes, as it would have cost them unflushed: the
        transaction lands whole or not at all. Until the run has spent ``WRITER_AFTER_S`` on such
        writes, and while the process starts (about a second), they are written here.

        Args:
            wait: False writes in the record writer process and returns at once.

        Raises:
            Exception: The database's error from this write; ``qd.record_writer.RecordWriteError``
                for the previous ``wait=False`` write (with the database's error in its message).
        """
        t0 = time.monotonic()
        self.wait_writes()  # part of this flush's cost: the interval stretches when the disk is slow
        buf = self._buffer
        if not buf and self.owner is None:
            return
        started = [(n, v if isinstance(v, str) else running_json(*v)) for n, v in buf.started.items()]
        beat = self.owner is not None and t0 - self._last_heartbeat >= HEARTBEAT_S
        writer = None if wait else self._ready_writer()
        if writer is None:
            self.record.write(buf.finished, started, buf.ended, self.owner if beat else None)
            if not wait:
                self._own_write_s += time.monotonic() - t0
        else:
            writer.submit(buf.finished, started, buf.ended, self.owner if beat else None)
        if beat:
            self._last_heartbeat = t0
        self._in_db_running.update(buf.started)
        self._buffer = _Buffer()
        self.n_flushes += 1
        self._flush_cost = time.monotonic() - t0

    def start_writer(self) -> None:
        """Start the record writer process now rather than after ``WRITER_AFTER_S`` (a run known to
        be long and cheap: it is then ready by the time the first flushes fall due)."""
        if self._writer is None:
            self._writer = RecordWriter(record_url(self.storage), self.record.run_id, self.dims)
            if self.owner is not None and self._writer.pid is not None:
                # A claim is refused while it lives: a write of a dead driver's may still land.
                self.record.note_owner(self.owner, "writer", identity(self._writer.pid))

    def _ready_writer(self) -> RecordWriter | None:
        """The record writer process, started on first use; None while it starts, or if it cannot
        (then the caller writes, as with ``wait=True``, and a warning says why once)."""
        if self._writer is None:
            if self._own_write_s < WRITER_AFTER_S:
                return None
            self.start_writer()
        if self._writer.ready():
            return self._writer
        if self._writer.failed is not None and not self._writer_warned:
            self._writer_warned = True
            warnings.warn(f"qd: flushes are written in the run loop's process ({self._writer.failed})",
                          RuntimeWarning, stacklevel=3)
        return None

    def wait_writes(self) -> None:
        """Wait for the write in flight (``flush(wait=False)``), re-raising its error."""
        if self._writer is not None:
            self._writer.wait()

    def close_writer(self) -> None:
        """Wait for the write in flight and stop the writer process (the run loop, at its end)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    # Single-trial forms, for scripts, tests and the per-configuration run loop.
    def start(self, params: Config, distributions: dict | None = None, *, origin: str = "strategy", seed: int = 0,
              driver: dict[str, Any] | None = None, requeue_of: int | None = None, raw: np.ndarray | None = None,
              number: int | None = None) -> Trial:
        """Record a RUNNING trial for a configuration about to be evaluated.

        Args:
            params: The configuration.
            distributions: Accepted for compatibility and unused: the record knows the space.
            origin: Who proposed it, a key of ``ORIGIN_CODES`` (e.g. "strategy").
            seed: The evaluation's seed.
            driver: Who runs it (host, pid, ...), JSON-serialisable.
            requeue_of: The number of the trial this one re-runs, if any.
            raw: The configuration's raw row, shape (d,), if the caller has it (saves encoding it).
            number: Its trial number; None takes the next one.

        Returns:
            The trial in state "running".

        Raises:
            KeyError: ``origin`` is unknown.
            ValueError: A categorical value is not one of the recorded choices.
        """
        number = int(self.next_numbers(1)[0]) if number is None else int(number)
        row = self._raw_of(params) if raw is None else np.asarray(raw, dtype=float)
        # Its JSON is made at a flush, if it is still in flight then: most cheap evaluations finish first.
        self._buffer.started[number] = (row, int(seed), ORIGIN_CODES[origin],
                                        -1 if requeue_of is None else int(requeue_of), time.time(), driver)
        self._touch()
        trial = Trial(number=number, params=dict(params), state="running", origin=origin, seed=seed,
                      driver=driver, requeue_of=requeue_of)
        self._raws[number] = row  # for its finished row, without encoding the configuration again
        return trial

    def _raw_of(self, params: Config) -> np.ndarray:
        row = np.full(self.dims[0], np.nan)
        for j, p in enumerate(self._decoder.params):
            if p["name"] in params:
                v = params[p["name"]]
                row[j] = _choice_index(p["choices"], v) if p["type"] == "categorical" else float(v)
        return row

    def _finished_row(self, trial: Trial) -> Columns:
        if self._blank is None:
            self._blank = Columns.empty(*self.dims, n=1)
        cols = Columns.row_like(self._blank)
        raw = self._raws.pop(trial.number, None)
        cols.number[0], cols.raw[0] = trial.number, self._raw_of(trial.params) if raw is None else raw
        cols.seed[0], cols.origin[0] = trial.seed, ORIGIN_CODES[trial.origin]
        cols.requeue_of[0] = -1 if trial.requeue_of is None else trial.requeue_of
        cols.t_end[0] = time.time()
        return cols

    def complete(self, trial: Trial, values: Sequence[float], measures: Sequence[float] = (),
                 constraints: Sequence[float] = (), metadata: dict[str, Any] | None = None,
                 cell: int = -1) -> Trial:
        """Record ``trial`` as complete: its row gets state COMPLETE, the values, measures,
        constraints, metadata, cell and end time, and its in-flight row goes (written at the next
        flush, or now with ``autoflush``).

        Args:
            trial: The trial, from ``start``.
            values: Objective values, length m, in the problem's declared order.
            measures: Measures, length k (empty: the problem has none).
            constraints: Constraint values, length c; the trial is feasible when all are <= 0.
            metadata: JSON-serialisable extras (numpy scalars become numbers, others strings).
            cell: Its archive cell index, -1 for none.

        Returns:
            ``trial``, updated in place (state "complete", values, measures, constraints, metadata).

        Raises:
            ValueError: A value, measure or constraint is not a number, or a non-empty sequence's
                length differs from the problem's (m, k or c).
            Exception: With ``autoflush``, the database's error from writing it.
        """
        cols = self._finished_row(trial)
        cols.state[0] = COMPLETE
        cols.values[0] = [float(v) for v in values]
        if measures:
            cols.measures[0] = [float(x) for x in measures]
        if constraints:
            cols.constraints[0] = [float(x) for x in constraints]
        cols.metadata[0] = dumps_metadata(metadata)
        cols.cell[0] = cell
        self.finish_many(cols)
        trial.state, trial.values = "complete", [float(v) for v in values]
        trial.measures, trial.constraints = [float(x) for x in measures], [float(x) for x in constraints]
        trial.metadata = dict(metadata or {})
        return trial

    def fail(self, trial: Trial, reason: str, *, stale: bool = False, metadata: dict[str, Any] | None = None) -> Trial:
        """Record ``trial`` as failed: its row gets state FAILED, the reason (its last
        ``MAX_REASON_CHARS`` characters), the stale flag, metadata and end time, and its in-flight
        row goes (written at the next flush, or now with ``autoflush``).

        Args:
            trial: The trial, from ``start``.
            reason: Why it failed (e.g. the evaluation's traceback).
            stale: Its driver stopped while it ran: it does not count towards the budget.
            metadata: JSON-serialisable extras.

        Returns:
            ``trial``, updated in place (state "failed", the full reason, stale, metadata).

        Raises:
            Exception: With ``autoflush``, the database's error from writing it.
        """
        cols = self._finished_row(trial)
        cols.state[0], cols.stale[0] = FAILED, stale
        cols.reason[0] = reason[-MAX_REASON_CHARS:]
        cols.metadata[0] = dumps_metadata(metadata)
        self.finish_many(cols)
        trial.state, trial.reason, trial.stale = "failed", reason, stale
        trial.metadata = dict(metadata or {})
        return trial

    def set_attr(self, key: str, value: Any) -> None:
        """Store run-level data (e.g. the metrics history) in the record."""
        self.wait_writes()
        self.record.set_attr(key, value)

    def attrs(self) -> dict[str, Any]:
        """The run-level data stored with ``set_attr``, by key."""
        return self.record.attrs()

    # --- reading ----------------------------------------------------------------------------
    def columns(self, with_drivers: bool = False) -> Columns | tuple[Columns, list[Any]]:
        """All trials in number order as arrays; flushes this store's buffer first.

        Args:
            with_drivers: Also return each row's driver.

        Returns:
            ``Columns`` of n rows (raw (n, d), values (n, m), measures (n, k), constraints (n, c),
            ...); with ``with_drivers`` a tuple ``(columns, drivers)``, drivers a list of n.

        Raises:
            Exception: The database's error from the flush or the read.
        """
        if self._buffer:
            self.flush()
        self.wait_writes()
        cols, drivers = self.record.read()
        return (cols, drivers) if with_drivers else cols

    def trials(self, states: Sequence[State] | None = None) -> list[Trial]:
        """All trials in number order as ``Trial`` objects (flushes this store's buffer first).

        One object per trial: for small runs and tests; views read ``columns()``.

        Args:
            states: Keep only trials in these states ("running", "complete", "failed"); None: all.

        Returns:
            The trials, with configurations decoded and drivers attached.
        """
        cols, drivers = self.columns(with_drivers=True)
        return [t for t in self.to_trials(cols, drivers) if states is None or t.state in states]

    def to_trials(self, cols: Columns, drivers: Sequence[Any] | None = None) -> list[Trial]:
        """``Trial`` objects of the rows of ``cols`` (no problem needed: the record knows the space)."""
        return _trials(cols, [self._decoder.config(r) for r in cols.raw], drivers)

    def counts(self) -> dict[str, int]:
        """Number of trials by state name (flushes this store's buffer first)."""
        return self.columns().counts()

    def dataframe(self, cols: Columns | None = None) -> pd.DataFrame:
        """One row per trial: number, state, origin, stale, params.*, values.*, measures.*, feasible,
        reason, metadata.* (scalar entries)."""
        cols = self.columns() if cols is None else cols
        frame: dict[str, Any] = {"number": cols.number, "state": [STATE_NAMES[int(s)] for s in cols.state],
                                 "origin": [ORIGIN_NAMES[int(o)] for o in cols.origin], "stale": cols.stale}
        configs = [self._decoder.config(r) for r in cols.raw] if len(cols) <= 200_000 else None
        for j, p in enumerate(self._decoder.params):
            if configs is None:
                frame[f"params.{p['name']}"] = cols.raw[:, j]
            else:
                frame[f"params.{p['name']}"] = [c.get(p["name"]) for c in configs]
        for i, name in enumerate(self.objective_names):
            frame[f"values.{name}"] = cols.values[:, i]
        for i, name in enumerate(self.measure_names):
            frame[f"measures.{name}"] = cols.measures[:, i]
        frame["feasible"] = cols.feasible
        frame["reason"] = cols.reason
        df = pd.DataFrame(frame)
        meta = [cols.metadata_of(i) for i in range(len(cols))] if any(cols.metadata) else []
        keys = sorted({k for m in meta for k, v in m.items() if not isinstance(v, (dict, list))})
        for key in keys:
            df[f"metadata.{key}"] = [m.get(key) for m in meta]
        return df


def trials_of(cols: Columns, space: Any) -> list[Trial]:
    """``Trial`` objects of the rows of ``cols`` for a ``Space`` (the slow path: one object each)."""
    return _trials(cols, space.from_raw(cols.raw) if len(cols) else [])


def _trials(cols: Columns, configs: Sequence[Config], drivers: Sequence[Any] | None = None) -> list[Trial]:
    """One ``Trial`` per row of ``cols``, with the row's configuration from ``configs``."""
    k, c = cols.dims[2], cols.dims[3]
    out = []
    for i, config in enumerate(configs):
        state = STATE_NAMES[int(cols.state[i])]
        complete = state == "complete"
        requeue_of = int(cols.requeue_of[i])
        out.append(Trial(number=int(cols.number[i]), params=config, state=state,
                         values=cols.values[i].tolist() if complete else None,
                         measures=cols.measures[i].tolist() if complete and k else None,
                         constraints=cols.constraints[i].tolist() if complete and c else None,
                         metadata=cols.metadata_of(i), reason=cols.reason[i], origin=ORIGIN_NAMES[int(cols.origin[i])],
                         stale=bool(cols.stale[i]), seed=int(cols.seed[i]),
                         driver=drivers[i] if drivers is not None else None,
                         requeue_of=None if requeue_of < 0 else requeue_of))
    return out


def _choice_index(choices: list[Any], value: Any) -> int:
    for i, c in enumerate(choices):
        if type(c) is type(value) and c == value:
            return i
    for i, c in enumerate(choices):
        if not isinstance(value, bool) and not isinstance(c, bool) and c == value:
            return i
    raise ValueError(f"value {value!r} is not one of the recorded choices {choices}")


def _dims(meta: dict[str, Any]) -> tuple[int, int, int, int]:
    return (len(meta["params"]), len(meta["objective_names"]), len(meta["measure_names"]), int(meta["constraints"]))


def _jsonable(value: Any) -> Any:
    """Round-trip through JSON so numpy scalars and tuples are stored as plain JSON."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
