"""Copies a run's finished trials from the record into its Optuna study, for optuna-dashboard.

The record (``qd.store``) is the source of truth; the study is a view, kept small enough for a
browser: every finished trial of a run up to ``MIRROR_ALL`` trials, in number order (so the
dashboard's trial numbers are qd's), then only trials the caller features (the archive's elites,
the Pareto set) up to ``MIRROR_CAP`` in all; fewer, and a shorter prefix, where that many would
make the dashboard's study page heavier than ``MIRROR_PAGE_BYTES`` (spaces of many parameters:
a 20-parameter trial is about 5.7 KB there). Each mirrored trial carries qd's number
(``qd_number``), its measures, cell and per-measure bins, and ``is_elite`` as it was when it was
copied. Trials are copied in batches within a time budget, so a publish never stalls the run
loop for long; what is left waits for the next one. On an RDB storage a batch is one transaction
of bulk inserts into Optuna's own tables (``add_trials``: Optuna's ``Study.add_trials`` checks
each parameter with its own queries, about 37 ms for a 20-parameter trial); elsewhere (journal)
it is ``Study.add_trials``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from qd.columns import COMPLETE, ORIGIN_NAMES, Columns
from qd.problem import Problem

MIRROR_ALL = 200
MIRROR_CAP = 600
#: What the mirrored trials may weigh on the dashboard's study page (its JSON), in all: a trial of
#: a 20-parameter space is about 5.7 KB there, so such a run shows fewer than ``MIRROR_CAP``.
MIRROR_PAGE_BYTES = 1_500_000
_KEY = "qd_mirrored"  # study system attr: the qd numbers copied so far, in the order copied


class Mirror:
    """Keeps one run's Optuna study in step with its record."""

    def __init__(self, store: Any, problem: Problem, all_up_to: int = MIRROR_ALL, cap: int = MIRROR_CAP):
        self.store, self.problem = store, problem
        self.all_up_to, self.cap = int(all_up_to), int(cap)
        self._done: list[int] | None = None
        #: Trials the last ``sync`` left to copy (its time budget ran out first).
        self.left = 0
        self._page_fitted = False

    def mirrored(self) -> set[int]:
        """The qd numbers copied so far."""
        return set(self._copied())

    def pages(self) -> dict[int, int]:
        """qd number -> the study's trial number (its page in optuna-dashboard), for copied trials.
        The mirror is the study's only writer and copies in order, so the i-th copied is trial i."""
        return {n: i for i, n in enumerate(self._copied())}

    def _copied(self) -> list[int]:
        if self._done is None:
            study = self.store.study
            self._done = list(study._storage.get_study_system_attrs(study._study_id).get(_KEY, []))
        return self._done

    def pending(self, cols: Columns, featured: Iterable[int] = ()) -> list[int]:
        """Row indices of ``cols`` (number order) still to copy: the finished prefix of the run up to
        ``all_up_to``, then the ``featured`` numbers, within ``cap``."""
        done = self.mirrored()
        finished = cols.state != 0
        # The first finished trials by number (one finishing late joins when it finishes).
        prefix = np.flatnonzero(finished)[: self.all_up_to]
        stop = int(prefix[-1]) + 1 if len(prefix) else 0
        rows = [i for i in prefix.tolist() if int(cols.number[i]) not in done]
        room = self.cap - len(done) - len(rows)
        if room > 0 and len(featured):
            # Rows of the featured numbers by binary search (cols is in number order): no map of
            # every row, which at 10^6 trials costs a second and a hundred MB.
            wanted = np.array(sorted({int(n) for n in featured} - done), dtype=np.int64)
            at = np.searchsorted(cols.number, wanted)
            inside = at < len(cols)
            at = at[inside][cols.number[at[inside]] == wanted[inside]]
            extra = at[(at >= stop) & finished[at]] if len(at) else at
            rows += np.unique(extra).tolist()[:room]
        return rows[: max(0, self.cap - len(done))]

    def sync(self, cols: Columns, featured: Sequence[int] = (), elites: set[int] | None = None,
             cell_bins: dict[int, list[int]] | None = None, time_budget_s: float | None = 2.0) -> int:
        """Copy what ``pending`` names; returns how many trials were copied.

        Args:
            cols: the run's trials (``Store.columns()``), number order.
            featured: qd numbers worth showing beyond the prefix (elites, Pareto set).
            elites: qd numbers that are elites now (``is_elite``).
            cell_bins: cell -> per-measure bin indices, for the ``bins`` attribute.
            time_budget_s: stop copying after about this long (None: copy everything pending).
        """
        cols = cols.sorted()
        self._fit_page(cols)
        rows = self.pending(cols, featured)
        self.left = len(rows)
        if not rows:
            return 0
        study = self.store.study
        t0 = time.monotonic()
        copied: list[int] = []
        size, start = 50 if time_budget_s is None else 1, 0
        while start < len(rows):
            batch = rows[start:start + size]
            add_trials(study, [self._frozen(cols, i, elites, cell_bins) for i in batch])
            copied += [int(cols.number[i]) for i in batch]
            start += len(batch)
            if time_budget_s is not None:
                # Size the next batch to what is left of the budget at the rate measured so far.
                spent = time.monotonic() - t0
                if spent >= time_budget_s:
                    break
                size = int(max(1, min(500, (time_budget_s - spent) / max(spent / len(copied), 1e-6))))
        self._done = self._copied() + copied
        study._storage.set_study_system_attr(study._study_id, _KEY, self._done)
        self.left = len(rows) - len(copied)
        return len(copied)

    def _fit_page(self, cols: Columns) -> None:
        """Lower ``cap`` so the mirrored trials stay within ``MIRROR_PAGE_BYTES`` of the study page
        (one trial measured as optuna-dashboard serialises it), and the first-trials prefix to a
        third of it: in a big run the elites are what is worth showing."""
        if self._page_fitted:
            return
        done = np.flatnonzero(cols.state == COMPLETE)
        if not len(done):
            return
        self._page_fitted = True
        size = page_bytes(self._frozen(cols, int(done[0]), set(), {})) + 300  # measures, bins
        fit = max(1, MIRROR_PAGE_BYTES // size)
        if fit < self.cap:
            self.cap = int(fit)
            self.all_up_to = min(self.all_up_to, max(1, self.cap // 3))

    def _frozen(self, cols: Columns, i: int, elites: set[int] | None,
                cell_bins: dict[int, list[int]] | None) -> optuna.trial.FrozenTrial:
        space = self.problem.space
        config = space.from_raw(cols.raw[i:i + 1])[0]
        number = int(cols.number[i])
        attrs: dict[str, Any] = {"qd_number": number, "seed": int(cols.seed[i])}
        if cols.origin[i]:
            attrs["origin"] = ORIGIN_NAMES[int(cols.origin[i])]
        if cols.requeue_of[i] >= 0:
            attrs["requeue_of"] = int(cols.requeue_of[i])
        system: dict[str, Any] = {}
        state = int(cols.state[i])
        values = None
        if state == COMPLETE:
            values = cols.values[i].tolist()
            if self.problem.measures:
                attrs["measures"] = dict(zip(self.problem.measure_names, cols.measures[i].tolist()))
            if cols.constraints.shape[1]:
                attrs["constraints"] = system["constraints"] = cols.constraints[i].tolist()
            cell = int(cols.cell[i])
            if cell >= 0:
                attrs["cell"] = cell
                if cell_bins is not None and cell in cell_bins:
                    attrs["bins"] = cell_bins[cell]
                if elites is not None:
                    attrs["is_elite"] = number in elites
        else:
            attrs["fail_reason"] = (cols.reason[i] or "")[-2000:]
            if cols.stale[i]:
                attrs["stale"] = True
        meta = cols.metadata_of(i)
        if meta:
            attrs["metadata"] = {k: v for k, v in meta.items() if not isinstance(v, (dict, list))}
        t_start, t_end = cols.t_start[i], cols.t_end[i]
        trial = optuna.trial.create_trial(
            state=TrialState.COMPLETE if state == COMPLETE else TrialState.FAIL, values=values, params=config,
            distributions=space.active_distributions(config), user_attrs=attrs, system_attrs=system)
        if t_start == t_start and t_end == t_end:
            import datetime as _dt

            trial.datetime_start = _dt.datetime.fromtimestamp(float(t_start))
            trial.datetime_complete = _dt.datetime.fromtimestamp(float(max(t_end, t_start)))
        return trial


__all__ = ["Mirror", "MIRROR_ALL", "MIRROR_CAP", "add_trials", "rdb_backend"]


def rdb_backend(storage: Any) -> Any:
    """The ``RDBStorage`` behind an Optuna storage (Optuna's ``_CachedStorage`` wraps one), or None
    for any other storage (journal, in-memory): where qd may write Optuna's tables in bulk."""
    from optuna.storages import RDBStorage

    backend = getattr(storage, "_backend", storage)
    return backend if isinstance(backend, RDBStorage) else None


def add_trials(study: optuna.Study, trials: Sequence[optuna.trial.FrozenTrial]) -> None:
    """Add finished ``trials`` to ``study``, numbered after its last one, as ``Study.add_trials``
    does (same rows, same numbers).

    On an RDB storage: one transaction that locks the study row (as Optuna's trial creation does,
    so concurrent writers number correctly), checks each parameter's distribution once against
    a record of it in the study, and inserts the trials and their values, parameters and
    attributes in bulk. Elsewhere: ``Study.add_trials``.

    Args:
        study: The study to write into.
        trials: Finished trials (``optuna.trial.create_trial``), in the order they get numbers.
    """
    backend = rdb_backend(study._storage)
    if backend is None:
        study.add_trials(trials)
        return
    if not trials:
        return
    from optuna import distributions as dists
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from sqlalchemy import func, insert

    m = len(study.directions)
    for t in trials:  # what Study.add_trial checks first
        t._validate()
        if t.values is not None and len(t.values) != m:
            raise ValueError(f"a mirrored trial has {len(t.values)} values; the study has {m} objectives")
    study_id = study._study_id
    with _create_scoped_session(backend.scoped_session, True) as session:
        models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
        # Distributions must agree with what the study holds (Optuna checks one per parameter write):
        names = sorted({name for t in trials for name in t.params})
        # Any one record per name will do: every record was checked against the others when written.
        param = models.TrialParamModel
        known = dict(session.query(param.param_name, func.min(param.distribution_json))
                     .join(models.TrialModel).filter(models.TrialModel.study_id == study_id, param.param_name.in_(names))
                     .group_by(param.param_name).all()) if names else {}
        parsed = {name: dists.json_to_distribution(text) for name, text in known.items()}
        as_json: dict[tuple[str, Any], str] = {}  # (name, distribution) -> its JSON, checked once
        for t in trials:
            for name, dist in t.distributions.items():
                if (name, dist) not in as_json:
                    if name in parsed:
                        dists.check_distribution_compatibility(parsed[name], dist)
                    as_json[name, dist] = dists.distribution_to_json(dist)
        first = session.query(func.count(models.TrialModel.trial_id)).filter(
            models.TrialModel.study_id == study_id).scalar()
        # Optuna stores naive UTC times (``TrialModel.datetime_start``'s setter).
        utc = [{"study_id": study_id, "number": first + k, "state": t.state,
                "datetime_start": _naive_utc(t.datetime_start), "datetime_complete": _naive_utc(t.datetime_complete)}
               for k, t in enumerate(trials)]
        table = models.TrialModel.__table__  # Core inserts: column names, no ORM bookkeeping
        ids = session.execute(insert(table).returning(table.c.trial_id, sort_by_parameter_order=True),
                              utc).scalars().all()
        values, params, user, system, steps = [], [], [], [], []  # rows for executemany inserts
        for tid, t in zip(ids, trials):
            for objective, value in enumerate(t.values or ()):
                stored, kind = models.TrialValueModel.value_to_stored_repr(value)
                values.append({"trial_id": tid, "objective": objective, "value": stored, "value_type": kind})
            for name, value in t.params.items():
                dist = t.distributions[name]
                params.append({"trial_id": tid, "param_name": name, "param_value": dist.to_internal_repr(value),
                               "distribution_json": as_json[name, dist]})
            user += [{"trial_id": tid, "key": k, "value_json": json.dumps(v)} for k, v in t.user_attrs.items()]
            system += [{"trial_id": tid, "key": k, "value_json": json.dumps(v)} for k, v in t.system_attrs.items()]
            for step, value in t.intermediate_values.items():
                stored, kind = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(value)
                steps.append({"trial_id": tid, "step": step, "intermediate_value": stored,
                              "intermediate_value_type": kind})
        for model, batch in ((models.TrialValueModel, values), (models.TrialParamModel, params),
                             (models.TrialUserAttributeModel, user), (models.TrialSystemAttributeModel, system),
                             (models.TrialIntermediateValueModel, steps)):
            if batch:
                session.execute(insert(model.__table__), batch)


def page_bytes(trial: optuna.trial.FrozenTrial) -> int:
    """About what ``trial`` weighs on optuna-dashboard's study page: its JSON as the dashboard's
    serialiser shapes it (a parameter: name, internal and external value, Python type, distribution;
    attributes as strings). Written out here so a run need not import optuna-dashboard."""
    params = [{"name": name, "param_internal_value": trial.distributions[name].to_internal_repr(value),
               "param_external_value": str(value), "param_external_pytyp": str(type(value)),
               "distribution": {"type": type(trial.distributions[name]).__name__,
                                **vars(trial.distributions[name])}}
              for name, value in trial.params.items() if name in trial.distributions]
    attrs = [{"key": k, "value": v if isinstance(v, str) else json.dumps(v)} for k, v in trial.user_attrs.items()]
    page = {"trial_id": trial._trial_id, "study_id": 0, "number": trial.number, "state": trial.state.name,
            "params": params, "fixed_params": [], "user_attrs": attrs, "note": {"version": 0, "body": ""},
            "artifacts": [], "constraints": [], "intermediate_values": [], "values": trial.values,
            "datetime_start": "2026-01-01T00:00:00.000000", "datetime_complete": "2026-01-01T00:00:00.000000"}
    return len(json.dumps(page, default=str))


def _naive_utc(when: Any) -> Any:
    """A naive local time as Optuna's RDB storage keeps it: naive UTC."""
    import datetime as _dt

    return None if when is None else when.astimezone(_dt.timezone.utc).replace(tzinfo=None)
