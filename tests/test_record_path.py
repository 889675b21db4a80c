"""The record path's guarantees: grouped writes, kills at any moment (during flushes too), one
driver per run whatever the timing, and views that agree with an archive rebuilt independently."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from evaluators import make_evaluator
from qd.archive import EliteArchive, elite_spec
from qd.cli import main
from qd.registry import get_problem
from qd.results import summary
from qd.run import RunInUse, run
from qd.store import RunInfo, Store
from qd.strategies import get_strategy
from storage_urls import delete_runs, storage_url, unique_name


def _driver(storage: str, name: str, budget: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "qd.cli", "run", "--problem", "sphere", "--strategy", "map-elites", "--budget",
           str(budget), "--evaluator", "inprocess", "--storage", storage, "--name", name, "--no-progress",
           "-S", "eval_batch=64"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _finished(storage: str, name: str) -> int:
    try:
        return int(Store.open(storage, name).columns().finished.sum())
    except Exception:  # not created yet
        return 0


def test_a_view_reading_while_the_run_writes_sees_a_consistent_prefix(tmp_path):
    """Views (qd show, the dashboard, notebooks) read while the owner appends segments: every read
    must succeed and see whole segments, never a count from one moment and segments from the next."""
    from qd.storage_url import RunNotFound

    storage = f"sqlite:///{tmp_path}/live.db"
    proc = _driver(storage, "live", 400_000)
    seen, reads, deadline = [], 0, time.monotonic() + 60
    try:
        while time.monotonic() < deadline and len(set(seen)) < 6 and proc.poll() is None:
            try:
                cols = Store.open(storage, "live").columns()
            except RunNotFound:  # not created yet
                time.sleep(0.05)
                continue
            reads += 1
            numbers = cols.number[cols.finished]
            assert len(numbers) == len(set(numbers.tolist()))  # whole segments, each trial once
            if len(numbers):
                seen.append(len(numbers))
    finally:
        proc.kill()
        proc.wait()
    assert reads >= 5 and len(set(seen)) >= 3, (reads, seen)  # it read a run that was growing
    assert seen == sorted(seen)


@pytest.mark.parametrize("delay_s", [0.0, 0.7, 1.9])
def test_kill_at_a_random_moment_then_resume_gives_exactly_the_budget(tmp_path, delay_s):
    """SIGKILL while cheap batches are being written (flushes every few tens of ms), then resume."""
    storage = f"sqlite:///{tmp_path}/k.db"
    proc = _driver(storage, "k", 10**7)
    try:
        deadline = time.monotonic() + 120
        while _finished(storage, "k") < 2000:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(delay_s)
        writer = (Store.open(storage, "k").record.owner()[1] or {}).get("writer")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    from qd.processes import alive

    # Its record writer process died with it (a write in flight lands whole or not at all).
    assert writer is not None
    deadline = time.monotonic() + 5
    while alive(writer) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not alive(writer)
    with sqlite3.connect(tmp_path / "k.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    before = Store.open(storage, "k").columns()
    budget = int(before.finished.sum()) + 500
    assert main(["run", "--resume", "--name", "k", "--storage", storage, "--budget", str(budget),
                 "--no-progress"]) == 0
    after = Store.open(storage, "k").columns()
    assert after.counts() == {"n_complete": budget, "n_failed": 0, "n_stale": 0, "n_running": 0}
    assert len(np.unique(after.number)) == len(after)
    # Everything flushed before the kill is there, unchanged.
    kept = np.isin(after.number, before.number)
    assert after.select(kept).sorted().equals(before.sorted())


def _killed_run(storage: str, name: str, budget_before: int = 6):
    """A run whose driver died: some trials finished, three left in flight, the claim still held."""
    problem = get_problem("faulty", weights={"ok": 1})
    info = RunInfo(name=name, problem="faulty", problem_options=problem.options, strategy="random",
                   strategy_options={}, seed=0)
    store = Store.create(storage, info, problem)
    run(problem, get_strategy("random", problem, seed=0), make_evaluator("inprocess"), store, budget=budget_before,
        progress=False)
    dead = {"host": "a-host-that-is-gone", "pid": 1, "token": "dead"}
    for config in problem.space.sample(3, np.random.default_rng(1)):
        store.start(config, driver=dead)
    assert store.record.claim("dead", dead, expected=None)
    from qd.record import RUNS

    with store.record.engine.begin() as conn:  # its heartbeat stopped long ago
        conn.execute(RUNS.update().where(RUNS.c.id == store.record.run_id).values(heartbeat=0.0))
    return problem, info


@pytest.mark.parametrize("storage_kind", ["sqlite", "postgresql"])
def test_two_resumes_at_the_same_instant_never_share_a_run(tmp_path, storage_kind):
    storage = storage_url(storage_kind, tmp_path)
    names = []
    try:
        for attempt in range(20):
            name = unique_name(f"race{attempt}")
            names.append(name)
            problem, info = _killed_run(storage, name)
            # The dead claim is from another host with no heartbeat: taken as dead, so both may try.
            barrier = threading.Barrier(2)
            results: list[object] = []

            def resume() -> None:
                store = Store.open(storage, name)
                strategy = get_strategy("random", problem, seed=0)
                barrier.wait()
                try:
                    results.append(run(problem, strategy, make_evaluator("inprocess"), store, budget=16,
                                       workers=2, progress=False))
                except Exception as e:  # noqa: BLE001 - anything but RunInUse fails below, with its text
                    results.append(e)

            threads = [threading.Thread(target=resume) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
            # Each either ran or was refused with RunInUse.
            assert len(results) == 2 and not [r for r in results if isinstance(r, Exception)
                                              and not isinstance(r, RunInUse)], results
            cols = Store.open(storage, name).columns()
            assert cols.counts()["n_running"] == 0
            # Both may run one after the other (the second found the first finished): never at once.
            assert int(cols.finished.sum()) == 16, cols.counts()
            done = cols.raw[cols.complete]
            assert len(np.unique(done, axis=0)) == len(done), "a configuration was evaluated twice"
    finally:
        if storage_kind == "postgresql":
            delete_runs(storage, names)


def test_a_refused_resume_exits_cleanly(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path}/r.db"
    _killed_run(storage, "r")
    store = Store.open(storage, "r")
    store.record.release("dead")
    from qd.run import _process_start, driver_identity

    me = driver_identity("someone")
    parent = {**me, "pid": os.getppid(), "pid_start": _process_start(os.getppid())[1]}  # a live process here
    assert store.record.claim("someone", parent, expected=None)
    capsys.readouterr()
    assert main(["run", "--resume", "--name", "r", "--storage", storage, "--budget", "20", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "still alive" in err and "Traceback" not in err


def test_show_reports_what_an_independently_rebuilt_archive_holds(tmp_path):
    """`qd show --json` on a batched run equals a pyribs archive filled straight from the record."""
    storage = f"sqlite:///{tmp_path}/s.db"
    assert main(["run", "--problem", "sphere", "--strategy", "map-elites", "--budget", "3000", "--evaluator",
                 "inprocess", "--storage", storage, "--name", "s", "--no-progress"]) == 0
    store = Store.open(storage, "s")
    problem = get_problem("sphere")
    shown = summary(store, problem)
    assert shown["n_complete"] == 3000
    from ribs.archives import GridArchive

    cols = store.columns()
    ribs_archive = GridArchive(solution_dim=problem.space.dim, dims=(20, 20),
                               ranges=[(m.low, m.high) for m in problem.measures])
    ok = cols.feasible
    ribs_archive.add(solution=problem.space.encode_raw(cols.raw[ok]), objective=cols.values[ok, 0],
                     measures=cols.measures[ok])
    stats = ribs_archive.stats
    assert shown["archive"]["num_elites"] == stats.num_elites
    assert shown["archive"]["qd_score"] == pytest.approx(stats.qd_score)
    assert shown["archive"]["coverage"] == pytest.approx(stats.coverage)
    # The strategy's own archive at the end of the run was the same one.
    assert EliteArchive(problem, elite_spec(problem)).n_cells == 400


@pytest.mark.parametrize("options", [{}, {"qd_score_offset": -50.0, "bins": [7, 9], "direction": "minimize"},
                                     {"learning_rate": 0.1, "threshold_min": -1000.0}])
def test_grid_figures_without_pyribs_equal_pyribs_own(options):
    """`qd show` computes a grid archive's cells and metrics with numpy (no pyribs import): they
    equal pyribs' ``index_of`` and the stats of an ``EliteArchive`` filled with the same rows,
    measures on and outside the bounds and on bin edges included, for either direction."""
    import dataclasses

    from qd.archive import grid_cells, grid_summary, spec_to_json
    from qd.columns import COMPLETE, Columns

    rng = np.random.default_rng(3)
    problem = get_problem("sphere")
    direction = options.pop("direction", None)
    spec = elite_spec(problem, **options)
    if direction:
        spec = dataclasses.replace(spec, direction=direction)
    n, k = 5000, len(problem.measures)
    lo, hi = (np.array(b) for b in zip(*[m.map_range for m in problem.measures]))
    measures = lo + rng.uniform(-0.1, 1.1, (n, k)) * (hi - lo)
    measures[:500] = lo + np.round(rng.uniform(0, 1, (500, k)) * 63) / 63 * (hi - lo)  # on bin edges
    cols = Columns.empty(problem.space.dim, 1, k, 0, n=n)
    cols.state[:] = COMPLETE
    cols.number[:] = np.arange(n)
    cols.raw[:] = problem.space.decode_raw(rng.uniform(0, 1, (n, problem.space.dim)))
    cols.values[:, 0] = rng.normal(0, 30, n)
    cols.measures[:] = measures
    cols.state[:50] = 2  # failed rows stay out
    archive = EliteArchive(problem, spec)
    assert np.array_equal(grid_cells(spec, problem, measures), archive.result.index_of(measures))
    archive.add_columns(cols)
    quick = grid_summary(problem, spec_to_json(spec), cols)
    expected = {**archive.metrics(), **archive.describe()}
    assert quick.keys() == expected.keys()
    for key, value in expected.items():
        assert quick[key] == (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value), key


@pytest.mark.parametrize("vectorised", [True, False])
def test_elites_kept_by_the_loop_are_those_found_from_the_columns(tmp_path, vectorised):
    """The run loop keeps each cell's elite row as batches arrive (the dashboard reads it); they
    are the rows ``qd.explore.elite_rows`` finds in the whole run, across a resume too."""
    from qd.explore import elite_rows
    from qd.run import Listener

    class Check(Listener):
        every_s = 0.0

        def update(self, state):
            self.close(state)

        def close(self, state):
            cols = state.columns()
            assert np.array_equal(state.elite_rows(), elite_rows(cols, state.archive))
            self.checked = getattr(self, "checked", 0) + 1

    problem = get_problem("sphere")
    problem.vectorized = vectorised
    info = RunInfo(name="e", problem="sphere", problem_options=problem.options, strategy="map-elites",
                   strategy_options={}, seed=0)
    storage = f"sqlite:///{tmp_path}/e.db"
    for budget in (300, 600):
        store = Store.create(storage, info, problem, resume=True)
        check = Check()
        run(problem, get_strategy("map-elites", problem, seed=0), make_evaluator("inprocess"), store, budget=budget,
            progress=False, listeners=[check])
        assert check.checked >= 2


def test_unknown_storage_urls_fail_cleanly(tmp_path, capsys):
    assert main(["show", "--storage", "mysql://u@h/db", "--name", "x"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_a_big_restore_inserts_each_cells_best_and_builds_the_same_archive():
    """Restoring a plain grid from many rows inserts only each cell's best (the earliest of equal
    values): the archive holds the same elites, solutions and stats as inserting every row."""
    from qd.archive import spec_to_json  # noqa: F401
    from qd.columns import COMPLETE, Columns

    problem = get_problem("sphere")
    spec = elite_spec(problem, bins=[5, 5])
    rng = np.random.default_rng(0)
    n = 2000
    cols = Columns.empty(problem.space.dim, 1, 2, 0, n=n)
    cols.state[:], cols.number[:] = COMPLETE, np.arange(n)
    cols.raw[:] = problem.space.decode_raw(rng.uniform(0, 1, (n, problem.space.dim)))
    cols.values[:, 0] = np.round(rng.normal(0, 3, n))  # many equal values: ties go to the earliest row
    cols.measures[:] = rng.uniform(-60, 60, (n, 2))
    quick = EliteArchive(problem, spec)
    quick.add_columns(cols)
    full = EliteArchive(problem, spec)
    for start in range(0, n, 50):  # batches below the threshold: every row goes to pyribs
        full.add_columns(cols.select(np.arange(start, start + 50)))
    a, b = quick.result.data(), full.result.data()
    order_a, order_b = np.argsort(a["index"]), np.argsort(b["index"])
    for key in ("index", "objective", "measures", "solution"):
        assert np.array_equal(a[key][order_a], b[key][order_b]), key
    assert quick.metrics() == pytest.approx(full.metrics())
    assert quick.n_inserted == full.n_inserted == n


def test_a_vectorised_run_tells_each_batch_before_the_next_though_it_records_them_in_blocks(tmp_path):
    """The loop records a block of batches at once (``qd.run.BLOCK_ROWS``), but each batch is
    evaluated and told to the strategy before the next is asked: the record holds exactly what
    pyribs-style ask/evaluate/tell, one batch of ``eval_batch`` at a time, proposes, numbered and
    seeded in order, and the budget's last batch is cut to size. Its metric history is the
    archive's after each batch that reaches a row's count, as one batch at a time keeps it."""
    from qd.columns import COMPLETE, Columns
    from qd.metrics import METRICS_KEY, rows_every
    from qd.run import BLOCK_ROWS, evaluation_seeds

    problem = get_problem("sphere")
    budget, eval_batch = BLOCK_ROWS + 1000, 96  # more than a block; not a multiple of the batch
    options = {"eval_batch": eval_batch}
    info = RunInfo(name="b", problem="sphere", problem_options=problem.options, strategy="map-elites",
                   strategy_options=options, seed=3)
    store = Store.create(f"sqlite:///{tmp_path}/b.db", info, problem)
    run(problem, get_strategy("map-elites", problem, seed=3, **options), make_evaluator("inprocess"), store,
        budget=budget, progress=False)
    cols = store.columns()

    by_hand = get_strategy("map-elites", problem, seed=3, **options)
    raws, number, every, history = [], 0, rows_every(budget), []
    while number < budget:
        R = by_hand.ask_raw(min(eval_batch, budget - number))
        numbers = np.arange(number, number + len(R))
        ev = problem.evaluate_batch(R, evaluation_seeds(3, numbers))
        part = Columns.empty(*cols.dims, n=len(R))
        part.number[:], part.raw[:], part.state[:] = numbers, R, COMPLETE
        part.values[:], part.measures[:] = ev.values, ev.measures
        by_hand.tell_columns(part)
        raws.append(R)
        if (number + len(R)) // every > number // every or number + len(R) == budget:
            history.append({"evaluations": number + len(R), **by_hand.archive.metrics()})
        number += len(R)
    assert len(cols) == budget and np.array_equal(cols.number, np.arange(budget))
    recorded = store.attrs()[METRICS_KEY]
    assert len(history) > budget // BLOCK_ROWS * 10  # many rows per block
    assert [r["evaluations"] for r in recorded] == [r["evaluations"] for r in history]
    for r, h in zip(recorded, history):
        assert r == pytest.approx(h)
    assert np.array_equal(cols.seed, evaluation_seeds(3, np.arange(budget)))
    assert np.array_equal(cols.raw, np.vstack(raws))


def test_the_write_ahead_log_is_checkpointed_beside_the_writer_and_stays_bounded(tmp_path, monkeypatch):
    """The record's connections make no checkpoint at a commit (it stalled the writer for a third of
    a second per 40 MB); ``qd.record.Checkpointer`` makes them in a thread of its own, and the log
    starts again instead of growing with the run."""
    import qd.record

    monkeypatch.setattr(qd.record, "WAL_AUTOCHECKPOINT_BYTES", 256 * 1024)
    problem = get_problem("sphere")
    info = RunInfo(name="w", problem="sphere", problem_options=problem.options, strategy="map-elites",
                   strategy_options={}, seed=0)
    path = tmp_path / "w.db"
    store = Store.create(f"sqlite:///{path}", info, problem)
    run(problem, get_strategy("map-elites", problem, seed=0), make_evaluator("inprocess"), store, budget=60_000,
        progress=False)
    checkpointer = store.record._checkpointer
    assert checkpointer is not None
    if checkpointer._thread is not None:
        checkpointer._thread.join()
    written = sum(len(b) for (b,) in sqlite3.connect(path).execute("SELECT data FROM qd_segments"))
    assert written > 5 * 2**20  # the run wrote many times the checkpoint interval
    # A log that was never restarted holds it all; restarted, it stays near a few checkpoint intervals
    # whatever the run's size (1.8 MB at 14 and 56 MB written here), more on a loaded machine (5 MB).
    assert os.path.getsize(f"{path}-wal") < written / 2
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA page_size").fetchone()[0] == qd.record.SQLITE_PAGE_SIZE
    assert int(Store.open(f"sqlite:///{path}", "w").columns().finished.sum()) == 60_000


def test_failures_inside_a_block_are_recorded_with_their_reasons_and_the_run_goes_on(tmp_path):
    """A vectorised batch that raises fails its rows, a row reported as failed or non-finite fails
    alone, each with its reason, wherever it falls in a block; the run still ends with its budget."""
    from problems.projection import Sphere
    from qd.problem import BatchEvaluation

    class Flaky(Sphere):
        calls = 0

        def evaluate_batch(self, X, seeds):
            Flaky.calls += 1
            if Flaky.calls % 7 == 3:
                raise RuntimeError("the batch broke")
            be = super().evaluate_batch(X, seeds)
            values = be.values.copy()
            values[0, 0] = np.nan
            errors = [None] * len(X)
            errors[-1] = "the last row broke"
            return BatchEvaluation(values=values, measures=be.measures, errors=errors)

    problem = Flaky(dim=4)
    options = {"eval_batch": 50}
    info = RunInfo(name="f", problem="sphere", problem_options={"dim": 4}, strategy="map-elites",
                   strategy_options=options, seed=0)
    store = Store.create(f"sqlite:///{tmp_path}/f.db", info, problem)
    report = run(problem, get_strategy("map-elites", problem, seed=0, **options), make_evaluator("inprocess"), store,
                 budget=2000, progress=False)
    cols = store.columns()
    assert report.finished == 2000 and int(cols.finished.sum()) == 2000 and Flaky.calls == 40
    reasons = np.array([r or "" for r in cols.reason], dtype=object)
    broken = np.flatnonzero(reasons == "exception: RuntimeError: the batch broke")
    assert len(broken) == 6 * 50 and np.all(cols.state[broken] == 2)
    batch_of = cols.number // 50
    ok_batches = np.setdiff1d(np.arange(40), np.unique(batch_of[broken]))
    first, last = ok_batches * 50, ok_batches * 50 + 49
    assert all(reasons[i].startswith("invalid result: values [nan]") for i in first)
    assert all(reasons[i] == "the last row broke" for i in last)
    assert int(cols.complete.sum()) == 2000 - 300 - 2 * len(ok_batches)


@pytest.mark.parametrize("stage_bytes", [None, 256], ids=["staged", "through-the-pipe"])
def test_cheap_flushes_go_through_the_writer_process_which_stops_with_the_run(tmp_path, monkeypatch, stage_bytes):
    """A long cheap run hands its flushes to the record writer process (``qd.record_writer``): the
    claim names it while it lives (a resume waits for it), the record holds every outcome once,
    and the process is gone when the run returns; so too when the flushes' arrays do not fit the
    staging area and go through the pipe."""
    import qd.record_writer
    import qd.store
    from qd.processes import alive
    from qd.run import Listener

    monkeypatch.setattr(qd.store, "WRITER_AFTER_S", 0.0)  # the per-configuration path starts it lazily
    if stage_bytes is not None:
        monkeypatch.setattr(qd.record_writer, "STAGE_BYTES", stage_bytes)
    problem = get_problem("sphere", dim=4)
    info = RunInfo(name="wp", problem="sphere", problem_options=problem.options, strategy="random",
                   strategy_options={}, seed=0)
    store = Store.create(f"sqlite:///{tmp_path}/wp.db", info, problem)
    seen: list[dict] = []

    class Watch(Listener):
        every_s = 0.0

        def update(self, state):
            writer = (store.record.owner()[1] or {}).get("writer")
            if writer is not None:
                seen.append(writer)
                assert alive(writer)

    report = run(problem, get_strategy("random", problem, seed=0), make_evaluator("inprocess"), store, budget=3000,
                 progress=False, listeners=[Watch()])
    assert report.finished == 3000
    assert seen, "the writer process never took a flush"
    assert not alive(seen[-1])  # it stopped with the run
    cols = Store.open(store.storage, "wp").columns()
    assert cols.counts() == {"n_complete": 3000, "n_failed": 0, "n_stale": 0, "n_running": 0}
    assert np.array_equal(cols.number, np.arange(3000))


def test_a_claim_waits_for_the_record_writer_of_a_dead_driver(tmp_path, capsys):
    """A driver's writer process may still be landing its last write when the driver is gone (where
    it does not die with its driver): the run is not taken over while it lives."""
    storage = f"sqlite:///{tmp_path}/wd.db"
    _killed_run(storage, "wd")
    store = Store.open(storage, "wd")
    from qd.processes import identity

    # The dead driver of this host, whose writer (here: this test's parent process) still runs.
    dead = {**identity(os.getpid()), "pid": 2**22 + 7, "token": "dead"}
    store.record.release("dead")
    assert store.record.claim("dead", dead, expected=None)
    store.record.note_owner("dead", "writer", identity(os.getppid()))
    capsys.readouterr()
    assert main(["run", "--resume", "--name", "wd", "--storage", storage, "--budget", "20", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "record writer" in err and "still writing" in err and "Traceback" not in err
