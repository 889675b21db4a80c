"""Scale of the record path: qd against bare pyribs and bare Optuna in the same run.

Parts (each prints its table as it finishes):

1. ``vectorised``: MAP-Elites on sphere-20D (vectorised problem, in-process evaluator, SQLite) at
   each size in ``--sizes``, each as its own ``qd run`` process: evaluations/s, ms per evaluation,
   driver peak RSS, store size, time to resume (one more evaluation) and to ``qd show --json``;
   against bare pyribs (the same GridArchive, GaussianEmitter, batch size and function, in this
   process) and bare Optuna (RandomSampler, ask/tell on a SQLite study, for at most
   ``--optuna-seconds``).
2. ``per-config``: the same run with the problem's vectorised path switched off (one Python
   configuration per evaluation): ms per evaluation.
3. ``workers``: driver overhead of the process (and, with ``--ray``, Ray) evaluator against a bare
   ``ProcessPoolExecutor`` (bare Ray tasks) on the same cheap function with 2 workers.
4. ``simulated``: the driver alone with 1,000 simulated workers, lognormal durations of mean 10 s:
   sustained records/s and worker idleness over ``--sim-seconds``.

    python experiments/bench_scale.py --sizes 10000 100000 1000000
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluators.base import Evaluator, Job, Outcome  # noqa: E402
from qd.problem import Problem  # noqa: E402
from qd.registry import get_problem  # noqa: E402


def _qd(args: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run ``qd ARGS`` in a fresh process: (wall s, its peak RSS in MB, stdout)."""
    t0 = time.perf_counter()
    code = ("import resource, sys; from qd.cli import main; rc = main(sys.argv[1:]); "
            "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"qd {' '.join(args)} failed ({out.returncode}): {out.stderr[-2000:]}")
    rss = [line for line in out.stderr.splitlines() if line.startswith("PEAK_RSS_KB")]
    return wall, (int(rss[-1].split()[1]) / 1024 if rss else float("nan")), out.stdout


def bare_pyribs(n: int, batch: int = 256, seed: int = 0) -> float:
    """Evaluations/s of pyribs' own Scheduler loop: the archive and emitter qd's map-elites builds,
    with the batch it hands a vectorised problem (``eval_batch``, 256 by default)."""
    from ribs.archives import GridArchive
    from ribs.emitters import GaussianEmitter
    from ribs.schedulers import Scheduler

    problem = get_problem("sphere", dim=20)
    d = problem.space.dim
    archive = GridArchive(solution_dim=d, dims=(20, 20), ranges=[(m.low, m.high) for m in problem.measures],
                          seed=seed)
    emitter = GaussianEmitter(archive, sigma=0.1, x0=np.full(d, 0.5), bounds=[(0.0, 1.0)] * d, batch_size=batch,
                              seed=seed)
    scheduler = Scheduler(archive, [emitter])
    lo = np.array([p.low for p in problem.space.params])
    hi = np.array([p.high for p in problem.space.params])
    seeds = np.zeros(batch, dtype=np.int64)
    t0 = time.perf_counter()
    for _ in range(n // batch):
        X = scheduler.ask()
        ev = problem.evaluate_batch(np.clip(lo + X * (hi - lo), lo, hi), seeds)
        scheduler.tell(ev.values[:, 0], ev.measures)
    return (n // batch) * batch / (time.perf_counter() - t0)


def bare_optuna(n: int, seconds: float, path: str) -> float:
    """Evaluations/s of Optuna's own ask/tell loop on a SQLite study (RandomSampler, sphere-20D)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    problem = get_problem("sphere", dim=20)
    study = optuna.create_study(storage=f"sqlite:///{path}", direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    done, t0 = 0, time.perf_counter()
    while done < n and time.perf_counter() - t0 < seconds:
        trial = study.ask()
        config = problem.space.suggest(trial)
        ev = problem.evaluate(config, 0)
        trial.set_user_attr("measures", list(ev.measures))
        study.tell(trial, ev.values[0])
        done += 1
    return done / (time.perf_counter() - t0)


def part_vectorised(sizes: list[int], optuna_s: float, tmp: Path, repeats: int = 2) -> None:
    print(f"\n## vectorised: map-elites, sphere-20D, in-process, SQLite (qd: the run loop's own time, as `qd run` "
          f"reports it; peak RSS of the whole `qd run` process; qd and bare pyribs: the best of {repeats} runs each, "
          f"interleaved)")
    print("| evaluations | qd eval/s | bare pyribs eval/s | qd / pyribs | qd ms/eval | bare Optuna eval/s | "
          "qd / Optuna | driver peak RSS MB | store MB | resume s | qd show s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        qd_rates, ribs_rates, rss = [], [], 0.0
        for r in range(repeats):  # each run its own store; the first one is resumed and shown below
            url = f"sqlite:///{tmp / f'scale{n}-{r}.db'}"
            args = ["run", "--problem", "sphere", "--strategy", "map-elites", "--budget", str(n), "--evaluator",
                    "inprocess", "--storage", url, "--name", "big", "--no-progress"]
            _, peak, out = _qd(args)
            rss = max(rss, peak)
            qd_rates.append(n / float(re.search(r"failed in ([0-9.]+) s", out).group(1)))
            ribs_rates.append(bare_pyribs(n))
        qd_rate, ribs_rate = max(qd_rates), max(ribs_rates)
        url = f"sqlite:///{tmp / f'scale{n}-0.db'}"
        opt_rate = bare_optuna(n, optuna_s, str(tmp / f"optuna{n}.db"))
        size_mb = sum(p.stat().st_size for p in tmp.glob(f"scale{n}-0.db*")) / 2**20
        resume_wall, _, _ = _qd(["run", "--resume", "--name", "big", "--storage", url, "--budget", str(n + 1),
                                 "--evaluator", "inprocess", "--no-progress"])  # as the run was made
        show_wall, _, out = _qd(["show", "--storage", url, "--name", "big", "--json"])
        complete = json.loads(out)["n_complete"]
        assert complete == n + 1, complete
        print(f"| {n:,} | {qd_rate:,.0f} | {ribs_rate:,.0f} | {qd_rate / ribs_rate:.2f} | {1e3 / qd_rate:.3f} | "
              f"{opt_rate:,.1f} | {qd_rate / opt_rate:,.0f}x | {rss:,.0f} | {size_mb:,.1f} | {resume_wall:.1f} | "
              f"{show_wall:.1f} |", flush=True)


def part_per_config(n: int, tmp: Path) -> None:
    """The in-process path with one configuration at a time (the problem's batch path off)."""
    from evaluators import make_evaluator
    from qd.run import run
    from qd.store import RunInfo, Store
    from qd.strategies import get_strategy

    problem = get_problem("sphere", dim=20)
    problem.vectorized = False  # this instance only
    info = RunInfo(name="scalar", problem="sphere", problem_options=problem.options, strategy="map-elites",
                   strategy_options={}, seed=0)
    store = Store.create(f"sqlite:///{tmp}/scalar.db", info, problem)
    t0 = time.perf_counter()
    run(problem, get_strategy("map-elites", problem, seed=0), make_evaluator("inprocess"), store, budget=n,
        progress=False)
    ms = (time.perf_counter() - t0) / n * 1e3
    print(f"\n## per-config: map-elites, sphere-20D, in-process, one configuration per evaluation\n"
          f"{n:,} evaluations: {ms:.3f} ms per evaluation (target at most 2 ms)", flush=True)


def _cheap(x: float) -> float:
    return (x - 0.3) ** 2


def _steady_ms(finished_at: np.ndarray, skip: float = 0.1) -> float:
    """ms per evaluation in steady state: over the completions after the first ``skip`` share
    (worker start-up and first imports are paid once, by a run of any length)."""
    t = np.sort(np.asarray(finished_at, dtype=float))
    k = int(len(t) * skip)
    return (t[-1] - t[k]) / (len(t) - 1 - k) * 1e3


def _bare_pool(n: int) -> float:
    """ProcessPoolExecutor with two evaluations in flight, as the run loop keeps two (2 workers)."""
    done_at = []
    with ProcessPoolExecutor(2) as pool:
        pending: set = set()
        for x in np.random.default_rng(0).random(n).tolist():
            pending.add(pool.submit(_cheap, x))
            if len(pending) >= 2:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                done_at += [time.perf_counter()] * len(finished)
        wait(pending)
        done_at += [time.perf_counter()] * len(pending)
    return _steady_ms(np.array(done_at))


def _bare_ray(n: int) -> float:
    """Ray tasks with two in flight (``ray.wait`` for one, then submit the next)."""
    import ray

    task = ray.remote(num_cpus=1)(_cheap)
    done_at, pending = [], []
    for x in np.random.default_rng(0).random(n).tolist():
        pending.append(task.remote(x))
        if len(pending) >= 2:
            finished, pending = ray.wait(pending, num_returns=1)
            ray.get(finished)
            done_at.append(time.perf_counter())
    for ref in pending:
        ray.get(ref)
        done_at.append(time.perf_counter())
    return _steady_ms(np.array(done_at))


def _qd_workers(kind: str, n: int, tmp: Path, **options) -> float:
    """qd's run loop on the ``kind`` evaluator, 2 workers: steady-state ms per evaluation from the
    record's own timestamps (when the driver recorded each outcome)."""
    from evaluators import make_evaluator
    from qd.run import run
    from qd.store import RunInfo, Store
    from qd.strategies import get_strategy

    problem = get_problem("faulty", weights={"ok": 1}, sleep_s=0.0)
    name = f"w-{kind}-{'-'.join(f'{k}{v}' for k, v in options.items())}-{time.monotonic_ns()}"
    info = RunInfo(name=name, problem="faulty", problem_options=problem.options, strategy="random",
                   strategy_options={}, seed=0)
    store = Store.create(f"sqlite:///{tmp}/workers.db", info, problem)
    run(problem, get_strategy("random", problem, seed=0), make_evaluator(kind, **options), store, budget=n, workers=2,
        progress=False)
    cols = store.columns()
    return _steady_ms(cols.t_end[cols.finished])


def part_workers(n: int, tmp: Path, with_ray: bool, repeats: int = 2) -> None:
    """Driver overhead per evaluation: qd's process (Ray) evaluator against the bare pool (tasks),
    both in steady state on a microsecond function, so what is measured is the driver's cost."""
    # Each side ``repeats`` times, interleaved, and the least of each kept: the load of a shared
    # machine comes and goes.
    bare_pool, ours = [], []
    for _ in range(repeats):
        bare_pool.append(_bare_pool(n))
        ours.append(_qd_workers("process", n, tmp))
    rows = [("process", min(ours), "ProcessPoolExecutor", min(bare_pool))]
    if with_ray:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # qd's evaluator joins this Ray
        try:
            bare, actors, tasks = [], [], []
            for _ in range(repeats):
                bare.append(_bare_ray(n))
                actors.append(_qd_workers("ray", n, tmp))
                tasks.append(_qd_workers("ray", n, tmp, mode="task"))
            rows.append(("ray (actors, the default)", min(actors), "Ray tasks", min(bare)))
            rows.append(("ray (mode=task)", min(tasks), "Ray tasks", min(bare)))
        finally:
            ray.shutdown()
    print(f"\n## workers: driver overhead per evaluation, 2 workers, a microsecond function, {n:,} evaluations "
          f"(steady state: after the first 10%; the least of {repeats} runs each, interleaved)")
    print("| evaluator | qd ms/eval | peer | peer ms/eval | qd / peer |")
    print("|---|---|---|---|---|")
    for kind, ours, peer, bare_ms in rows:
        print(f"| {kind} | {ours:.3f} | {peer} | {bare_ms:.3f} | {ours / bare_ms:.2f} |", flush=True)


class SimulatedEvaluator(Evaluator):
    """Evaluations that take lognormal wall times (mean ``mean_s``) on ``workers`` simulated
    workers; the result is the problem's, computed when the evaluation is due. Measures idleness:
    the time workers spend between finishing one evaluation and receiving the next."""

    name = "simulated"

    def __init__(self, mean_s: float = 10.0, sigma: float = 0.5, seed: int = 0):
        self.mean_s, self.sigma = mean_s, sigma
        self.rng = np.random.default_rng(seed)
        self.mu = np.log(mean_s) - sigma**2 / 2
        self.heap: list[tuple[float, int, Job]] = []
        self.free_since: list[float] = []
        self.idle_s = 0.0
        self.busy_s = 0.0
        self.gaps: list[tuple[float, float]] = []  # (worker freed, next job given)
        self.finished_at: list[float] = []
        self.durations: list[float] = []  # in the order drawn (submitted)

    def start(self, problem: Problem, workers: int, timeout_s: float | None = None) -> None:
        self.problem, self.workers = problem, workers
        self.t0 = time.monotonic()
        self.free_since = [self.t0] * workers

    def submit(self, job: Job) -> None:
        now = time.monotonic()
        freed = self.free_since.pop()
        self.idle_s += now - freed
        self.gaps.append((freed, now))
        duration = float(self.rng.lognormal(self.mu, self.sigma))
        self.busy_s += duration
        self.durations.append(duration)
        heapq.heappush(self.heap, (now + duration, job.key, job))

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        if not self.heap:
            return []
        due = self.heap[0][0]
        now = time.monotonic()
        if due > now:
            time.sleep(min(due - now, timeout if timeout is not None else due - now))
        now = time.monotonic()
        out = []
        while self.heap and self.heap[0][0] <= now:
            t, _, job = heapq.heappop(self.heap)
            self.free_since.append(t)
            self.finished_at.append(t)
            out.append(Outcome(job.key, self.problem.evaluate(job.config, job.seed), metadata={"wall_time_s": 0.0}))
        return out

    def close(self) -> None:
        self.heap.clear()

    def no_overhead_finishes(self, until: float) -> list[float]:
        """When the same durations, in the order drawn, finish under a driver with no overhead:
        every worker starts at the start and gets its next job the moment it is free (durations
        drawn afresh, from the same distribution, once the recorded ones run out before ``until``)."""
        free = [0.0] * self.workers
        heapq.heapify(free)
        rng, out, k = np.random.default_rng(1), [], 0
        while free[0] < until:
            d = self.durations[k] if k < len(self.durations) else float(rng.lognormal(self.mu, self.sigma))
            k += 1
            t = heapq.heappop(free) + d
            heapq.heappush(free, t)
            out.append(t)
        return out


def part_simulated(seconds: float, tmp: Path, workers: int = 1000, mean_s: float = 10.0) -> None:
    from qd.run import run
    from qd.store import RunInfo, Store
    from qd.strategies import get_strategy

    problem = get_problem("sphere", dim=20)
    info = RunInfo(name="sim", problem="sphere", problem_options=problem.options, strategy="map-elites",
                   strategy_options={}, seed=0)
    store = Store.create(f"sqlite:///{tmp}/sim.db", info, problem)
    evaluator = SimulatedEvaluator(mean_s=mean_s)
    t0 = time.perf_counter()
    report = run(problem, get_strategy("map-elites", problem, seed=0), evaluator, store, budget=10**9,
                 workers=workers, time_limit_s=seconds, progress=False)
    wall = time.perf_counter() - t0
    # Steady state: the second half of the run (the first evaluations take mean_s to finish).
    start = evaluator.t0 + seconds / 2
    end = evaluator.t0 + seconds
    done = sum(start <= t < end for t in evaluator.finished_at)
    # The peer: the same durations under a driver with no overhead, counted in the same window (a
    # window of finite length started from all workers starting at once finishes a little fewer
    # than workers / mean per second, whatever the driver).
    peer = sum(seconds / 2 <= t < seconds for t in evaluator.no_overhead_finishes(seconds))
    idle = sum(max(0.0, min(b, end) - max(a, start)) for a, b in evaluator.gaps)
    # Workers never idle finish workers / E[duration] per second: with the durations actually drawn
    # (their mean is not exactly mean_s), that is the most any driver could record.
    drawn = evaluator.busy_s / max(1, len(evaluator.gaps))
    print(f"\n## simulated: {workers} workers, lognormal durations mean {mean_s} s, {seconds:.0f} s of wall time "
          f"(steady state: the second half)\n"
          f"records/s sustained {done / (end - start):.1f} (ideal {workers / mean_s:.0f}; with the durations drawn, "
          f"mean {drawn:.3f} s: {workers / drawn:.1f}; a driver with no overhead on the same durations, same window: "
          f"{peer / (end - start):.1f}, ratio {done / max(peer, 1):.3f}); worker idleness {idle / (workers * (end - start)):.2%}; "
          f"{report.finished} recorded in all, {store.n_flushes} flushes, loop wall {wall:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--optuna-seconds", type=float, default=30.0)
    parser.add_argument("--per-config", type=int, default=5_000)
    parser.add_argument("--workers-n", type=int, default=1_000)
    parser.add_argument("--ray", action="store_true")
    parser.add_argument("--sim-seconds", type=float, default=60.0)
    parser.add_argument("--sim-means", type=float, nargs="+", default=[10.0],
                        help="mean evaluation seconds of the simulated workers (one simulation each; "
                             "a short one shows the driver's headroom)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of qd and of its peer at each point; the best "
                        "of each is printed")
    parser.add_argument("--skip", nargs="*", default=[], choices=["vectorised", "per-config", "workers", "simulated"])
    args = parser.parse_args()
    load = os.getloadavg()[0]
    print(f"# bench_scale: {os.cpu_count()} cores, load average {load:.1f} at start")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "vectorised" not in args.skip:
            part_vectorised(args.sizes, args.optuna_seconds, tmp, args.repeats)
        if "per-config" not in args.skip:
            part_per_config(args.per_config, tmp)
        if "workers" not in args.skip:
            part_workers(args.workers_n, tmp, args.ray, args.repeats)
        if "simulated" not in args.skip:
            for mean_s in args.sim_means:
                (tmp / f"sim{mean_s}").mkdir()
                part_simulated(args.sim_seconds, tmp / f"sim{mean_s}", mean_s=mean_s)


if __name__ == "__main__":
    main()
