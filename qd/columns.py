"""A run's trials as columns: what the record stores and every view reads.

One ``Columns`` holds n trials as numpy arrays (and two lists for the rare text fields), so a
run of 10^6 evaluations is a few arrays in memory, not 10^6 Python objects. ``Trial`` objects
are built from it only on request (``trials()``), for the code that wants one trial at a time.

Conventions (one meaning each, used everywhere):

- ``raw`` (n, d): configurations in ``Space.to_raw`` form (exact; NaN for inactive parameters).
- ``state`` (n,): ``RUNNING``, ``COMPLETE`` or ``FAILED``; ``stale`` (n,) marks failed trials
  whose driver stopped while they ran (they do not count towards the budget).
- ``values`` (n, m), ``measures`` (n, k), ``constraints`` (n, c): NaN where not complete.
- ``origin`` (n,): ``ORIGIN_STRATEGY``, ``ORIGIN_REQUEUE`` or ``ORIGIN_FALLBACK`` (a quasi-random
  point given when a proposal ran past its time limit, ``qd.background``); ``requeue_of`` (n,): the stale
  trial a re-queued one evaluates again, or -1.
- ``cell`` (n,): the trial's cell in the run's archive, or -1 (not inserted: failed, infeasible).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

RUNNING, COMPLETE, FAILED = 0, 1, 2
STATE_NAMES = {RUNNING: "running", COMPLETE: "complete", FAILED: "failed"}
STATE_CODES = {v: k for k, v in STATE_NAMES.items()}
ORIGIN_STRATEGY, ORIGIN_REQUEUE, ORIGIN_FALLBACK = 0, 1, 2
ORIGIN_NAMES = {ORIGIN_STRATEGY: "strategy", ORIGIN_REQUEUE: "requeue", ORIGIN_FALLBACK: "fallback"}
ORIGIN_CODES = {v: k for k, v in ORIGIN_NAMES.items()}

_ARRAYS = ("number", "state", "stale", "origin", "seed", "requeue_of", "t_start", "t_end", "cell",
           "raw", "values", "measures", "constraints")
_DTYPES = {"number": np.int64, "state": np.int8, "stale": np.bool_, "origin": np.int8, "seed": np.int64,
           "requeue_of": np.int64, "t_start": np.float64, "t_end": np.float64, "cell": np.int64,
           "raw": np.float64, "values": np.float64, "measures": np.float64, "constraints": np.float64}


@dataclass
class Columns:
    """n trials as arrays; see the module docstring for each field's meaning and shape."""

    number: np.ndarray
    state: np.ndarray
    stale: np.ndarray
    origin: np.ndarray
    seed: np.ndarray
    requeue_of: np.ndarray
    t_start: np.ndarray
    t_end: np.ndarray
    cell: np.ndarray
    raw: np.ndarray
    values: np.ndarray
    measures: np.ndarray
    constraints: np.ndarray
    #: n entries: None or a JSON text (a trial's metadata dict).
    metadata: list[str | None] = field(default_factory=list)
    #: n entries: None or the reason a trial failed.
    reason: list[str | None] = field(default_factory=list)

    # --- building ---------------------------------------------------------------------------
    @classmethod
    def empty(cls, d: int, m: int, k: int, c: int, n: int = 0) -> Columns:
        """n blank rows (RUNNING, NaN numbers) for a space of d parameters, m objectives, k
        measures and c constraints."""
        shapes = {"raw": (n, d), "values": (n, m), "measures": (n, k), "constraints": (n, c)}
        arrays = {}
        for name in _ARRAYS:
            fill = np.nan if _DTYPES[name] is np.float64 else (-1 if name in ("requeue_of", "cell") else 0)
            arrays[name] = np.full(shapes.get(name, (n,)), fill, dtype=_DTYPES[name])
        return cls(**arrays, metadata=[None] * n, reason=[None] * n)

    @classmethod
    def row_like(cls, template: Columns) -> Columns:
        """One blank row shaped as ``template`` (a blank one-row ``Columns``, kept by the caller):
        copies of its arrays, cheaper than ``empty`` for a trial at a time."""
        return cls(**{name: getattr(template, name).copy() for name in _ARRAYS}, metadata=[None], reason=[None])

    @classmethod
    def concat(cls, parts: Sequence[Columns], like: Columns | None = None) -> Columns:
        """One ``Columns`` of all rows of ``parts`` in order (``like`` gives the shapes when empty)."""
        parts = [p for p in parts if len(p)]
        if not parts:
            if like is None:
                raise ValueError("Columns.concat needs at least one part or `like`")
            return like.select(np.zeros(len(like), dtype=bool))
        if len(parts) == 1:
            return parts[0]
        arrays = {name: np.concatenate([getattr(p, name) for p in parts]) for name in _ARRAYS}
        return cls(**arrays, metadata=[x for p in parts for x in p.metadata],
                   reason=[x for p in parts for x in p.reason])

    def select(self, index: np.ndarray) -> Columns:
        """The rows picked by a boolean mask or an integer index array."""
        index = np.asarray(index)
        arrays = {name: getattr(self, name)[index] for name in _ARRAYS}
        rows = np.flatnonzero(index) if index.dtype == bool else index
        return Columns(**arrays, metadata=[self.metadata[i] for i in rows], reason=[self.reason[i] for i in rows])

    def rows(self, start: int, stop: int) -> Columns:
        """Rows ``start:stop`` with their arrays as views (written through to these columns); the
        two text lists are copies."""
        return Columns(**{name: getattr(self, name)[start:stop] for name in _ARRAYS},
                       metadata=self.metadata[start:stop], reason=self.reason[start:stop])

    def sorted(self) -> Columns:
        """The rows in trial-number order."""
        order = np.argsort(self.number, kind="stable")
        return self if np.all(order == np.arange(len(order))) else self.select(order)

    def __len__(self) -> int:
        return int(self.number.shape[0])

    @property
    def dims(self) -> tuple[int, int, int, int]:
        """(d, m, k, c): parameters, objectives, measures, constraints."""
        return (self.raw.shape[1], self.values.shape[1], self.measures.shape[1], self.constraints.shape[1])

    # --- masks ------------------------------------------------------------------------------
    @property
    def complete(self) -> np.ndarray:
        """(n,) state is COMPLETE."""
        return self.state == COMPLETE

    @property
    def finished(self) -> np.ndarray:
        """(n,) counts towards the budget: complete, or failed by its own evaluation (not stale)."""
        return (self.state == COMPLETE) | ((self.state == FAILED) & ~self.stale)

    @property
    def feasible(self) -> np.ndarray:
        """(n,) complete with every constraint <= 0."""
        ok = self.complete
        if self.constraints.shape[1]:
            ok = ok & np.all(self.constraints <= 0, axis=1)
        return ok

    def counts(self) -> dict[str, int]:
        """Number of rows by kind.

        Returns:
            ``{"n_complete", "n_failed" (not stale), "n_stale", "n_running"}`` as ints.
        """
        stale = int(self.stale.sum())
        return {"n_complete": int(self.complete.sum()),
                "n_failed": int(((self.state == FAILED) & ~self.stale).sum()),
                "n_stale": stale, "n_running": int((self.state == RUNNING).sum())}

    # --- metadata ---------------------------------------------------------------------------
    def metadata_of(self, i: int) -> dict[str, Any]:
        """Row ``i``'s metadata, decoded from JSON ({} when it has none)."""
        text = self.metadata[i]
        return json.loads(text) if text else {}

    def equals(self, other: Columns) -> bool:
        """Same rows, numbers and texts (NaN equal to NaN)."""
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray):
                if a.shape != b.shape or not np.array_equal(a, b, equal_nan=a.dtype.kind == "f"):
                    return False
            elif a != b:
                return False
        return True


class ColumnsBuilder:
    """Rows appended batch by batch into arrays that grow by doubling (``capacity`` rows to start),
    so a run's columns are held once: ``view()`` is a ``Columns`` over the rows so far, without
    the copy a concatenation of every batch would make (10^6 rows are a few hundred MB)."""

    def __init__(self, like: Columns, capacity: int = 0):
        self._arrays = {name: np.empty((max(int(capacity), 16), *getattr(like, name).shape[1:]),
                                       dtype=getattr(like, name).dtype) for name in _ARRAYS}
        self._metadata: list[str | None] = []
        self._reason: list[str | None] = []
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def _room(self, end: int) -> None:
        capacity = len(self._arrays["number"])
        if end > capacity:
            capacity = max(end, 2 * capacity)
            for name, a in self._arrays.items():
                grown = np.empty((capacity, *a.shape[1:]), dtype=a.dtype)
                grown[:self.n] = a[:self.n]
                self._arrays[name] = grown

    def reserve(self, n: int, written: Sequence[str] = ()) -> Columns:
        """n blank rows (as ``Columns.empty``) after the last one, to fill in place and then
        ``append`` (which then copies nothing). Only the last reserved block may be appended.

        Args:
            n: Rows.
            written: Arrays the caller writes in full before ``append``: left unset, since
                blanking them would be a pass over memory for nothing (``raw`` is most of a row).
        """
        end = self.n + n
        self._room(end)
        arrays = {}
        for name, a in self._arrays.items():
            view = a[self.n:end]
            if name not in written:
                view.fill(np.nan if view.dtype.kind == "f" else (-1 if name in ("requeue_of", "cell") else 0))
            arrays[name] = view
        self._reserved = Columns(**arrays, metadata=[None] * n, reason=[None] * n)
        return self._reserved

    def trim(self, n: int) -> Columns:
        """Keep the first ``n`` rows of the block ``reserve`` returned last (a batch that ended
        early) and return them, to ``append`` as the reserved block."""
        self._reserved = self._reserved.rows(0, n)
        return self._reserved

    def append(self, cols: Columns) -> None:
        """Add the rows of ``cols`` (same dims as ``like``) after the last ones.

        Args:
            cols: The rows; the block ``reserve`` returned last is taken without a copy.
        """
        end = self.n + len(cols)
        if cols is not getattr(self, "_reserved", None):
            self._room(end)
            for name, a in self._arrays.items():
                a[self.n:end] = getattr(cols, name)
        self._reserved = None
        self._metadata.extend(cols.metadata)
        self._reason.extend(cols.reason)
        self.n = end

    def view(self) -> Columns:
        """The rows appended so far (arrays are views: valid after later appends too)."""
        return Columns(**{name: a[:self.n] for name, a in self._arrays.items()},
                       metadata=self._metadata[:self.n], reason=self._reason[:self.n])


def dumps_metadata(metadata: dict[str, Any] | None) -> str | None:
    """A metadata dict as compact JSON (numpy scalars as numbers), or None when empty."""
    if not metadata:
        return None
    return json.dumps(metadata, separators=(",", ":"), default=lambda o: o.item() if hasattr(o, "item") else str(o))
