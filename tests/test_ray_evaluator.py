"""The Ray evaluator on a real local Ray (one per module: starting Ray costs seconds).

The Ray instance declares 4 CPUs and 1 GPU. On a machine without a GPU the GPU is only a
resource to schedule by, which is all fractional sharing needs to be tested: four evaluations of
``gpus=0.25`` run at once, four of ``gpus=1`` one after another.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import operator
import os
import signal
import subprocess
import sys
import time

import pytest

ray = pytest.importorskip("ray")

from evaluators import Job, make_evaluator  # noqa: E402
from evaluators.ray_cluster import RayEvaluator, ray_options  # noqa: E402
from problems.faulty import BEHAVIOURS  # noqa: E402
from qd.cli import main  # noqa: E402
from qd.problem import Resources  # noqa: E402
from qd.registry import get_problem  # noqa: E402
from qd.run import run  # noqa: E402
from qd.store import RunInfo, Store  # noqa: E402
from qd.strategies import get_strategy  # noqa: E402
from test_faults import check_faulty_run  # noqa: E402

RAY_REASON = {
    "raise": "exception: RuntimeError: faulty: behaviour 'raise'",
    "nan": "invalid result: objective values [nan] are not finite",
    "hang": "timeout: evaluation exceeded 1 s and was cancelled",
    "exit": "crash: worker or node died (after 2 attempts): ActorDiedError",
    "oom": "oom: MemoryError: faulty: behaviour 'oom' could not allocate 4096 MiB",
}


@pytest.fixture(scope="module")
def ray_address():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
             object_store_memory=200 * 2**20)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _store(tmp_path, problem, name="r"):
    info = RunInfo(name=name, problem=problem.name, problem_options=problem.options, strategy="random",
                   strategy_options={}, seed=0)
    return Store.create(f"sqlite:///{tmp_path}/runs.db", info, problem)


def _collect(ev, n: int, timeout_s: float = 90) -> dict[int, object]:
    outcomes, deadline = {}, time.monotonic() + timeout_s
    while len(outcomes) < n and time.monotonic() < deadline:
        for o in ev.wait(timeout=5):
            outcomes[o.key] = o
    assert len(outcomes) == n, f"{len(outcomes)} of {n} outcomes in {timeout_s} s"
    return outcomes


# --- no Ray needed --------------------------------------------------------------------------------
def test_resources_become_ray_options():
    assert ray_options(Resources(cpus=2, gpus=0.25, memory_mb=512)) == {"num_cpus": 2, "num_gpus": 0.25,
                                                                        "memory": 512 * 2**20}
    assert ray_options(Resources()) == {"num_cpus": 1.0, "num_gpus": 0.0}
    with pytest.raises(ValueError, match=r"resources.gpus=1.5 is not allowed; allowed: a fraction in \[0, 1\]"):
        ray_options(Resources(gpus=1.5))
    with pytest.raises(ValueError, match=r"resources: option cpus=-1 is not allowed; allowed: a number >= 0"):
        ray_options(Resources(cpus=-1))
    with pytest.raises(ValueError, match=r"resources: option memory_mb=0 is not allowed"):
        ray_options(Resources(memory_mb=0))


@pytest.mark.parametrize("options, message", [
    ({"mode": "thread"}, r"mode='thread' is not allowed; allowed: \['actor', 'task'\]"),
    ({"max_retries": -1}, r"max_retries=-1 is not allowed; allowed: an integer >= 0"),
    ({"address": ""}, r"address='' is not allowed"),
    ({"num_cpus": 1.5}, r"num_cpus=1.5 is not allowed"),
    ({"colour": "blue"}, r"unknown option\(s\) \['colour'\]; allowed options: \['address', 'mode'"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        make_evaluator("ray", **options)


# --- on Ray ---------------------------------------------------------------------------------------
def test_zdt1_run_on_actors_reuses_its_workers(ray_address, tmp_path):
    problem = get_problem("zdt1")
    store = _store(tmp_path, problem)
    report = run(problem, get_strategy("random", problem, seed=0), make_evaluator("ray"), store, budget=20,
                 workers=2, progress=False)
    assert report.complete == 20 and report.failed == 0
    trials = store.trials()
    assert len({t.metadata["worker_pid"] for t in trials}) <= 2  # at most two actors did all twenty
    assert all(t.metadata["host"] and t.metadata["wall_time_s"] >= 0 for t in trials)


def test_actors_keep_the_problem_and_its_caches(ray_address):
    problem = get_problem("faulty", weights={"ok": 1})
    ev = make_evaluator("ray")
    ev.start(problem, workers=2)
    try:
        for key in range(8):
            ev.submit(Job(key, {"behaviour": "ok", "x": key / 10}, seed=key))
        outcomes = _collect(ev, 8)
    finally:
        ev.close()
    metas = [o.evaluation.metadata for o in outcomes.values()]
    assert len({m["pid"] for m in metas}) <= 2
    # Eight evaluations on at most two actors: one actor's unpickled problem served at least four.
    assert max(m["calls_in_process"] for m in metas) >= 4


def test_an_actor_takes_up_to_max_population_jobs_per_call(ray_address):
    problem = get_problem("faulty", weights={"ok": 1})
    problem.max_population = 3  # the default evaluate_population: one evaluate per configuration
    ev = make_evaluator("ray")
    ev.start(problem, workers=3)  # three in flight: one actor
    try:
        for key in range(7):
            ev.submit(Job(key, {"behaviour": "ok", "x": key / 10}, seed=key))
        outcomes = _collect(ev, 7)
    finally:
        ev.close()
    assert all(o.ok for o in outcomes.values())
    assert sorted(o.metadata.get("population", 1) for o in outcomes.values()) == [1, 3, 3, 3, 3, 3, 3]
    assert len({o.evaluation.metadata["pid"] for o in outcomes.values()}) == 1


def test_a_queue_of_populations_is_shared_evenly_among_actors(ray_address):
    # Each evaluation takes 4 s: the second actor is ready before the first finishes its share.
    problem = get_problem("faulty", weights={"ok": 1}, sleep_s=4.0)
    problem.max_population = 3
    ev = make_evaluator("ray")
    ev.start(problem, workers=6, timeout_s=60)  # two actors of up to three each; a timeout bounds a whole call
    try:
        for key in range(4):
            ev.submit(Job(key, {"behaviour": "ok", "x": key / 10}, seed=key))
        outcomes = _collect(ev, 4)
    finally:
        ev.close()
    assert all(o.ok for o in outcomes.values()), [o.error for o in outcomes.values()]
    # The first ready actor takes half (two), not three; how the rest splits depends on which actor
    # is free first (a starting actor counts as one that can take some).
    populations = [o.metadata.get("population", 1) for o in outcomes.values()]
    assert max(populations) == 2 and len({o.evaluation.metadata["pid"] for o in outcomes.values()}) == 2


def test_faulty_run_on_actors_records_every_failure_with_its_reason(ray_address, tmp_path):
    # Fewer hangs and exits than the default weights: each costs a new actor (and an exit two).
    weights = {"ok": 4, "raise": 2, "nan": 2, "hang": 1, "exit": 1, "oom": 2}
    problem = get_problem("faulty", weights=weights, timeout_s=1.0)
    store = _store(tmp_path, problem)
    report = run(problem, get_strategy("random", problem, seed=0), make_evaluator("ray", max_retries=1), store,
                 budget=30, workers=2, progress=False)
    assert report.finished == 30
    assert set(check_faulty_run(store, 30, RAY_REASON)) == set(BEHAVIOURS)
    for t in store.trials():
        if t.params["behaviour"] == "exit":
            assert t.metadata["attempts"] == 2  # retried once as a possible system failure, then failed
        if t.params["behaviour"] == "hang":
            assert 1.0 <= t.metadata["wall_time_s"] < 3.0


def test_task_mode_cancels_timeouts_and_reports_failures(ray_address):
    problem = get_problem("faulty", timeout_s=1.0)
    ev = make_evaluator("ray", mode="task", max_retries=0)
    ev.start(problem, workers=2)
    behaviours = ["hang", "ok", "raise", "exit", "oom", "ok"]
    try:
        for key, b in enumerate(behaviours):
            ev.submit(Job(key, {"behaviour": b, "x": 0.5}, seed=key))
        outcomes = _collect(ev, len(behaviours))
    finally:
        ev.close()
    by = {behaviours[k]: o for k, o in outcomes.items()}
    assert by["hang"].kind == "timeout" and "cancelled" in by["hang"].error
    assert by["raise"].kind == "exception" and "faulty: behaviour 'raise'" in by["raise"].error
    assert by["exit"].kind == "crash" and "WorkerCrashedError" in by["exit"].error
    assert by["oom"].kind == "oom" and "MemoryError" in by["oom"].error
    assert outcomes[1].ok and outcomes[5].ok


def test_a_worker_killed_from_outside_is_retried(ray_address):
    problem = get_problem("faulty", weights={"ok": 1}, sleep_s=2.0, timeout_s=30)
    ev = make_evaluator("ray", max_retries=2)
    ev.start(problem, workers=1)
    try:
        ev.submit(Job(0, {"behaviour": "ok", "x": 0.5}, seed=0))
        deadline = time.monotonic() + 60
        while not any(w["job"] == 0 for w in ev.worker_info()):
            assert time.monotonic() < deadline and not ev.wait(timeout=0.1)
        (victim,) = [w["pid"] for w in ev.worker_info() if w["job"] == 0]
        time.sleep(0.3)
        os.kill(victim, signal.SIGKILL)  # as a node's OOM killer or a preemption would
        (outcome,) = _collect(ev, 1).values()
    finally:
        ev.close()
    assert outcome.ok, outcome.error
    assert outcome.metadata["attempts"] == 2 and outcome.metadata["worker_pid"] != victim


class _Poison:
    """Pickles fine in the driver; unpickling it in a worker raises ZeroDivisionError."""

    def __reduce__(self):
        return operator.truediv, (1, 0)


def test_a_problem_that_cannot_be_loaded_fails_its_evaluations_instead_of_looping(ray_address):
    problem = get_problem("faulty", weights={"ok": 1})
    problem.poison = _Poison()
    ev = make_evaluator("ray")
    ev.start(problem, workers=2)
    try:
        for key in range(2):
            ev.submit(Job(key, {"behaviour": "ok", "x": 0.5}, seed=key))
        outcomes = _collect(ev, 2)
    finally:
        ev.close()
    for o in outcomes.values():
        assert o.kind == "system" and "could not start a worker" in o.error and "ZeroDivisionError" in o.error


def _max_overlap(outcomes) -> int:
    events = sorted([(o.metadata["started_at"], 1) for o in outcomes] + [(o.metadata["ended_at"], -1) for o in outcomes])
    depth = best = 0
    for _, step in events:
        depth += step
        best = max(best, depth)
    return best


@pytest.mark.parametrize("gpus, expected", [(0.25, 4), (1.0, 1)])
def test_fractional_gpus_share_one_gpu(ray_address, gpus, expected):
    # Long enough that actors starting seconds apart on a loaded machine still overlap.
    problem = get_problem("faulty", weights={"ok": 1}, sleep_s=4.0 if expected > 1 else 1.0, timeout_s=30.0)
    problem.resources = dataclasses.replace(problem.resources, gpus=gpus, cpus=0.5)
    ev = RayEvaluator()
    if expected < 4:
        with pytest.warns(RuntimeWarning, match="fits 1 evaluations"):
            ev.start(problem, workers=4)
    else:
        ev.start(problem, workers=4)
    try:
        for key in range(4):
            ev.submit(Job(key, {"behaviour": "ok", "x": 0.5}, seed=key))
        outcomes = list(_collect(ev, 4).values())
    finally:
        ev.close()
    assert all(o.ok for o in outcomes)
    assert _max_overlap(outcomes) == expected


def test_cli_run_on_ray_joins_a_running_cluster(ray_address, tmp_path, capsys):
    """`qd run --problem zdt1 --strategy random --evaluator ray --workers 2 --budget 20`, then `qd show --json`.

    The driver is a separate process that joins this module's Ray through ``--ray-address``.
    """
    storage = f"sqlite:///{tmp_path}/cli.db"
    subprocess.run([sys.executable, "-m", "qd.cli", "run", "--problem", "zdt1", "--strategy", "random", "--evaluator",
                    "ray", "--workers", "2", "--budget", "20", "--ray-address", ray_address, "--storage", storage,
                    "--name", "z", "--no-progress"], check=True, capture_output=True, timeout=180)
    assert main(["show", "--storage", storage, "--name", "z", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_complete"] == 20 and result["n_failed"] == 0


@pytest.mark.slow
def test_hundred_faulty_evaluations_on_ray(ray_address, tmp_path):
    problem = get_problem("faulty")
    store = _store(tmp_path, problem)
    run(problem, get_strategy("random", problem, seed=1), make_evaluator("ray", max_retries=1), store, budget=100,
        workers=2, progress=False)
    expected = {**RAY_REASON, "hang": "timeout: evaluation exceeded 2 s and was cancelled"}
    assert set(check_faulty_run(store, 100, expected)) == set(BEHAVIOURS)


# --- hardening: broken plug-ins, fatal signals, a stopped driver --------------------------------------
def test_broken_plugins_and_segfaults_on_ray_fail_their_trials_with_reasons(ray_address, tmp_path):
    from test_hardening import BROKEN, check_broken_trial

    problem = get_problem("faulty", weights={**BROKEN, "segv": 1})
    store = _store(tmp_path, problem)
    report = run(problem, get_strategy("random", problem, seed=0), make_evaluator("ray", max_retries=0), store,
                 budget=21, workers=2, progress=False)
    assert report.finished == 21
    segv = [t for t in store.trials() if t.params["behaviour"] == "segv"]
    assert segv, "the random draw met no segfault"
    for t in segv:
        assert t.state == "failed" and t.reason.startswith("crash: worker or node died: ActorDiedError (worker "
                                                           "process died with signal SIGSEGV (Segmentation fault) in "
                                                           "File"), t.reason
    counts = store.counts()
    assert counts["n_complete"] + counts["n_failed"] == 21 and counts["n_running"] == 0, counts
    for t in store.trials():
        if t.params["behaviour"] != "segv":
            check_broken_trial(t)


def test_task_mode_names_a_segfault(ray_address):
    problem = get_problem("faulty", weights={"ok": 1, "segv": 1})
    ev = make_evaluator("ray", mode="task", max_retries=0)
    ev.start(problem, workers=1)
    try:
        ev.submit(Job(0, {"behaviour": "segv", "x": 0.5}, seed=0))
        outcome = _collect(ev, 1)[0]
    finally:
        ev.close()
    assert outcome.kind == "crash" and "signal SIGSEGV" in outcome.error, outcome.error


def _pids_alive(pids) -> list[int]:
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    alive.append(pid)
        except OSError:
            pass
    return alive


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_ray_driver_leaves_no_actor_behind(ray_address, tmp_path, signum):
    """A driver joined to this module's Ray. SIGTERM: a clean stop (no Ray stack dump, trials stale,
    exit 143). SIGKILL: nothing can be cleaned up, but the actors end within seconds instead of the
    minute Ray takes to notice."""
    storage, name = f"sqlite:///{tmp_path}/r.db", "r"
    env = {**os.environ, "PYTHONPATH": f"{os.path.dirname(os.path.dirname(__file__))}{os.pathsep}"
                                       f"{os.environ.get('PYTHONPATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "qd.cli", "run", "--problem", "faulty", "-P", 'weights={"ok": 1}',
                             "-P", "sleep_s=3", "-P", "timeout_s=60", "--evaluator", "ray", "--ray-address", ray_address,
                             "--workers", "2", "--budget", "20", "--storage", storage, "--name", name,
                             "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, pids = time.monotonic() + 180, set()
    while time.monotonic() < deadline and len(pids) < 2:
        assert proc.poll() is None, proc.communicate()
        try:
            pids = {t.metadata["pid"] for t in Store.open(storage, name).trials() if t.state == "complete"}
        except LookupError:
            pass
        time.sleep(0.5)
    assert len(pids) == 2, "two actors never finished an evaluation"
    os.kill(proc.pid, signum)
    out, err = proc.communicate(timeout=120)
    if signum == signal.SIGTERM:
        assert proc.returncode == 143 and err.count("qd: interrupted (SIGTERM)") == 1, (proc.returncode, err)
        assert "*** SIG" not in err and "Traceback" not in err, err
        trials = Store.open(storage, name).trials()
        assert not [t for t in trials if t.state == "running"] and [t for t in trials if t.stale]
    deadline = time.monotonic() + 15
    while _pids_alive(pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _pids_alive(pids), f"actors {_pids_alive(pids)} outlived their driver"
