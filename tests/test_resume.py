"""Driver crash and resume: SIGKILL a driver midway, then ``qd run --resume``.

After the resume a run holds exactly its budget of complete trials, no configuration completed
twice, every trial recorded before the kill unchanged, and every configuration that was running
at the kill evaluated again (nothing lost). A second run writing to the same storage meanwhile is
not disturbed, and a run whose driver is still alive cannot be resumed by another driver.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from evaluators import make_evaluator
from qd.cli import main
from qd.registry import get_problem
from qd.run import STALE_REASON, _LIVE_RUNS, driver_alive, driver_identity, run
from qd.store import RunInfo, RunNotFound, Store, Trial
from qd.strategies import get_strategy
from storage_urls import delete_runs, storage_url, unique_name

OK_ONLY = 'weights={"ok": 1}'


def _driver(storage: str, name: str, evaluator: str, budget: int, sleep_s: float, log) -> subprocess.Popen:
    """A ``qd run`` driver in its own process, evaluating ``faulty`` configurations that all succeed."""
    cmd = [sys.executable, "-m", "qd.cli", "run", "--problem", "faulty", "-P", OK_ONLY, "-P", f"sleep_s={sleep_s}",
           "--evaluator", evaluator, "--workers", "2", "--budget", str(budget), "--storage", storage, "--name", name,
           "--no-progress"]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def _wait_for(storage: str, name: str, ready, proc: subprocess.Popen, timeout_s: float = 90) -> list[Trial]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"driver ended early (rc {proc.returncode}) before the test could kill it"
        try:
            trials = Store.open(storage, name).trials()
        except RunNotFound:
            trials = []
        if ready(trials):
            return trials
        time.sleep(0.05)
    raise AssertionError(f"run {name!r} did not reach the wanted state in {timeout_s} s")


def _key(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def check_resumed(store: Store, budget: int, before: list[Trial]) -> None:
    trials = store.trials()
    counts = store.counts()
    assert counts == {"n_complete": budget, "n_failed": 0, "n_stale": counts["n_stale"], "n_running": 0}, counts
    complete = [t for t in trials if t.state == "complete"]
    assert len({_key(t.params) for t in complete}) == len(complete), "a configuration was completed twice"
    # Nothing recorded is lost or changed.
    now = {t.number: t for t in trials}
    for t in before:
        if t.state == "complete":
            assert now[t.number].state == "complete" and now[t.number].values == t.values
    # Every configuration that was running at the kill was evaluated again, exactly once.
    stale = [t for t in trials if t.stale]
    assert stale and all(t.reason == STALE_REASON for t in stale)
    done = {_key(t.params) for t in complete}
    for t in stale:
        assert _key(t.params) in done
        reruns = [r for r in trials if r.requeue_of == t.number]
        assert len(reruns) == 1 and reruns[0].origin == "requeue" and reruns[0].params == t.params


# A neighbour run B writes to the same storage while A is killed and resumed (skipped for the in-process
# evaluator only to keep the suite short: the storage does not depend on the evaluator).
@pytest.mark.parametrize("evaluator, storage_kind, neighbour", [("process", "sqlite", True),
                                                                ("inprocess", "sqlite", False),
                                                                ("process", "postgresql", True)])
def test_sigkill_then_resume(tmp_path, capsys, evaluator, storage_kind, neighbour):
    storage = storage_url(storage_kind, tmp_path)
    name_a, name_b = unique_name("killed"), unique_name("neighbour")
    log = open(tmp_path / "drivers.log", "w")
    # A's budget is out of reach, so it surely still runs when it is killed.
    a = _driver(storage, name_a, evaluator, 1000, sleep_s=0.25, log=log)
    b = _driver(storage, name_b, evaluator, 12, sleep_s=0.05, log=log) if neighbour else None
    try:
        _wait_for(storage, name_a, lambda ts: sum(t.state == "complete" for t in ts) >= 4
                  and any(t.state == "running" for t in ts), a)

        # While A's driver lives, another driver may not take its run over.
        capsys.readouterr()
        assert main(["run", "--resume", "--name", name_a, "--storage", storage, "--budget", "1000",
                     "--no-progress"]) == 2
        assert "still alive" in capsys.readouterr().err

        os.kill(a.pid, signal.SIGKILL)
        a.wait(timeout=10)
        before = Store.open(storage, name_a).trials()
        assert any(t.state == "running" for t in before)
        if b is not None:
            assert b.wait(timeout=120) == 0, (tmp_path / "drivers.log").read_text()[-3000:]

        # Resume to a budget a little past what A had finished, so its stale trials are evaluated again.
        budget = sum(t.finished for t in before) + 4
        assert main(["run", "--resume", "--name", name_a, "--storage", storage, "--budget", str(budget),
                     "--evaluator", evaluator, "--workers", "2", "--no-progress"]) == 0
        check_resumed(Store.open(storage, name_a), budget, before)
        if b is not None:
            assert Store.open(storage, name_b).counts() == {"n_complete": 12, "n_failed": 0, "n_stale": 0,
                                                            "n_running": 0}
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        log.close()
        if storage_kind == "postgresql":
            delete_runs(storage, [name_a, name_b])


def test_a_requeued_configuration_is_not_queued_again_after_a_second_crash(tmp_path):
    """The driver died after re-launching a stale trial but before clearing the stale one's flag."""
    problem = get_problem("faulty", weights={"ok": 1})
    info = RunInfo(name="r", problem="faulty", problem_options=problem.options, strategy="random",
                   strategy_options={}, seed=0)
    store = Store.create(f"sqlite:///{tmp_path}/runs.db", info, problem)
    config = {"behaviour": "ok", "x": 0.123}
    dead = {"host": "elsewhere", "pid": 1}
    first = store.start(config, problem.space.active_distributions(config), driver=dead)
    store.fail(first, STALE_REASON, stale=True, metadata={"requeue": True})
    store.start(config, problem.space.active_distributions(config), origin="requeue", requeue_of=first.number,
                driver=dead)  # left RUNNING by the second crash

    report = run(problem, get_strategy("random", problem, seed=0), make_evaluator("inprocess"), store, budget=4,
                 progress=False)
    assert report.requeued == 1
    complete = [t for t in store.trials() if t.state == "complete"]
    assert len(complete) == 4
    assert sum(t.params == config for t in complete) == 1


def test_driver_liveness():
    token = "t-live"
    me = driver_identity(token)
    assert not driver_alive(me)  # this process runs no run() with that token
    _LIVE_RUNS.add(token)
    try:
        assert driver_alive(me)
    finally:
        _LIVE_RUNS.discard(token)
    assert not driver_alive({**me, "host": "another-host"})  # cannot be checked: taken as dead
    assert not driver_alive(None)

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        from qd.run import _process_start

        alive = {**me, "pid": child.pid, "pid_start": _process_start(child.pid)[1], "token": "x"}
        assert driver_alive(alive)
        assert not driver_alive({**alive, "pid_start": alive["pid_start"] - 1})  # the pid was reused
        child.kill()
        time.sleep(0.2)
        assert not driver_alive(alive)  # a zombie (not reaped yet) is dead
    finally:
        child.kill()
        child.wait()
    assert not driver_alive(alive)
