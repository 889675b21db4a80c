"""The record: qd's own tables, the single source of truth of every run.

A run's finished trials are stored as *segments*: each flush of the run loop writes one row
holding an Arrow IPC batch of the trials it finished (columns, not one row per trial and
parameter), in one transaction that also deletes their in-flight rows and refreshes the
driver's heartbeat. Evaluations in flight are rows of ``qd_running`` until they finish. So a
flush costs a few statements whatever its size, and reading a run is one query and a
concatenation of arrays (``qd.columns.Columns``).

Tables (created on first use, in the same database as the Optuna study for ``sqlite:///`` and
``postgresql://`` URLs; beside the journal file for ``journal:///`` URLs):

- ``qd_runs``: one row per run: ``name`` (unique), ``info`` (JSON: problem, strategy, options,
  seed, names of parameters, objectives and measures, the archive spec), the claim (``owner``
  token, ``owner_info``, ``heartbeat``).
- ``qd_segments``: ``run_id``, ``n``, ``max_number``, ``data`` (Arrow IPC stream).
- ``qd_running``: ``run_id``, ``number``, ``data`` (JSON of the in-flight trial).
- ``qd_attrs``: ``run_id``, ``key``, ``value`` (JSON): run-level data such as the metrics history.

Guarantees: a transaction either lands whole or not at all, so a trial is never half written;
a flushed trial is never lost or changed (segments are immutable); the claim of a run is a
compare-and-set on its row, so two drivers never own one run at once.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import sqlalchemy as sa

from qd.columns import Columns

_META = sa.MetaData()
RUNS = sa.Table(
    "qd_runs", _META,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(512), nullable=False, unique=True),
    sa.Column("info", sa.Text, nullable=False),
    sa.Column("owner", sa.String(64), nullable=True),
    sa.Column("owner_info", sa.Text, nullable=True),
    sa.Column("heartbeat", sa.Float, nullable=True),
    sa.Column("created", sa.Float, nullable=False),
)
SEGMENTS = sa.Table(
    "qd_segments", _META,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.Integer, nullable=False, index=True),
    sa.Column("n", sa.Integer, nullable=False),
    sa.Column("max_number", sa.BigInteger, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
)
RUNNING_ROWS = sa.Table(
    "qd_running", _META,
    sa.Column("run_id", sa.Integer, primary_key=True),
    sa.Column("number", sa.BigInteger, primary_key=True),
    sa.Column("data", sa.Text, nullable=False),
)
ATTRS = sa.Table(
    "qd_attrs", _META,
    sa.Column("run_id", sa.Integer, primary_key=True),
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

# Uncompressed: per-buffer compression cost more than the disk it saved on float columns.
_IPC_OPTIONS = pa.ipc.IpcWriteOptions()
_SCALARS = ("number", "state", "stale", "origin", "seed", "requeue_of", "t_start", "t_end", "cell")
_MATRICES = (("raw", "p"), ("values", "v"), ("measures", "m"), ("constraints", "c"))


# --- segments: Columns <-> Arrow IPC bytes ------------------------------------------------------
_PA_TYPES = {np.dtype(np.int64): pa.int64(), np.dtype(np.int8): pa.int8(), np.dtype(np.float64): pa.float64()}


def _arrow(a: np.ndarray) -> pa.Array:
    """A numpy array as an Arrow array over its buffer (``pa.array`` infers types slowly here)."""
    if a.dtype == np.bool_:
        a = a.astype(np.int8)
    a = np.ascontiguousarray(a)
    return pa.Array.from_buffers(_PA_TYPES[a.dtype], len(a), [None, pa.py_buffer(a)])


def _strings(values: Sequence[str | None]) -> pa.Array:
    """A string column built from its buffers: ``pa.array`` on a list imports pandas on first use
    (a third of a second at the start of the record writer process, which needs nothing else of it)."""
    n = len(values)
    present = np.fromiter((v is not None for v in values), dtype=bool, count=n)
    if not present.any():
        return pa.nulls(n, pa.string())
    data = [v.encode() if v is not None else b"" for v in values]
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, data), dtype=np.int64, count=n), out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError(f"a block's texts (metadata, failure reasons) hold {offsets[-1]} bytes; allowed: under 2 GiB")
    offsets = offsets.astype(np.int32)
    valid = None if present.all() else pa.py_buffer(np.packbits(present, bitorder="little"))
    return pa.Array.from_buffers(pa.string(), n, [valid, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))],
                                 null_count=int(n - present.sum()))


def _batch(cols: Columns) -> pa.RecordBatch:
    """n finished trials -> one Arrow record batch (one column per scalar field and matrix column)."""
    arrays, names = [], []
    for name in _SCALARS:
        arrays.append(_arrow(getattr(cols, name)))
        names.append(name)
    for name, prefix in _MATRICES:
        matrix = np.ascontiguousarray(getattr(cols, name), dtype=np.float64)
        width = matrix.shape[1]
        if width:  # one fixed-size list column per matrix: one buffer, not one per matrix column
            arrays.append(pa.FixedSizeListArray.from_arrays(_arrow(matrix.reshape(-1)), width))
            names.append(prefix)
    arrays += [_strings(cols.metadata), _strings(cols.reason)]
    names += ["metadata", "reason"]
    return pa.RecordBatch.from_arrays(arrays, names=names)


def encode_segment(blocks: Columns | Sequence[Columns]) -> pa.Buffer:
    """Finished trials -> one Arrow IPC stream, one record batch per block (the blocks a run loop
    finished, written as they are: no concatenated copy of them). The buffer is what is stored
    (a bytes-like object; no copy into ``bytes`` either)."""
    blocks = [blocks] if isinstance(blocks, Columns) else [b for b in blocks if len(b)]
    sink = pa.BufferOutputStream()
    batches = [_batch(b) for b in blocks]
    with pa.ipc.new_stream(sink, batches[0].schema, options=_IPC_OPTIONS) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return sink.getvalue()


def decode_segments(blobs: Iterable[bytes], dims: tuple[int, int, int, int], n: int | None = None) -> Columns:
    """Arrow IPC streams -> one ``Columns`` (rows in stored order).

    With ``n`` (the total row count, known from the record) the rows are copied straight into
    arrays of their final size, one segment at a time, so ``blobs`` may be a stream: reading a run
    holds its columns and one segment, not every segment, an Arrow table and the columns at once.
    """
    d, m, k, c = dims
    if n is None:
        blobs = list(blobs)
        n = sum(pa.ipc.open_stream(pa.py_buffer(b)).read_all().num_rows for b in blobs)
    out = Columns.empty(d, m, k, c, n=0)
    arrays = {name: np.empty((n, *getattr(out, name).shape[1:]), dtype=getattr(out, name).dtype)
              for name in (*_SCALARS, *(name for name, _ in _MATRICES))}
    metadata: list[str | None] = []
    reason: list[str | None] = []
    at = 0
    for blob in blobs:
        for batch in pa.ipc.open_stream(pa.py_buffer(blob)):
            rows = batch.num_rows
            if at + rows > n:
                raise ValueError(f"the record holds more rows than its segments count ({n}): it is corrupt")
            for name in _SCALARS:
                arrays[name][at:at + rows] = batch.column(name).to_numpy(zero_copy_only=False)
            for name, prefix in _MATRICES:
                width = arrays[name].shape[1]
                if width:
                    flat = batch.column(prefix).flatten().to_numpy(zero_copy_only=False)
                    arrays[name][at:at + rows] = flat.reshape(rows, width)
            for target, name in ((metadata, "metadata"), (reason, "reason")):
                column = batch.column(name)
                target.extend([None] * rows if column.null_count == rows else column.to_pylist())
            at += rows
    if at != n:
        raise ValueError(f"the record's segments hold {at} rows, not the {n} it counts: it is corrupt")
    arrays["stale"] = arrays["stale"].astype(bool)
    return Columns(**arrays, metadata=metadata, reason=reason)


# --- in-flight rows -----------------------------------------------------------------------------
def running_row(cols: Columns, i: int, driver: dict[str, Any] | None) -> str:
    """The in-flight row (JSON) of row ``i`` of ``cols``, run by ``driver``."""
    return running_json(cols.raw[i], int(cols.seed[i]), int(cols.origin[i]), int(cols.requeue_of[i]),
                        float(cols.t_start[i]), driver)


def running_json(raw: np.ndarray, seed: int, origin: int, requeue_of: int, t_start: float,
                 driver: dict[str, Any] | None) -> str:
    """The in-flight row of one trial (JSON; NaN for an inactive parameter, as JSON's ``NaN``)."""
    return json.dumps({"raw": raw.tolist(), "seed": seed, "origin": origin, "requeue_of": requeue_of,
                       "t_start": t_start, "driver": driver})


def running_columns(rows: Sequence[tuple[int, str]], dims: tuple[int, int, int, int]) -> tuple[Columns, list[Any]]:
    """In-flight rows -> (Columns in RUNNING state, the driver of each row)."""
    cols = Columns.empty(*dims, n=len(rows))
    drivers = []
    for i, (number, text) in enumerate(rows):
        row = json.loads(text)
        cols.number[i], cols.seed[i], cols.origin[i] = number, row["seed"], row["origin"]
        cols.requeue_of[i], cols.t_start[i] = row["requeue_of"], row["t_start"]
        cols.raw[i] = np.array(row["raw"], dtype=float)
        drivers.append(row.get("driver"))
    return cols, drivers


# --- the database -------------------------------------------------------------------------------
_ENGINES: dict[str, sa.Engine] = {}
#: Bytes of SQLite write-ahead log between two checkpoints.
WAL_AUTOCHECKPOINT_BYTES = 40 * 2**20
#: The page size of a new SQLite file: a segment is a MB-sized blob, stored in overflow pages,
#: and 16 KB pages write it in a quarter of the pages (and of their headers) of SQLite's 4 KB.
SQLITE_PAGE_SIZE = 16384


def sqlite_pragmas(dbapi_connection: Any, autocheckpoint: bool = True) -> None:
    """Set a new connection's pragmas: WAL mode, ``synchronous=NORMAL``, ``SQLITE_PAGE_SIZE``
    pages (a file not yet written only), and with ``autocheckpoint`` a checkpoint at the commit
    that takes the log past ``WAL_AUTOCHECKPOINT_BYTES`` (else ``Checkpointer``'s, beside)."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA page_size={SQLITE_PAGE_SIZE}")  # ignored once the file has pages
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        page = cursor.execute("PRAGMA page_size").fetchone()[0]
        cursor.execute(f"PRAGMA wal_autocheckpoint={max(1, WAL_AUTOCHECKPOINT_BYTES // page) if autocheckpoint else 0}")
    except Exception:  # locked by another process right now: keep its journal mode
        pass
    finally:
        cursor.close()


class Checkpointer:
    """Checkpoints a SQLite file's write-ahead log in a thread of its own, every
    ``WAL_AUTOCHECKPOINT_BYTES`` written, so no commit waits for one.

    A checkpoint copies the log into the database and waits for the disk (a third of a second
    per 40 MB here); made at a commit, as SQLite's automatic checkpoint is, it stalled the writer
    and, through it, the run loop. A PASSIVE checkpoint runs beside later commits; SQLite's C
    code holds no Python lock meanwhile; a short RESTART one then copies what was committed during
    it and lets the log start again, so it stays near ``WAL_AUTOCHECKPOINT_BYTES``. A process killed
    during one loses nothing: the log stays valid and the next connection completes it.
    """

    def __init__(self, engine: sa.Engine):
        self.engine = engine
        self._since = 0
        self._thread: threading.Thread | None = None

    def wrote(self, nbytes: int) -> None:
        """Count ``nbytes`` committed; start a checkpoint when enough were and none is running."""
        self._since += nbytes
        if self._since >= WAL_AUTOCHECKPOINT_BYTES and (self._thread is None or not self._thread.is_alive()):
            self._since = 0
            self._thread = threading.Thread(target=self._checkpoint, name="qd-wal-checkpoint", daemon=True)
            self._thread.start()

    def join(self) -> None:
        """Wait for the checkpoint in progress, if any."""
        if self._thread is not None:
            self._thread.join()

    def _checkpoint(self) -> None:
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")  # the bulk, beside the writer
                # Then what was committed meanwhile (a few MB), holding the writer back for that long
                # only, so the log starts again from its beginning instead of growing with the run.
                conn.exec_driver_sql("PRAGMA wal_checkpoint(RESTART)")
        except Exception:  # an optimisation only: SQLite checkpoints when its last connection closes
            pass


_CHECKPOINTERS: dict[sa.Engine, Checkpointer] = {}  # SQLite engines of this process


def engine_for(url: str) -> sa.Engine:
    """One engine per database URL in a process, tables created on first use.

    SQLite files run in WAL mode with ``synchronous=NORMAL``: a killed process loses nothing
    committed (only a power cut may lose the last commits, never the file's consistency), and
    readers (``qd show``, the dashboard) never block the driver (``sqlite_pragmas``).
    """
    engine = _ENGINES.get(url)
    if engine is not None:
        return engine
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 60})

        # The record's own writes are checkpointed beside them (``Checkpointer``).
        sa.event.listen(engine, "connect",
                        lambda dbapi_connection, _record: sqlite_pragmas(dbapi_connection, autocheckpoint=False))
        _CHECKPOINTERS[engine] = Checkpointer(engine)
    else:
        engine = sa.create_engine(url, pool_pre_ping=True)
    _create_tables(engine)
    _ENGINES[url] = engine
    return engine


def _create_tables(engine: sa.Engine) -> None:
    # Two drivers starting on an empty database both try to create the tables: the loser's
    # CREATE fails on the winner's table (or its type, on PostgreSQL); once created, all is well.
    for attempt in range(5):
        try:
            _META.create_all(engine, checkfirst=True)
            return
        except sa.exc.DBAPIError:
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))


class Record:
    """Reads and writes one run's rows. ``run_id`` is the run's row in ``qd_runs``."""

    def __init__(self, engine: sa.Engine, run_id: int, dims: tuple[int, int, int, int]):
        self.engine, self.run_id, self.dims = engine, run_id, dims
        self._checkpointer = _CHECKPOINTERS.get(engine)

    # --- runs -------------------------------------------------------------------------------
    @staticmethod
    def find(engine: sa.Engine, name: str) -> tuple[int, dict[str, Any]] | None:
        """Look a run up by name.

        Args:
            engine: The database's engine (``engine_for``).
            name: The run's name.

        Returns:
            ``(run_id, info)`` with the run's recorded info (JSON), or None if there is no such run.
        """
        with engine.connect() as conn:
            row = conn.execute(sa.select(RUNS.c.id, RUNS.c.info).where(RUNS.c.name == name)).first()
        return None if row is None else (int(row[0]), json.loads(row[1]))

    @staticmethod
    def names(engine: sa.Engine) -> list[str]:
        """The names of all runs in the database, oldest first."""
        with engine.connect() as conn:
            return [r[0] for r in conn.execute(sa.select(RUNS.c.name).order_by(RUNS.c.id))]

    @staticmethod
    def insert_run(engine: sa.Engine, name: str, info: dict[str, Any]) -> int | None:
        """Create the run's row.

        Args:
            engine: The database's engine.
            name: The run's name (unique).
            info: The run's info, JSON-serialisable.

        Returns:
            The new run's id, or None when a run of that name exists (another driver may have just
            made it).
        """
        try:
            with engine.begin() as conn:
                result = conn.execute(RUNS.insert().values(name=name, info=json.dumps(info), created=time.time()))
                return int(result.inserted_primary_key[0])
        except sa.exc.IntegrityError:
            return None

    def delete(self) -> None:
        """Delete the run and all its rows (segments, in-flight rows, attributes) in one transaction."""
        with self.engine.begin() as conn:
            for table in (SEGMENTS, RUNNING_ROWS, ATTRS):
                conn.execute(table.delete().where(table.c.run_id == self.run_id))
            conn.execute(RUNS.delete().where(RUNS.c.id == self.run_id))

    # --- the claim --------------------------------------------------------------------------
    def owner(self) -> tuple[str | None, dict[str, Any] | None, float | None]:
        """The claim: ``(token, owner_info, heartbeat time)``, each None when nobody owns the run."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(RUNS.c.owner, RUNS.c.owner_info, RUNS.c.heartbeat)
                               .where(RUNS.c.id == self.run_id)).first()
        return row[0], (json.loads(row[1]) if row[1] else None), row[2]

    def claim(self, token: str, info: dict[str, Any], expected: str | None) -> bool:
        """Compare-and-set the owner from ``expected`` to ``token``, refreshing the heartbeat.

        Args:
            token: The new owner's claim token.
            info: Who the owner is (host, pid, ...), JSON-serialisable.
            expected: The owner this claim replaces (None: the run must be unowned).

        Returns:
            True if this call won the claim; False if the owner was not ``expected``.
        """
        with self.engine.begin() as conn:
            owner = RUNS.c.owner.is_(None) if expected is None else RUNS.c.owner == expected
            result = conn.execute(RUNS.update().where(RUNS.c.id == self.run_id, owner)
                                  .values(owner=token, owner_info=json.dumps(info), heartbeat=time.time()))
            return result.rowcount == 1

    def note_owner(self, token: str, key: str, value: Any) -> None:
        """Add ``key: value`` (JSON) to the owner's info, if ``token`` still holds the claim."""
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(RUNS.c.owner_info).where(RUNS.c.id == self.run_id, RUNS.c.owner == token)).first()
            if row is not None:
                info = {**(json.loads(row[0]) if row[0] else {}), key: value}
                conn.execute(RUNS.update().where(RUNS.c.id == self.run_id, RUNS.c.owner == token)
                             .values(owner_info=json.dumps(info)))

    def release(self, token: str) -> None:
        """Give up the claim, if ``token`` still holds it (otherwise nothing changes)."""
        with self.engine.begin() as conn:
            conn.execute(RUNS.update().where(RUNS.c.id == self.run_id, RUNS.c.owner == token)
                         .values(owner=None, owner_info=None, heartbeat=None))

    # --- writing ----------------------------------------------------------------------------
    def write(self, finished: Columns | Sequence[Columns] | None, started: Sequence[tuple[int, str]] = (),
              ended: Sequence[int] = (), heartbeat_of: str | None = None) -> None:
        """Write in one transaction, which lands whole or not at all.

        Args:
            finished: Finished trials, written as one segment: ``Columns``, or the blocks they
                came in (None or empty: none).
            started: In-flight rows to insert, as ``(number, JSON)`` pairs.
            ended: Numbers of in-flight rows to delete (their trials finished).
            heartbeat_of: Refresh the heartbeat if this token owns the run.

        Raises:
            sqlalchemy.exc.SQLAlchemyError: The database refused the transaction; nothing was written.
        """
        blocks = [] if finished is None else [finished] if isinstance(finished, Columns) else list(finished)
        blocks = [b for b in blocks if len(b)]
        data = memoryview(encode_segment(blocks)) if blocks else None
        with self.engine.begin() as conn:
            if data is not None:
                conn.execute(SEGMENTS.insert().values(run_id=self.run_id, n=sum(len(b) for b in blocks),
                                                      max_number=max(int(b.number.max()) for b in blocks), data=data))
            if ended:
                ended = [int(x) for x in ended]
                for i in range(0, len(ended), 500):
                    conn.execute(RUNNING_ROWS.delete().where(RUNNING_ROWS.c.run_id == self.run_id,
                                                             RUNNING_ROWS.c.number.in_(ended[i:i + 500])))
            if started:
                conn.execute(RUNNING_ROWS.insert(), [{"run_id": self.run_id, "number": int(k), "data": d}
                                                     for k, d in started])
            if heartbeat_of is not None:
                conn.execute(RUNS.update().where(RUNS.c.id == self.run_id, RUNS.c.owner == heartbeat_of)
                             .values(heartbeat=time.time()))
        if self._checkpointer is not None:
            self._checkpointer.wrote(0 if data is None else data.nbytes)

    def set_attr(self, key: str, value: Any) -> None:
        """Store ``value`` (JSON; numpy scalars as numbers, other objects as strings) under ``key``,
        replacing any previous value."""
        text = json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o))
        with self.engine.begin() as conn:
            conn.execute(ATTRS.delete().where(ATTRS.c.run_id == self.run_id, ATTRS.c.key == key))
            conn.execute(ATTRS.insert().values(run_id=self.run_id, key=key, value=text))

    # --- reading ----------------------------------------------------------------------------
    def attrs(self) -> dict[str, Any]:
        """The run-level data stored with ``set_attr``, by key."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(ATTRS.c.key, ATTRS.c.value).where(ATTRS.c.run_id == self.run_id))
            return {k: json.loads(v) for k, v in rows}

    def read(self) -> tuple[Columns, list[Any]]:
        """Read the whole run (segments streamed, a few at a time).

        Returns:
            ``(columns, drivers)``: every trial in number order, in-flight ones included, as
            ``Columns`` of n rows; and a list of n drivers (None for finished rows).

        Raises:
            ValueError: The segments do not hold the rows the record counts (a corrupt record).
        """
        with self.engine.connect() as conn:
            # The count and the last segment in one statement: the owner may append segments while
            # a view reads (each statement sees its own snapshot), and segments are append-only,
            # so reading up to that segment gives exactly the rows counted.
            n, last = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(SEGMENTS.c.n), 0),
                                             sa.func.coalesce(sa.func.max(SEGMENTS.c.id), -1))
                                   .where(SEGMENTS.c.run_id == self.run_id)).one()
            # Streamed, a few segments at a time (a server-side cursor on PostgreSQL).
            result = conn.execution_options(stream_results=True, yield_per=8).execute(
                sa.select(SEGMENTS.c.data).where(SEGMENTS.c.run_id == self.run_id, SEGMENTS.c.id <= last)
                .order_by(SEGMENTS.c.id))
            done = decode_segments((r[0] for r in result), self.dims, n=int(n))
            rows = [(int(n), d) for n, d in conn.execute(
                sa.select(RUNNING_ROWS.c.number, RUNNING_ROWS.c.data).where(RUNNING_ROWS.c.run_id == self.run_id))]
        drivers: list[Any] = [None] * len(done)
        if rows:
            running, running_drivers = running_columns(rows, self.dims)
            # A row both finished and in flight cannot be written (one transaction does both); be safe anyway.
            keep = ~np.isin(running.number, done.number)
            running = running.select(keep)
            done = Columns.concat([done, running], like=done)
            drivers += [dr for dr, k in zip(running_drivers, keep) if k]
        if len(done) > 1 and not bool(np.all(done.number[1:] > done.number[:-1])):
            order = np.argsort(done.number, kind="stable")
            done, drivers = done.select(order), [drivers[i] for i in order]
        return done, drivers

    def running_drivers(self) -> list[Any]:
        """The driver of each in-flight row (what a claim checks is not alive)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(RUNNING_ROWS.c.data).where(RUNNING_ROWS.c.run_id == self.run_id))
            return [json.loads(text).get("driver") for (text,) in rows]

    def max_number(self) -> int:
        """The largest trial number recorded (finished or in flight), or -1."""
        with self.engine.connect() as conn:
            a = conn.execute(sa.select(sa.func.max(SEGMENTS.c.max_number)).where(SEGMENTS.c.run_id == self.run_id)).scalar()
            b = conn.execute(sa.select(sa.func.max(RUNNING_ROWS.c.number))
                             .where(RUNNING_ROWS.c.run_id == self.run_id)).scalar()
        return max(-1 if a is None else int(a), -1 if b is None else int(b))
