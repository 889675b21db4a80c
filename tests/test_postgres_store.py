"""The store and the run loop on SQLite and on a real PostgreSQL server (``QD_TEST_POSTGRES_URL``).

Each test runs on both storages; the PostgreSQL variant is skipped when no server is configured,
except under ``CI=true`` where that is a failure (``.ci/start-postgres.sh`` provides one).
"""

from __future__ import annotations

import json
import threading

import pytest

from evaluators import make_evaluator
from qd.registry import get_problem
from qd.run import run
from qd.store import RunInfo, Store, resolve_storage
from qd.strategies import get_strategy
from storage_urls import STORAGES, delete_runs, storage_url, unique_name


@pytest.fixture(params=STORAGES)
def storage(request, tmp_path):
    url = storage_url(request.param, tmp_path)
    created: list[str] = []
    yield url, created
    if request.param == "postgresql":
        delete_runs(url, created)


def _new(storage, problem_name="zdt1", options=None, strategy="random", seed=3):
    url, created = storage
    name = unique_name(problem_name)
    created.append(name)
    options = {"dim": 4} if options is None and problem_name == "zdt1" else (options or {})
    problem = get_problem(problem_name, **options)
    info = RunInfo(name=name, problem=problem_name, problem_options=options, strategy=strategy,
                   strategy_options={}, seed=seed)
    return problem, info, Store.create(url, info, problem)


def test_round_trip_through_a_fresh_connection(storage):
    problem, info, store = _new(storage)
    config = {f"x{i}": 0.25 * i for i in range(4)}
    t = store.start(config, problem.space.active_distributions(config), seed=11, driver={"host": "h", "pid": 1})
    store.complete(t, [0.1, 0.9], measures=[0.2, 0.3], metadata={"wall_time_s": 1.5, "nested": {"a": [1, 2]}})
    f = store.start(config, problem.space.active_distributions(config))
    store.fail(f, "exception: ValueError: boom\n" + "x" * 6000)
    store.start(config, problem.space.active_distributions(config), origin="requeue", requeue_of=1,
                driver={"host": "h", "pid": 2})

    again = Store.open(storage[0], info.name)
    assert again.info == info
    trials = again.trials()
    assert [t.state for t in trials] == ["complete", "failed", "running"]
    assert trials[0].params == config and trials[0].values == [0.1, 0.9] and trials[0].seed == 11
    # The driver is kept while a trial runs (to tell a live run from a dead one), not after.
    assert trials[0].measures == [0.2, 0.3] and trials[0].driver is None
    assert trials[2].driver == {"host": "h", "pid": 2}
    assert trials[0].metadata == {"wall_time_s": 1.5, "nested": {"a": [1, 2]}}
    assert trials[1].reason.startswith("x") and len(trials[1].reason) == 4000  # the end, where the cause is
    assert trials[2].origin == "requeue" and trials[2].requeue_of == 1
    assert again.counts() == {"n_complete": 1, "n_failed": 1, "n_stale": 0, "n_running": 1}
    assert info.name in Store.run_names(storage[0])


def test_identity_is_checked_on_resume(storage):
    problem, info, _ = _new(storage)
    with pytest.raises(ValueError, match="already exists"):
        Store.create(storage[0], info, problem)
    other = RunInfo(name=info.name, problem="zdt2", problem_options={"dim": 4}, strategy="random",
                    strategy_options={}, seed=3)
    with pytest.raises(ValueError, match="was made with problem 'zdt1'"):
        Store.create(storage[0], other, get_problem("zdt2", dim=4), resume=True)


def test_run_resume_and_failures_with_reasons(storage):
    problem, info, store = _new(storage, "faulty", {"weights": {"ok": 2, "raise": 1, "nan": 1, "oom": 1}})
    run(problem, get_strategy("random", problem, seed=0), make_evaluator("inprocess"), store, budget=10,
        progress=False)
    store = Store.open(storage[0], info.name)
    run(problem, get_strategy("random", problem, seed=0), make_evaluator("inprocess"), store, budget=20,
        progress=False)
    trials = Store.open(storage[0], info.name).trials()
    assert len(trials) == 20
    # The resumed strategy continued its sequence instead of repeating it.
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 20
    reasons = {"raise": "exception: RuntimeError", "nan": "invalid result:", "oom": "oom: MemoryError"}
    for t in trials:
        b = t.params["behaviour"]
        if b == "ok":
            assert t.state == "complete"
        else:
            assert t.state == "failed" and t.reason.startswith(reasons[b]), (b, t.reason)
    assert {t.params["behaviour"] for t in trials} == {"ok", "raise", "nan", "oom"}


def test_two_runs_write_to_one_storage_at_once(storage):
    runs = [_new(storage, seed=s) for s in (1, 2)]
    errors: list[BaseException] = []

    def drive(problem, store):
        try:
            run(problem, get_strategy("random", problem, seed=0), make_evaluator("inprocess"), store, budget=25,
                workers=2, progress=False)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=drive, args=(p, s)) for p, _, s in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for _, info, _ in runs:
        assert Store.open(storage[0], info.name).counts() == {"n_complete": 25, "n_failed": 0, "n_stale": 0,
                                                              "n_running": 0}


def test_plain_postgresql_url_uses_the_installed_driver():
    resolved = resolve_storage("postgresql://u:p@localhost:5432/db")
    assert resolved.endswith("://u:p@localhost:5432/db")
    import importlib.util

    if importlib.util.find_spec("psycopg") is None:
        assert resolved.startswith("postgresql+psycopg2://")
    assert resolve_storage("sqlite:///x.db") == "sqlite:///x.db"
    assert resolve_storage("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"


def test_sqlite_storage_is_opened_in_wal_mode(tmp_path):
    # WAL: commits without an fsync each (the run loop's critical path) and readers that do not block writers.
    import sqlite3

    problem = get_problem("zdt1", dim=4)
    info = RunInfo(name="w", problem="zdt1", problem_options={"dim": 4}, strategy="random", strategy_options={},
                   seed=0)
    store = Store.create(f"sqlite:///{tmp_path}/w.db", info, problem)
    store.start({f"x{i}": 0.5 for i in range(4)}, problem.space.active_distributions({f"x{i}": 0.5 for i in range(4)}))
    with sqlite3.connect(tmp_path / "w.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert Store.open(f"sqlite:///{tmp_path}/w.db", "w").counts()["n_running"] == 1
