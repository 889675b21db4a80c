"""Failure semantics: the ``faulty`` problem through the in-process evaluator and the process pool.

Every kind of failure (exception, NaN, timeout, crashed worker, out-of-memory) must come back as
a failed trial carrying its reason, and every success must be kept, with the run going on. The
same checks on Ray are in ``test_ray_evaluator.py`` (they share its Ray instance).
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from evaluators import Job, make_evaluator
from problems.faulty import BEHAVIOURS, EXIT_CODE, WeightedCategorical
from qd.cli import main
from qd.registry import get_problem
from qd.run import run
from qd.space import SpaceError
from qd.store import RunInfo, Store
from qd.strategies import get_strategy

# What the recorded reason of each behaviour starts with (the run loop prefixes the kind).
EXPECTED_REASON = {
    "raise": "exception: RuntimeError: faulty: behaviour 'raise'",
    "nan": "invalid result: objective values [nan] are not finite",
    "hang": "timeout: evaluation exceeded",
    "exit": "crash: worker process exited with code 13",
    "oom": "oom: MemoryError: faulty: behaviour 'oom' could not allocate",
}


def check_faulty_run(store: Store, budget: int, expected: dict[str, str] = EXPECTED_REASON) -> dict[str, int]:
    """Every behaviour ended as it should; returns the count of each behaviour."""
    trials = store.trials()
    counts = store.counts()
    assert counts["n_complete"] + counts["n_failed"] == budget and counts["n_running"] == 0, counts
    seen: dict[str, int] = {}
    for t in trials:
        behaviour = t.params["behaviour"]
        seen[behaviour] = seen.get(behaviour, 0) + 1
        if behaviour == "ok":
            assert t.state == "complete", (t.number, t.reason)
            assert t.values == pytest.approx([(t.params["x"] - 0.3) ** 2])
        else:
            assert t.state == "failed" and not t.stale, (t.number, behaviour, t.state)
            assert t.reason.startswith(expected[behaviour]), (behaviour, t.reason)
    return seen


def _store(tmp_path, problem, name="f"):
    info = RunInfo(name=name, problem="faulty", problem_options=problem.options, strategy="random",
                   strategy_options={}, seed=0)
    return Store.create(f"sqlite:///{tmp_path}/runs.db", info, problem)


# --- the problem itself ---------------------------------------------------------------------------
def test_weights_shape_what_a_uniform_draw_picks():
    problem = get_problem("faulty", weights={"ok": 6, "raise": 1, "hang": 1, "exit": 0})
    param = problem.space["behaviour"]
    assert isinstance(param, WeightedCategorical)
    assert param.choices == ("ok", "raise", "hang")  # weight 0 is left out, order kept
    picks = [param.decode(u) for u in (np.arange(8000) + 0.5) / 8000]
    shares = {c: picks.count(c) / len(picks) for c in param.choices}
    assert shares == pytest.approx({"ok": 0.75, "raise": 0.125, "hang": 0.125}, abs=1e-3)
    for choice in param.choices:
        assert param.decode(param.encode(choice)) == choice
    with pytest.raises(SpaceError, match="'exit' is not allowed"):
        problem.space.validate({"behaviour": "exit", "x": 0.5})


def test_random_run_meets_every_behaviour():
    problem = get_problem("faulty")
    configs = get_strategy("random", problem, seed=0).ask(30)
    assert {c["behaviour"] for c in configs} == set(BEHAVIOURS)


@pytest.mark.parametrize("options, message", [
    ({"weights": {"ok": 1, "explode": 1}}, r"unknown behaviour\(s\) \['explode'\]; allowed: \['ok'"),
    ({"weights": {"ok": -1}}, r"weights\['ok'\]=-1 is not allowed; allowed: a number >= 0"),
    ({"weights": {"ok": 0}}, "at least one behaviour of weight > 0"),
    ({"weights": ["ok"]}, "allowed: a mapping of behaviours"),
    ({"timeout_s": 0}, "timeout_s=0 is not allowed; allowed: a number > 0"),
    ({"memory_mb": 1.5}, "memory_mb=1.5 is not allowed; allowed: an integer >= 1"),
    ({"sleep_s": math.nan}, "sleep_s=nan is not allowed"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        get_problem("faulty", **options)


def test_declares_resources_from_options():
    problem = get_problem("faulty", timeout_s=1.5, memory_mb=512)
    assert (problem.resources.timeout_s, problem.resources.memory_mb, problem.resources.cpus) == (1.5, 512, 1)
    assert problem.hang_s == 15.0 and problem.oom_mb == 2048


# --- in-process: no isolation, so only what cannot take the driver down ----------------------------
def test_inprocess_reports_exceptions_and_oom_without_allocating():
    problem = get_problem("faulty")
    ev = make_evaluator("inprocess")
    ev.start(problem, 1)
    outcomes = {}
    for key, behaviour in enumerate(["ok", "raise", "nan", "oom"]):
        ev.submit(Job(key, {"behaviour": behaviour, "x": 0.5}, seed=0))
        (outcome,) = ev.wait()
        outcomes[behaviour] = outcome
    ev.close()
    assert outcomes["ok"].ok and outcomes["ok"].evaluation.values == [pytest.approx(0.04)]
    assert outcomes["nan"].ok and math.isnan(outcomes["nan"].evaluation.values[0])  # the run loop rejects it
    assert outcomes["raise"].kind == "exception" and "faulty: behaviour 'raise'" in outcomes["raise"].error
    assert outcomes["oom"].kind == "oom" and "no address-space limit is in force" in outcomes["oom"].error


# --- process pool -------------------------------------------------------------------------------
def test_process_pool_gives_each_failure_its_kind_and_keeps_going():
    problem = get_problem("faulty", timeout_s=1.0)
    ev = make_evaluator("process")
    ev.start(problem, workers=2)
    behaviours = ["hang", "exit", "ok", "oom", "raise", "ok"]
    try:
        for key, behaviour in enumerate(behaviours):
            ev.submit(Job(key, {"behaviour": behaviour, "x": 0.1 * key}, seed=key))
        outcomes = {}
        deadline = time.monotonic() + 60
        while len(outcomes) < len(behaviours) and time.monotonic() < deadline:
            for o in ev.wait(timeout=5):
                outcomes[o.key] = o
    finally:
        ev.close()
    by = {behaviours[k]: o for k, o in outcomes.items()}
    assert len(outcomes) == len(behaviours)
    assert by["hang"].kind == "timeout" and 1.0 <= by["hang"].metadata["wall_time_s"] < 3.0
    assert by["exit"].kind == "crash" and f"exited with code {EXIT_CODE}" in by["exit"].error
    assert by["oom"].kind == "oom" and "could not allocate 4096 MiB" in by["oom"].error
    assert by["raise"].kind == "exception" and "Traceback" in by["raise"].error
    assert all(outcomes[k].ok for k, b in enumerate(behaviours) if b == "ok")


def test_worker_start_up_does_not_count_towards_the_timeout():
    # A fresh worker (new interpreter, imports) takes about a second here; a 0.6 s evaluation under a
    # 1 s timeout must still succeed, also right after a crash made the pool start a new worker.
    problem = get_problem("faulty", timeout_s=1.0, sleep_s=0.6)
    ev = make_evaluator("process")
    ev.start(problem, workers=1)
    try:
        results = []
        for key, behaviour in enumerate(["ok", "exit", "ok"]):
            ev.submit(Job(key, {"behaviour": behaviour, "x": 0.5}, seed=key))
            results += ev.wait(timeout=60)
    finally:
        ev.close()
    assert [o.kind for o in results] == [None, "crash", None], [o.error for o in results]


def test_run_on_the_process_pool_records_every_failure_with_its_reason(tmp_path):
    budget = 30
    problem = get_problem("faulty", timeout_s=1.0)
    store = _store(tmp_path, problem)
    report = run(problem, get_strategy("random", problem, seed=0), make_evaluator("process"), store,
                 budget=budget, workers=2, progress=False)
    assert report.finished == budget and report.stopped_by == "budget"
    seen = check_faulty_run(store, budget)
    assert set(seen) == set(BEHAVIOURS)


def test_cli_faulty_process_run(tmp_path, capsys):
    """`qd run --problem faulty --evaluator process`: complete + failed = budget, each failure with its reason."""
    storage = f"sqlite:///{tmp_path}/cli.db"
    assert main(["run", "--problem", "faulty", "--evaluator", "process", "--budget", "12", "--workers", "2",
                 "-P", "timeout_s=1", "--storage", storage, "--name", "cli", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["show", "--storage", storage, "--name", "cli", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["n_complete"] + shown["n_failed"] == 12
    check_faulty_run(Store.open(storage, "cli"), 12)


@pytest.mark.slow
def test_cli_acceptance_faulty_process_40(tmp_path, capsys):
    """The acceptance command as written: defaults (1 worker, 2 s timeout), 40 evaluations."""
    storage = f"sqlite:///{tmp_path}/acc.db"
    assert main(["run", "--problem", "faulty", "--evaluator", "process", "--budget", "40", "--storage", storage,
                 "--name", "acc", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["show", "--storage", storage, "--name", "acc", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["n_complete"] + shown["n_failed"] == 40
    assert set(check_faulty_run(Store.open(storage, "acc"), 40)) == set(BEHAVIOURS)


@pytest.mark.slow
def test_hundred_faulty_evaluations_on_the_process_pool(tmp_path):
    problem = get_problem("faulty")
    store = _store(tmp_path, problem)
    run(problem, get_strategy("random", problem, seed=1), make_evaluator("process"), store, budget=100, workers=2,
        progress=False)
    assert set(check_faulty_run(store, 100)) == set(BEHAVIOURS)
