"""A fault corpus: inputs a new user, a broken plug-in or a shared server produce in the first week.

Each test would have caught a crash, a silent loss or a raw traceback: odd return values of
``evaluate`` (every evaluator), conflicting flags on resume, in-process timeouts, values and
metadata out of bounds, storage URLs that lose or create data, signals that leave a run
"running", a dashboard anyone can write to, and failures recorded without a useful reason. The
Ray cases share ``test_ray_evaluator.py``'s Ray instance.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from evaluators import Job, make_evaluator
from evaluators.base import error_text
from qd.cli import main
from qd.dashboard_guard import Guard, host_name
from qd.problem import MAX_ABS_VALUE, MAX_METADATA_BYTES, Evaluation, EvaluationError
from qd.registry import get_problem
from qd.run import run
from qd.storage_url import DatabaseMissing, StorageError, check_storage, mask, mask_text
from qd.store import RunInfo, Store
from qd.strategies import get_strategy
from storage_urls import postgres_url

QD = [sys.executable, "-m", "qd.cli"]
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

# What each broken plug-in's trial must say (after the run loop's "invalid result: ").
BROKEN_REASON = {
    "none": "evaluate returned NoneType None, not a qd.Evaluation",
    "list": "evaluate returned list [",
    "huge": "objective values [1e+308] exceed 1e+100 in magnitude",
    "bigmeta": "metadata is ",
    "object": "objective values [<object objec",
}
BROKEN = {"ok": 1, **{b: 1 for b in BROKEN_REASON}}


def _store(storage: str, problem, name: str = "h") -> Store:
    info = RunInfo(name=name, problem="faulty", problem_options=problem.options, strategy="random",
                   strategy_options={}, seed=0)
    return Store.create(storage, info, problem)


def check_broken_trial(t) -> None:
    """A trial of ``faulty`` under ``BROKEN`` weights ended as it should."""
    behaviour = t.params["behaviour"]
    if behaviour == "ok":
        assert t.state == "complete", t.reason
        return
    assert t.state == "failed" and not t.stale, (behaviour, t.state)
    if behaviour == "bigmeta":
        assert t.reason.startswith("invalid result: metadata is ") and f"at most {MAX_METADATA_BYTES} bytes" in t.reason
    else:
        assert t.reason.startswith(f"invalid result: {BROKEN_REASON[behaviour]}"), t.reason


def check_broken_run(store: Store, budget: int) -> set[str]:
    """Every broken return value became a failed trial with its reason; the run reached its budget."""
    counts = store.counts()
    assert counts["n_complete"] + counts["n_failed"] == budget and counts["n_running"] == 0, counts
    for t in store.trials():
        check_broken_trial(t)
    return {t.params["behaviour"] for t in store.trials()}


# --- 1, 5: whatever evaluate returns ------------------------------------------------------------
class _Weird:
    def __iter__(self):
        raise RuntimeError("iteration is broken")

    def __repr__(self):
        raise RuntimeError("repr is broken")


class _BadFloat:
    def __float__(self):
        raise OverflowError("no float for you")


def _circular() -> dict:
    d: dict = {}
    d["self"] = d
    return d


@pytest.mark.parametrize("result, message", [
    (None, "evaluate returned NoneType None, not a qd.Evaluation"),
    ([0.5], r"evaluate returned list \[0.5\], not a qd.Evaluation; wrap the numbers"),
    (0.5, "evaluate returned float 0.5"),
    ("0.5", "evaluate returned str '0.5'"),
    ({"loss": 0.5}, "evaluate returned dict"),
    (_Weird(), r"evaluate returned _Weird <_Weird instance at 0x[0-9a-f]+>, not a qd.Evaluation"),
    (Evaluation(values=None), "objective values None are a NoneType|evaluation returned 0 objective"),
    (Evaluation(values=5), "objective values 5 are a int"),
    (Evaluation(values="ab"), "objective values 'ab' are a str"),
    (Evaluation(values=_Weird()), "could not be read: RuntimeError: iteration is broken"),
    (Evaluation(values=[_BadFloat()]), "objective values .* are not numbers"),
    (Evaluation(values=[1 + 2j]), "are not numbers"),
    (Evaluation(values=[math.inf]), "are not finite"),
    (Evaluation(values=[1e308]), r"exceed 1e\+100 in magnitude"),
    (Evaluation(values=[-2e100]), r"exceed 1e\+100"),
    (Evaluation(values=[0.5], measures=None), None),
    (Evaluation(values={"other": 1}), r"lacks objective\(s\) \['loss'\]"),
    (Evaluation(values={1: 1}), r"lacks objective\(s\) \['loss'\]; got \['1'\]"),
    (Evaluation(values=[0.5], metadata=[1, 2]), "metadata .* is a list; allowed: a dict"),
    (Evaluation(values=[0.5], metadata=_circular()), "metadata cannot be stored as JSON: ValueError: Circular"),
    (Evaluation(values=[0.5], metadata={(1, 2): 3}), "metadata cannot be stored as JSON: TypeError: keys must be"),
    (Evaluation(values=[0.5], metadata={"a": np.zeros(3)}), "metadata cannot be stored as JSON: ValueError"),
    (Evaluation(values=[0.5], metadata={"blob": "x" * MAX_METADATA_BYTES}), "allowed: at most 65536 bytes"),
    (Evaluation(values=np.array([0.5]), metadata={"n": np.int64(3), "ok": True}), None),
])
def test_any_return_value_is_accepted_or_refused_with_its_reason(result, message):
    problem = get_problem("faulty")
    if message is None:
        values, measures, constraints = problem.normalise(result)
        assert values == [0.5] and measures == [] and constraints == []
        return
    with pytest.raises(EvaluationError, match=message):
        problem.normalise(result)


def test_measures_are_bounded_too():
    with pytest.raises(EvaluationError, match=r"measure values \[1e\+200\] exceed 1e\+100"):
        get_problem("zdt1", dim=3).normalise(Evaluation(values=[0.1, 0.2], measures=[0.5, 1e200]))


def test_value_bound_keeps_scores_and_reference_points_finite():
    # The largest allowed values: a QD score summed over 10^6 cells, and a three-objective box, stay finite.
    assert math.isfinite(1e6 * 2 * MAX_ABS_VALUE) and math.isfinite((2.2 * MAX_ABS_VALUE) ** 3)


@pytest.mark.parametrize("evaluator", ["inprocess", "process"])
def test_broken_plugins_fail_their_trials_and_the_run_goes_on(tmp_path, evaluator):
    problem = get_problem("faulty", weights=BROKEN)
    store = _store(f"sqlite:///{tmp_path}/runs.db", problem)
    report = run(problem, get_strategy("random", problem, seed=0), make_evaluator(evaluator), store, budget=24,
                 workers=2, progress=False)
    assert report.finished == 24
    assert check_broken_run(store, 24) == set(BROKEN)
    # A resume does not re-queue them (they are finished, not stale), so it cannot crash on them again.
    again = run(problem, get_strategy("random", problem, seed=0), make_evaluator(evaluator),
                Store.open(f"sqlite:///{tmp_path}/runs.db", "h"), budget=24, progress=False)
    assert again.finished == 24 and again.requeued == 0


def _pool_outcomes(problem, seeds):
    """The outcomes of one process worker evaluating a job per seed, one after the other."""
    from evaluators.process import ProcessPoolEvaluator

    ev, outcomes = ProcessPoolEvaluator(), []
    ev.start(problem, 1)
    try:
        for key, seed in enumerate(seeds):
            ev.submit(Job(key, {"x0": 0.5, "x1": 0.5}, seed=seed))
            (outcome,) = ev.wait(timeout=60)
            outcomes.append(outcome)
    finally:
        ev.close()
    return outcomes


def test_a_result_that_cannot_be_unpickled_in_the_driver_fails_its_trial():
    (outcome,) = _pool_outcomes(_UnreadableResult(), [0])
    assert outcome.kind == "exception" and "result could not be read back" in outcome.error, outcome.error
    assert "cannot be rebuilt here" in outcome.error


def test_a_result_that_cannot_be_pickled_in_the_worker_fails_its_trial_only():
    bad, good = _pool_outcomes(_UnsendableResult(), [0, 1])  # the same worker goes on after the bad one
    assert bad.kind == "exception" and "result could not be sent back" in bad.error, bad.error
    assert good.ok and good.evaluation.values == [1.0, 1.0] and good.metadata["worker_pid"] == bad.metadata["worker_pid"]


class _UnsendableResult(get_problem("zdt1").__class__):
    def __init__(self):
        super().__init__(dim=3)

    def evaluate(self, config, seed):
        import threading

        return Evaluation(values=[1.0, 1.0], metadata={"lock": threading.Lock()} if seed == 0 else None)


class _Unloadable:
    """Pickles fine in the worker; unpickling raises in the driver."""

    def __reduce__(self):
        return (_explode, ())


def _explode():
    if os.environ.get("QD_TEST_WORKER") != "1":
        raise RuntimeError("cannot be rebuilt here")
    return None


class _UnreadableResult(get_problem("zdt1").__class__):
    def __init__(self):
        super().__init__(dim=3)

    def evaluate(self, config, seed):
        os.environ["QD_TEST_WORKER"] = "1"
        return Evaluation(values=[0.0, 0.0], metadata={"x": _Unloadable()})


# --- 10: reasons ----------------------------------------------------------------------------------
def test_exceptions_without_a_message_are_described():
    assert error_text(MemoryError()).startswith("MemoryError: (no message) an allocation failed: the evaluation ran "
                                                "out of memory")
    assert error_text(KeyError()).startswith("KeyError: (no message)")


def test_the_allocators_bare_memory_error_names_the_limit():
    problem = get_problem("faulty", weights={"bare-oom": 1}, memory_mb=256)
    ev = make_evaluator("process")
    ev.start(problem, 1)
    try:
        ev.submit(Job(0, {"behaviour": "bare-oom", "x": 0.5}, seed=0))
        (outcome,) = ev.wait(timeout=60)
    finally:
        ev.close()
    assert outcome.kind == "oom"
    assert outcome.error.startswith("MemoryError: (no message) an allocation failed: the evaluation ran out of memory "
                                    "under this worker's address-space limit of 256 MiB"), outcome.error


def test_a_segfault_in_a_worker_names_its_signal():
    problem = get_problem("faulty", weights={"segv": 1})
    ev = make_evaluator("process")
    ev.start(problem, 1)
    try:
        ev.submit(Job(0, {"behaviour": "segv", "x": 0.5}, seed=0))
        (outcome,) = ev.wait(timeout=60)
    finally:
        ev.close()
    assert outcome.kind == "crash" and "signal SIGSEGV" in outcome.error


# --- 4: in-process timeouts -----------------------------------------------------------------------
def test_inprocess_enforces_the_timeout():
    problem = get_problem("faulty", weights={"ok": 1, "hang": 1}, timeout_s=0.5, hang_s=30)
    ev = make_evaluator("inprocess")
    ev.start(problem, 1)
    t0 = time.monotonic()
    ev.submit(Job(0, {"behaviour": "hang", "x": 0.5}, seed=0))
    (outcome,) = ev.wait()
    assert outcome.kind == "timeout" and "exceeded 0.5 s" in outcome.error and time.monotonic() - t0 < 5
    ev.submit(Job(1, {"behaviour": "ok", "x": 0.5}, seed=0))  # the alarm is disarmed afterwards
    (ok,) = ev.wait()
    assert ok.ok
    time.sleep(0.7)  # no alarm left pending


def test_inprocess_refuses_a_timeout_it_cannot_enforce():
    problem = get_problem("zdt1")
    errors = []

    def start():
        try:
            make_evaluator("inprocess").start(problem, 1, timeout_s=3)
        except ValueError as e:
            errors.append(str(e))

    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    assert errors and "only the main thread receives" in errors[0]


def test_cli_inprocess_timeout_fails_hanging_evaluations(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path}/t.db"
    weights = json.dumps({"ok": 1, "hang": 1})
    assert main(["run", "--problem", "faulty", "-P", f"weights={weights}", "-P", "hang_s=60", "--evaluator",
                 "inprocess", "--timeout", "0.3", "--budget", "6", "--storage", storage, "--name", "t",
                 "--no-progress"]) == 0
    trials = Store.open(storage, "t").trials()
    hung = [t for t in trials if t.params["behaviour"] == "hang"]
    assert hung and all(t.state == "failed" and t.reason.startswith("timeout: evaluation exceeded 0.3 s")
                        for t in hung)


# --- 3: flags given with --resume ----------------------------------------------------------------
def test_resume_applies_what_may_change_and_refuses_a_conflicting_identity(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path}/r.db"
    base = ["run", "--storage", storage, "--name", "a", "--no-progress", "--evaluator", "inprocess"]
    assert main([*base, "--problem", "zdt1", "--strategy", "tpe", "--budget", "4"]) == 0
    capsys.readouterr()
    for extra, message in ((["--strategy", "random"], "strategy is 'tpe' in the run, 'random' given"),
                           (["--problem", "zdt2"], "problem is 'zdt1' in the run, 'zdt2' given"),
                           (["-P", "dim=3"], "problem_options is {} in the run, {'dim': 3} given"),
                           (["-S", "n_startup_trials=2"], "strategy_options is {} in the run"),
                           (["--seed", "1"], "seed is 0 in the run, 1 given")):
        assert main([*base, "--resume", "--budget", "6", *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "choose another --name" in err, err
    assert len(Store.open(storage, "a").trials()) == 4  # nothing ran
    # The recorded identity, given again, is fine; budget, workers and evaluator change.
    assert main([*base, "--resume", "--problem", "zdt1", "--strategy", "tpe", "--seed", "0", "--budget", "7",
                 "--workers", "2", "--evaluator", "process"]) == 0
    assert Store.open(storage, "a").counts()["n_complete"] == 7


def test_resume_from_an_experiment_file_checks_the_file_against_the_run(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path}/f.db"
    path = tmp_path / "e.toml"
    path.write_text(f'[run]\nname = "f"\nstorage = "{storage}"\nbudget = 3\nevaluator = "inprocess"\n'
                    f'[problem]\nname = "zdt1"\n[strategy]\nname = "random"\n')
    assert main(["run", str(path), "--no-progress"]) == 0
    path.write_text(path.read_text().replace('name = "random"', 'name = "tpe"'))
    capsys.readouterr()
    assert main(["run", str(path), "--resume", "--no-progress"]) == 2
    assert "strategy is 'random' in the run, 'tpe' given" in capsys.readouterr().err


# --- 6: storage URLs ------------------------------------------------------------------------------
@pytest.mark.parametrize("url, message", [
    ("sqlite://", "is an in-memory SQLite database: every result would be lost"),
    ("sqlite:///:memory:", "is an in-memory SQLite database"),
    ("sqlite://r.db", "reads 'r.db' as a host name; a SQLite file takes three slashes: 'sqlite:///r.db'"),
    ("sqlite:///{tmp}/no/such/dir/r.db", "the directory '{tmp}/no/such/dir' does not exist; create it first"),
    ("mysql://me:s3cret@db.example/qd", "storage 'mysql://me:\\*\\*\\*@db.example/qd': 'mysql' is not supported"),
    ("postgresql://me:s3cret@127.0.0.1:1/qd", "cannot use storage 'postgresql://me:\\*\\*\\*@127.0.0.1:1/qd': "
                                             "connection to server"),
    ("nonsense", "storage = 'nonsense' is not allowed"),
])
def test_bad_storage_urls_fail_before_any_evaluation(tmp_path, capsys, url, message):
    url = url.format(tmp=tmp_path)
    code = main(["run", "--problem", "zdt1", "--budget", "2", "--evaluator", "inprocess", "--storage", url,
                 "--name", "b", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("qd: error: ") and "s3cret" not in err, err
    import re

    assert re.search(message.format(tmp=tmp_path), err), err
    assert not list(tmp_path.iterdir())


def test_a_long_run_name_is_refused_up_front(tmp_path, capsys):
    assert main(["run", "--problem", "zdt1", "--budget", "2", "--evaluator", "inprocess", "--storage",
                 f"sqlite:///{tmp_path}/n.db", "--name", "x" * 600, "--no-progress"]) == 2
    assert "has 600 characters; allowed: at most 512" in capsys.readouterr().err
    assert not (tmp_path / "n.db").exists()


@pytest.mark.parametrize("command", [["show", "--name", "a"], ["show"], ["plot", "--name", "a"],
                                     ["report", "--name", "a", "--out", "rep"], ["dashboard", "--port", "1"]])
def test_reading_a_database_that_does_not_exist_does_not_create_it(tmp_path, capsys, command, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*command[:1], "--storage", "sqlite:///missing.db", *command[1:]]) == 2
    assert "the database file 'missing.db' does not exist (nothing was created)" in capsys.readouterr().err
    assert not (tmp_path / "missing.db").exists()


def test_mask_hides_passwords_everywhere():
    assert mask("postgresql://qd:s3cret@host:5432/db") == "postgresql://qd:***@host:5432/db"
    assert mask("postgresql://qd:p@ss/w@host/db?sslmode=require") == "postgresql://qd:***@host/db?sslmode=require"
    assert mask("postgresql://qd@host/db") == "postgresql://qd@host/db"
    assert mask("sqlite:///r.db") == "sqlite:///r.db"
    text = "failed on postgresql+psycopg2://u:abc@h/d and 'mysql://x:y@z/w'"
    assert mask_text(text) == "failed on postgresql+psycopg2://u:***@h/d and 'mysql://x:***@z/w'"
    with pytest.raises(DatabaseMissing):
        check_storage("sqlite:///surely/not/here.db", create=False)
    with pytest.raises(StorageError, match="is not a SQLite database"):
        check_storage(f"sqlite:///{__file__}", create=False)


def test_postgresql_errors_and_output_mask_the_password(capsys):
    url = postgres_url()
    name = f"mask-{uuid.uuid4().hex[:8]}"
    assert main(["show", "--storage", url, "--name", name]) == 2
    err = capsys.readouterr().err
    password = url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    assert f"no run named '{name}'" in err and f":{password}@" not in err and ":***@" in err, err


RACE = textwrap.dedent("""
    import sys, time
    from qd.registry import get_problem
    from qd.store import RunInfo, Store
    url, name, at = sys.argv[1], sys.argv[2], float(sys.argv[3])
    problem = get_problem("zdt1")
    time.sleep(max(0.0, at - time.time()))
    Store.create(url, RunInfo(name, "zdt1", {}, "random", {}, 0), problem)
""")


def test_two_drivers_use_an_empty_postgresql_database_at_once():
    """Both create their run: the first creation of Optuna's tables is serialised (it failed one of the
    two with UniqueViolation in 3 of 4 rounds before)."""
    import sqlalchemy as sa

    from qd.store import resolve_storage

    base = resolve_storage(postgres_url())
    engine = sa.create_engine(base, poolclass=sa.NullPool)
    for _ in range(3):
        schema = f"qd_race_{uuid.uuid4().hex[:8]}"  # an empty "database": a fresh schema first on the search path
        with engine.begin() as c:
            c.execute(sa.text(f"CREATE SCHEMA {schema}"))
        try:
            url = f"{base}?options=-csearch_path%3D{schema}"
            at = time.time() + 8
            procs = [subprocess.Popen([sys.executable, "-c", RACE, url, f"r{i}", str(at)], env=ENV, text=True,
                                      stderr=subprocess.PIPE) for i in range(2)]
            errors = [p.communicate(timeout=120)[1] for p in procs]
            assert [p.returncode for p in procs] == [0, 0], errors
            assert sorted(Store.run_names(url)) == ["r0", "r1"]
        finally:
            with engine.begin() as c:
                c.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
    engine.dispose()


# --- 7: signals -----------------------------------------------------------------------------------
def _children(pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.add(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _wait_for_running(storage: str, name: str, n: int, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if sum(t.state == "running" for t in Store.open(storage, name).trials()) >= n:
                return
        except LookupError:
            pass
        time.sleep(0.2)
    raise AssertionError("the run never had its evaluations running")


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow),
                                    pytest.param(signal.SIGHUP, marks=pytest.mark.slow)])
def test_a_signal_stops_the_run_cleanly(tmp_path, signum):
    """Sent to the whole process group (as a terminal's Ctrl-C or hang-up is): one hint, no traceback,
    in-flight trials stale, workers gone; the resumed run ends with exactly its budget."""
    storage, name = f"sqlite:///{tmp_path}/s.db", "s"
    args = [*QD, "run", "--problem", "faulty", "-P", 'weights={"ok": 1}', "-P", "sleep_s=2", "-P", "timeout_s=60",
            "--evaluator", "process", "--workers", "2", "--budget", "6", "--storage", storage, "--name", name,
            "--no-progress"]
    proc = subprocess.Popen(args, env=ENV, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _wait_for_running(storage, name, 2, proc)
    time.sleep(0.5)
    workers = _children(proc.pid)
    assert len(workers) >= 2
    os.killpg(proc.pid, signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, (proc.returncode, err)
    assert err.count("qd: interrupted") == 1 and f"({signal.Signals(signum).name})" in err, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    trials = Store.open(storage, name).trials()
    assert not [t for t in trials if t.state == "running"]
    stale = [t for t in trials if t.stale]
    assert len(stale) == 2 and all(t.metadata.get("requeue") and "was stopped" in t.reason for t in stale)
    time.sleep(1)
    assert not [p for p in workers if _alive(p)]
    resumed = subprocess.run([*args, "--resume"], env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    counts = Store.open(storage, name).counts()
    assert counts["n_complete"] == 6 and counts["n_failed"] == 0 and counts["n_running"] == 0, counts
    configs = [json.dumps(t.params, sort_keys=True) for t in Store.open(storage, name).trials() if t.state == "complete"]
    assert len(set(configs)) == 6  # each stale configuration re-run once


# --- 8: the dashboard -----------------------------------------------------------------------------
def _app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def _call(guard, method="GET", host="127.0.0.1:8080", path="/api/meta", query="", **headers):
    environ = {"REQUEST_METHOD": method, "HTTP_HOST": host, "PATH_INFO": path, "QUERY_STRING": query,
               **{f"HTTP_{k.upper()}": v for k, v in headers.items()}}
    status = {}

    def start_response(s, h, exc_info=None):
        status["status"], status["headers"] = s, h

    body = b"".join(guard(environ, start_response))
    return status["status"], dict(status["headers"]), body.decode()


def test_guard_refuses_foreign_hosts_and_writes_without_the_token():
    readonly = Guard(_app, {"localhost", "127.0.0.1"})
    assert _call(readonly)[0] == "200 OK"
    assert _call(readonly, host="localhost:8080")[0] == "200 OK"
    assert _call(readonly, host="[::1]:8080")[0] == "200 OK"
    assert _call(readonly, host="10.1.2.3:8080")[0] == "200 OK"  # an address typed by hand cannot rebind
    status, _, body = _call(readonly, host="rebind.attacker.example:8080")
    assert status.startswith("403") and "is not this machine" in body
    status, _, body = _call(readonly, "DELETE", path="/api/studies/1")
    assert status.startswith("403") and "read-only" in body
    writable = Guard(_app, {"127.0.0.1"}, token="t0k")
    assert _call(writable, "DELETE")[0].startswith("403")
    assert _call(writable, "DELETE", x_qd_token="wrong")[0].startswith("403")
    assert _call(writable, "DELETE", x_qd_token="t0k")[0] == "200 OK"
    assert _call(writable, "POST", cookie="qd_dashboard_token=t0k")[0] == "200 OK"
    assert _call(writable, "POST", cookie="qd_dashboard_token=t0k", origin="http://evil.example")[0].startswith("403")
    _, headers, _ = _call(writable, query="token=t0k")
    assert "qd_dashboard_token=t0k" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
    assert host_name("Example.org:80") == "example.org" and host_name("[::1]:1") == "::1"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url, method="GET", host=None, headers=None):
    req = urllib.request.Request(url, method=method, headers={**({"Host": host} if host else {}), **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _serve(args, tmp_path):
    port = _free_port()
    log = open(tmp_path / f"dash-{port}.log", "w+")
    proc = subprocess.Popen([*QD, "dashboard", *args, "--port", str(port)], env=ENV, stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{base}/api/meta", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise AssertionError(log.read()) from None
            time.sleep(0.3)
    log.seek(0)
    return proc, base, log.read()


def test_dashboard_is_read_only_and_refuses_foreign_hosts(tmp_path):
    storage = f"sqlite:///{tmp_path}/d.db"
    assert main(["run", "--problem", "zdt1", "--budget", "3", "--evaluator", "inprocess", "--storage", storage,
                 "--name", "d", "--no-progress"]) == 0
    study_id = Store.open(storage, "d").study._study_id
    proc, base, output = _serve(["--storage", storage, "--no-update", "--name", "d"], tmp_path)
    try:
        assert "read-only" in output
        assert _request(f"{base}/api/studies/{study_id}", "DELETE")[0] == 403
        assert _request(f"{base}/api/meta", host="rebind.attacker.example")[0] == 403
        assert Store.run_names(storage) == ["d"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    proc, base, output = _serve(["--storage", storage, "--no-update", "--allow-writes"], tmp_path)
    try:
        token = output.split("?token=", 1)[1].split()[0]
        assert _request(f"{base}/api/studies/{study_id}", "DELETE")[0] == 403
        assert Store.run_names(storage) == ["d"]
        # With the token the write reaches optuna-dashboard, which deletes the study.
        assert _request(f"{base}/api/studies/{study_id}", "DELETE", headers={"X-QD-Token": token})[0] == 204
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_dashboard_output_masks_the_password(tmp_path):
    url = postgres_url()
    name = f"dash-{uuid.uuid4().hex[:8]}"
    assert main(["run", "--problem", "zdt1", "--budget", "2", "--evaluator", "inprocess", "--storage", url,
                 "--name", name, "--no-progress"]) == 0
    try:
        proc, _, output = _serve(["--storage", url, "--no-update", "--name", name], tmp_path)
        proc.terminate()
        proc.wait(timeout=10)
        password = url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
        assert f"optuna-dashboard for {mask(url)}" in output and f":{password}@" not in output, output
    finally:
        from storage_urls import delete_runs

        delete_runs(url, [name])


# --- 9: runtime_env -------------------------------------------------------------------------------
@pytest.mark.parametrize("env, message", [
    ({"worker_setup": "x.y"}, r"unknown key\(s\) \['worker_setup'\]; allowed keys: \['conda'"),
    ({"env_vars": {"A": 1}}, "runtime_env.env_vars={'A': 1} is not allowed; allowed: a table of string values"),
    ({"pip": 3}, "runtime_env.pip=3 is not allowed"),
    ({"py_modules": [1]}, "runtime_env.py_modules=\\[1\\] is not allowed"),
    ("pip", "runtime_env='pip' is not allowed; allowed: a table"),
])
def test_runtime_env_keys_are_checked(env, message):
    pytest.importorskip("ray")
    with pytest.raises(ValueError, match=message):
        make_evaluator("ray", runtime_env=env)


def test_cli_refuses_a_bad_runtime_env_before_any_evaluation(tmp_path, capsys):
    pytest.importorskip("ray")
    storage = f"sqlite:///{tmp_path}/e.db"
    assert main(["run", "--problem", "zdt1", "--evaluator", "ray", "-E", 'runtime_env={"pip_install": ["x"]}',
                 "--storage", storage, "--name", "e", "--no-progress"]) == 2
    assert "unknown key(s) ['pip_install']" in capsys.readouterr().err
    assert not (tmp_path / "e.db").exists()
