"""The record of a run: one Optuna study, one Optuna trial per evaluation.

The store is the single source of truth. Strategies, archives and metrics are rebuilt from it on
resume, by ``qd show`` and by ``qd plot``; nothing else is persisted. Any Optuna storage URL works
(``sqlite:///run.db`` by default, ``postgresql://...`` for a shared server), so every run is
also visible in optuna-dashboard.

Layout inside the study:

- study user attr ``qd``: the run's identity (problem and options, strategy and options, seed).
- trial params: the active parameters of the configuration, with Optuna distributions.
- trial values: objective values in declared order (Optuna directions match the objectives).
- trial user attrs: ``measures`` ({name: value}), ``constraints`` (list, feasible when <= 0),
  ``metadata`` (dict), ``fail_reason`` (str), ``origin`` ("strategy" or "requeue"), ``seed``,
  ``stale`` (True for a trial whose driver died while it was running), ``driver`` (host, pid and
  process start time of the driver that started it), ``requeue_of`` (for a re-queued trial, the
  number of the stale trial it evaluates again).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from qd.problem import Problem
from qd.space import Config
from qd.storage_url import RunNotFound, check_run_name, check_storage, mask  # noqa: F401 (RunNotFound: re-exported)

optuna.logging.set_verbosity(optuna.logging.WARNING)

State = Literal["running", "complete", "failed"]
_STATE = {TrialState.RUNNING: "running", TrialState.COMPLETE: "complete", TrialState.FAIL: "failed",
          TrialState.WAITING: "running", TrialState.PRUNED: "failed"}
# Optuna's own key for constraint values; NSGA-II and the dashboard read it.
_OPTUNA_CONSTRAINTS_KEY = "constraints"


def optuna_storage(storage: str) -> str | optuna.storages.RDBStorage:
    """What to hand to Optuna for a storage URL.

    SQLite files are opened in WAL mode with ``synchronous=NORMAL``: with the default rollback
    journal every commit waits for an fsync (about 7 ms here, five commits per evaluation, on the
    run loop's critical path), and a reader (``qd show``, the dashboard, another run's driver)
    blocks writers. In WAL mode a killed process loses nothing committed; only a power cut may
    lose the last commits, never the file's consistency.
    """
    url = resolve_storage(storage)
    if not url.startswith("sqlite:///") or url in ("sqlite:///", "sqlite:///:memory:"):
        return url
    import sqlite3

    from sqlalchemy import event

    rdb = optuna.storages.RDBStorage(url)

    def tune(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")  # persistent in the file; a no-op once set
            cursor.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.OperationalError:  # locked by another process right now: keep its journal mode
            pass
        finally:
            cursor.close()

    event.listen(rdb.engine, "connect", tune)
    rdb.engine.dispose()  # the connections made while creating the tables lack the pragmas
    return rdb


def resolve_storage(storage: str) -> str:
    """The URL to hand to Optuna: a plain ``postgresql://`` names the psycopg2 driver when psycopg 3 is absent.

    SQLAlchemy 2.1 maps ``postgresql://`` to psycopg 3, but the driver this project depends on is
    psycopg2, so the plain URL, as people write it, failed with "No module named 'psycopg'".
    """
    if storage.startswith("postgresql://"):
        import importlib.util

        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
            return "postgresql+psycopg2://" + storage[len("postgresql://"):]
    return storage


@dataclass
class Trial:
    """One evaluation as recorded."""

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
    _id: int = -1

    @property
    def feasible(self) -> bool:
        return self.state == "complete" and all(c <= 0 for c in (self.constraints or []))

    @property
    def finished(self) -> bool:
        """Counts towards the budget: complete, or failed by its own evaluation (not stale)."""
        return self.state == "complete" or (self.state == "failed" and not self.stale)


@dataclass(frozen=True)
class RunInfo:
    name: str
    problem: str
    problem_options: dict[str, Any]
    strategy: str
    strategy_options: dict[str, Any]
    seed: int

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "name"}


class Store:
    """Read and write one run. Build with ``Store.create`` or ``Store.open``."""

    def __init__(self, study: optuna.Study, info: RunInfo, measure_names: Sequence[str]):
        self.study = study
        self.info = info
        self.measure_names = list(measure_names)
        self._storage = study._storage
        self._study_id = study._study_id

    # --- opening ----------------------------------------------------------------------------
    @classmethod
    def create(cls, storage: str, info: RunInfo, problem: Problem, *, resume: bool = False) -> Store:
        """Create the run's study; with ``resume`` open an existing one (which must match)."""
        check_storage(storage, create=True)
        check_run_name(info.name)
        try:
            existing = cls.open(storage, info.name)
        except RunNotFound:
            existing = None
        if existing is not None:
            if not resume:
                raise ValueError(
                    f"run {info.name!r} already exists in {mask(storage)}; pass --resume to continue it, "
                    f"or choose another --name"
                )
            if (existing.info.problem, existing.info.problem_options) != (info.problem, info.problem_options):
                raise ValueError(
                    f"run {info.name!r} was made with problem {existing.info.problem!r} "
                    f"{existing.info.problem_options}, not {info.problem!r} {info.problem_options}"
                )
            if existing.info.strategy != info.strategy:
                raise ValueError(
                    f"run {info.name!r} was made with strategy {existing.info.strategy!r}, not {info.strategy!r}"
                )
            return existing
        study = optuna.create_study(storage=optuna_storage(storage), study_name=info.name,
                                    directions=problem.directions)
        with warnings.catch_warnings():  # marked experimental in Optuna; the dashboard reads it
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(problem.objective_names)
        study.set_user_attr("qd", info.to_json())
        study.set_user_attr("measure_names", problem.measure_names)
        return cls(study, info, problem.measure_names)

    @classmethod
    def open(cls, storage: str, name: str) -> Store:
        check_storage(storage, create=False)
        try:
            study = optuna.load_study(study_name=name, storage=optuna_storage(storage))
        except KeyError:
            names = [s.study_name for s in optuna.get_all_study_summaries(optuna_storage(storage))]
            raise RunNotFound(f"no run named {name!r} in {mask(storage)}; runs there: {names}") from None
        attrs = study.user_attrs
        if "qd" not in attrs:
            raise RunNotFound(f"study {name!r} in {mask(storage)} was not made by qd (no 'qd' user attribute)")
        info = RunInfo(name=name, **attrs["qd"])
        return cls(study, info, attrs.get("measure_names", []))

    @staticmethod
    def run_names(storage: str) -> list[str]:
        check_storage(storage, create=False)
        return [s.study_name for s in optuna.get_all_study_summaries(optuna_storage(storage))]

    # --- writing ----------------------------------------------------------------------------
    def start(self, params: Config, distributions: dict, *, origin: str = "strategy", seed: int = 0,
              driver: dict[str, Any] | None = None, requeue_of: int | None = None) -> Trial:
        """Record a RUNNING trial for a configuration about to be evaluated.

        ``driver`` and ``requeue_of`` are written in the same insert as the trial, so a driver killed
        at any moment leaves either no trial or a trial that says who ran it and what it re-runs.
        """
        user_attrs: dict[str, Any] = {"origin": origin, "seed": seed}
        if driver is not None:
            user_attrs["driver"] = driver
        if requeue_of is not None:
            user_attrs["requeue_of"] = requeue_of
        template = optuna.trial.create_trial(
            state=TrialState.RUNNING, params=params, distributions=distributions, user_attrs=user_attrs,
        )
        trial_id = self._storage.create_new_trial(self._study_id, template_trial=template)
        number = self._storage.get_trial_number_from_id(trial_id)
        return Trial(number=number, params=dict(params), state="running", origin=origin, seed=seed, driver=driver,
                     requeue_of=requeue_of, _id=trial_id)

    def complete(self, trial: Trial, values: Sequence[float], measures: Sequence[float] = (),
                 constraints: Sequence[float] = (), metadata: dict[str, Any] | None = None) -> Trial:
        s, tid = self._storage, trial._id
        if measures:
            s.set_trial_user_attr(tid, "measures", dict(zip(self.measure_names, map(float, measures))))
        if constraints:
            s.set_trial_user_attr(tid, "constraints", [float(c) for c in constraints])
            s.set_trial_system_attr(tid, _OPTUNA_CONSTRAINTS_KEY, [float(c) for c in constraints])
        if metadata:
            s.set_trial_user_attr(tid, "metadata", _jsonable(metadata))
        s.set_trial_state_values(tid, TrialState.COMPLETE, [float(v) for v in values])
        trial.state, trial.values = "complete", [float(v) for v in values]
        trial.measures, trial.constraints = [float(m) for m in measures], [float(c) for c in constraints]
        trial.metadata = dict(metadata or {})
        return trial

    def fail(self, trial: Trial, reason: str, *, stale: bool = False, metadata: dict[str, Any] | None = None) -> Trial:
        s, tid = self._storage, trial._id
        s.set_trial_user_attr(tid, "fail_reason", reason[-4000:])
        if stale:
            s.set_trial_user_attr(tid, "stale", True)
        if metadata:
            s.set_trial_user_attr(tid, "metadata", _jsonable(metadata))
        s.set_trial_state_values(tid, TrialState.FAIL)
        trial.state, trial.reason, trial.stale = "failed", reason, stale
        trial.metadata = dict(metadata or {})
        return trial

    def update_metadata(self, trial: Trial, metadata: dict[str, Any]) -> None:
        self._storage.set_trial_user_attr(trial._id, "metadata", _jsonable(metadata))
        trial.metadata = dict(metadata)

    def set_attr(self, key: str, value: Any) -> None:
        """Store run-level data (e.g. metric history) as a study user attribute."""
        self.study.set_user_attr(key, _jsonable(value))

    def attrs(self) -> dict[str, Any]:
        return self._storage.get_study_user_attrs(self._study_id)

    # --- reading ----------------------------------------------------------------------------
    def trials(self, states: Sequence[State] | None = None) -> list[Trial]:
        """All trials in creation order (optionally only those in ``states``)."""
        out = [self._convert(t) for t in self._storage.get_all_trials(self._study_id, deepcopy=False)]
        return [t for t in out if states is None or t.state in states]

    def _convert(self, t: FrozenTrial) -> Trial:
        ua = t.user_attrs
        measures = ua.get("measures")
        return Trial(
            number=t.number, params=dict(t.params), state=_STATE[t.state],
            values=list(t.values) if t.values is not None else None,
            measures=[measures[n] for n in self.measure_names] if measures else None,
            constraints=ua.get("constraints"), metadata=ua.get("metadata", {}), reason=ua.get("fail_reason"),
            origin=ua.get("origin", "strategy"), stale=bool(ua.get("stale", False)), seed=ua.get("seed", 0),
            driver=ua.get("driver"), requeue_of=ua.get("requeue_of"), _id=t._trial_id,
        )

    def counts(self) -> dict[str, int]:
        trials = self.trials()
        return {
            "n_complete": sum(t.state == "complete" for t in trials),
            "n_failed": sum(t.state == "failed" and not t.stale for t in trials),
            "n_stale": sum(t.stale for t in trials),
            "n_running": sum(t.state == "running" for t in trials),
        }

    def dataframe(self) -> pd.DataFrame:
        """One row per trial: number, state, params.*, values.*, measures.*, constraints, reason, metadata.*."""
        objective_names = self.study.metric_names or [f"value_{i}" for i in range(len(self.study.directions))]
        rows = []
        for t in self.trials():
            row: dict[str, Any] = {"number": t.number, "state": t.state, "origin": t.origin, "stale": t.stale}
            row.update({f"params.{k}": v for k, v in t.params.items()})
            for i, name in enumerate(objective_names):
                row[f"values.{name}"] = t.values[i] if t.values else None
            for i, name in enumerate(self.measure_names):
                row[f"measures.{name}"] = t.measures[i] if t.measures else None
            row["feasible"] = t.feasible
            row["reason"] = t.reason
            row.update({f"metadata.{k}": v for k, v in (t.metadata or {}).items() if not isinstance(v, (dict, list))})
            rows.append(row)
        return pd.DataFrame(rows)


def _jsonable(value: Any) -> Any:
    """Round-trip through JSON so numpy scalars and tuples are stored as plain JSON."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
