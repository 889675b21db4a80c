"""Quality-diversity benchmark: MAP-Elites, CMA-ME and CMA-MAE at equal evaluations; worker idleness.

Three parts (``--part``; all by default):

- ``illumination``: sphere with linear projection (pyribs' tutorial set-up, ``dim`` 20) and the
  planar arm repertoire (12 joints), ``map-elites`` (Gaussian and iso-line), ``cma-me`` and
  ``cma-mae`` at equal evaluations over several seeds; QD score and coverage, mean +- std.
  pyribs' published ranking on sphere is CMA-MAE > CMA-ME > MAP-Elites (after millions of
  evaluations); this checks what a few thousand give here.
- ``mixed``: the ``mixed`` problem (ints, a log int, a categorical, a bool, floats), illuminating
  ``error`` over depth x log2 width; ``map-elites`` and ``cma-me`` against ``random`` search
  inserted into the same archive.
- ``idleness``: the fraction of worker time spent waiting for the strategy, for the lanes of
  ``qd.strategies.illumination`` against pyribs' ``Scheduler`` used as documented (ask every
  emitter, evaluate the whole batch, tell), at 4 and 16 workers.

Every run is driven by a discrete-event simulation of ``--workers`` asynchronous workers whose
evaluation times are exponential (mean 1): a worker asks as soon as it is free, results come back
out of order, and the strategy sees exactly the ask/tell calls of ``qd run``; the objective itself
is the problem's real ``evaluate``. (The store is left out: with SQLite it costs tens of
milliseconds per evaluation, which would dominate these microsecond evaluations; see the
run-loop timing in the report.) Metrics are computed the same way for every method: the finished
trials are inserted in order into a fresh archive of the run's spec (``qd.metrics.replay``).

Encoded-space step sizes follow pyribs' tutorials converted to the unit cube: sphere
``sigma = 0.5 / 10.24``, iso-line ``iso_sigma = 0.1 / 10.24``; arm ``0.1`` rad over the ``2 pi``
range. The arm's QD score counts from the lowest possible score, ``(1 - pi^2) * 100``.

Usage: ``python experiments/bench_qd.py [--part illumination|mixed|idleness] [--seeds 3]
[--budget 5000] [--workers 4] [--only LABEL]``. Runs are seeded, so a method's numbers do not
depend on which other methods run.
"""

from __future__ import annotations

import argparse
import heapq
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from ribs.schedulers import Scheduler

from qd.archive import build_archive
from qd.metrics import replay
from qd.problem import Problem
from qd.registry import get_problem
from qd.space import Config
from qd.store import Trial
from qd.strategies import get_strategy
from qd.strategies.illumination import _Illumination
from qd.strategy import Strategy

SPHERE_SIGMA = 0.5 / 10.24
SPHERE_ISO_SIGMA = 0.1 / 10.24
ARM_SIGMA = 0.1 / (2 * math.pi)
ARM_QD_OFFSET = (1 - math.pi**2) * 100


class SchedulerBarrier(Strategy):
    """Baseline: pyribs' ``Scheduler`` over the same emitters, with its documented barrier.

    ``scheduler.ask()`` gives one batch from every emitter; its solutions are handed out as asked
    and nothing more until all of them are told, then ``scheduler.tell`` inserts and updates.
    """

    def __init__(self, inner: _Illumination):
        super().__init__(inner.problem, inner.seed)
        self.archive = inner.archive
        inner._build_lanes()
        result = self.archive.result if self.archive.result is not self.archive.archive else None
        self.scheduler = Scheduler(self.archive.archive, [lane.emitter for lane in inner._lanes], result_archive=result)
        self._configs: list[Config] = []
        self._results: list[Trial | None] = []
        self._handed = 0
        self._slots: dict[bytes, list[int]] = {}

    def ask(self, n: int, pending: Sequence[Config] = ()) -> list[Config]:
        if not self._configs:
            X = self.scheduler.ask()
            self._configs = self.space.decode_many(X)
            self._results, self._handed, self._slots = [None] * len(X), 0, {}
        out = []
        while len(out) < n and self._handed < len(self._configs):
            config = self._configs[self._handed]
            self._slots.setdefault(self.space.key(config), []).append(self._handed)
            self._handed += 1
            out.append(config)
        return out

    def tell(self, trial: Trial) -> None:
        self._results[self._slots[self.space.key(trial.params)].pop(0)] = trial
        if all(r is not None for r in self._results):
            sign, i = self.archive.spec.score_factor, self.archive.spec.objective_index
            self.scheduler.tell(np.array([sign * r.values[i] for r in self._results]),
                                np.array([r.measures for r in self._results]))
            self._configs = []


def evaluate(problem: Problem, config: Config, number: int) -> Trial:
    try:
        values, measures, constraints = problem.normalise(problem.evaluate(config, number))
    except Exception as e:  # a failed evaluation, as the run loop records it
        return Trial(number=number, params=config, state="failed", reason=str(e))
    return Trial(number=number, params=config, state="complete", values=values, measures=measures,
                 constraints=constraints)


def simulate(strategy: Strategy, problem: Problem, budget: int, workers: int, seed: int) -> tuple[list[Trial], float]:
    """Run ``budget`` evaluations on ``workers`` simulated asynchronous workers.

    Returns the finished trials in creation order and the idle fraction: worker time spent with
    budget left but no configuration from the strategy, over ``workers`` x the makespan.
    """
    rng = np.random.default_rng([seed, 99])
    now, idle, launched, finished = 0.0, 0.0, 0, 0
    running: list[tuple[float, int, Config]] = []
    trials: dict[int, Trial] = {}
    while finished < budget:
        free = min(workers - len(running), budget - launched)
        if free > 0:
            for config in strategy.ask(free, [c for _, _, c in running])[:free]:
                heapq.heappush(running, (now + rng.exponential(1.0), launched, config))
                launched += 1
        if not running:
            raise RuntimeError(f"{strategy.name}: nothing to evaluate and nothing running")
        end, number, config = heapq.heappop(running)
        waiting = min(workers - len(running) - 1, budget - launched)  # workers with work left but none given
        idle += max(waiting, 0) * (end - now)
        now = end
        trial = evaluate(problem, config, number)
        trials[number] = trial
        strategy.tell(trial)
        finished += 1
    return [trials[n] for n in sorted(trials)], idle / (workers * now)


def mean_std(xs: Sequence[float]) -> str:
    return f"{np.mean(xs):.4g} ± {np.std(xs):.2g}"


def run_method(problem: Problem, make: Callable[[int], Strategy], seeds: int, budget: int, workers: int,
               spec_of: Callable[[Strategy], Any]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"qd_score": [], "coverage": [], "norm_qd_score": [], "best": [], "idle": [],
                                   "seconds": []}
    for seed in range(seeds):
        strategy = make(seed)
        t0 = time.perf_counter()
        trials, idle = simulate(strategy, problem, budget, workers, seed)
        seconds = time.perf_counter() - t0
        spec = spec_of(strategy)
        final = replay(problem, trials, lambda: build_archive(problem, spec), every=budget)[-1]
        for k in ("qd_score", "coverage", "norm_qd_score", "best"):
            out[k].append(final[k])
        out["idle"].append(idle)
        out["seconds"].append(seconds)
    return out


def table(title: str, rows: list[tuple[str, dict[str, list[float]]]], columns: Sequence[str]) -> str:
    head = f"\n### {title}\n\n| method | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns)
    lines = [f"| {name} | " + " | ".join(mean_std(r[c]) for c in columns) + " |" for name, r in rows]
    return "\n".join([head, *lines])


def part_illumination(seeds: int, budget: int, workers: int, only: str | None = None) -> None:
    cases = [
        ("sphere (dim 20, 50x50 grid)", get_problem("sphere", dim=20),
         {"bins": [50, 50]}, SPHERE_SIGMA, SPHERE_ISO_SIGMA),
        ("arm (12 joints, 50x50 grid)", get_problem("arm", dof=12),
         {"bins": [50, 50], "qd_score_offset": ARM_QD_OFFSET}, ARM_SIGMA, ARM_SIGMA / 5),
    ]
    for title, problem, archive, sigma, iso_sigma in cases:
        methods = {
            "map-elites (gaussian)": dict(name="map-elites", sigma=sigma),
            "map-elites (iso-line)": dict(name="map-elites", operator="iso-line", iso_sigma=iso_sigma, line_sigma=0.2),
            "cma-me": dict(name="cma-me", sigma0=sigma),
            "cma-mae": dict(name="cma-mae", sigma0=sigma),
            # pyribs' learning rate 0.01 is tuned for millions of evaluations; thresholds move faster at 0.1.
            "cma-mae (learning_rate 0.1)": dict(name="cma-mae", sigma0=sigma, learning_rate=0.1),
        }
        rows = []
        for label, opts in methods.items():
            if only and only not in label:
                continue
            opts = dict(opts)
            name = opts.pop("name")
            result = run_method(problem, lambda s: get_strategy(name, problem, seed=s, **archive, **opts), seeds, budget,
                                workers, lambda st: st.spec)
            rows.append((label, result))
            print(f"  {title} {label}: {mean_std(result['qd_score'])} in {np.mean(result['seconds']):.1f} s", flush=True)
        print(table(f"{title}: {budget} evaluations, {workers} async workers, {seeds} seeds", rows,
                    ["qd_score", "coverage", "norm_qd_score", "best"]), flush=True)


def part_mixed(seeds: int, budget: int, workers: int) -> None:
    problem = get_problem("mixed")
    archive = {"bins": [8, 10], "objective": "error"}  # layers 1..8, log2 width 4..9
    probe = get_strategy("map-elites", problem, **archive)
    rows = []
    for label, name, opts in [("random", "random", {}), ("map-elites", "map-elites", archive),
                              ("map-elites (iso-line)", "map-elites", {**archive, "operator": "iso-line",
                                                                         "iso_sigma": 0.05}),
                              ("cma-me", "cma-me", archive), ("cma-mae", "cma-mae", archive)]:
        result = run_method(problem, lambda s: get_strategy(name, problem, seed=s, **opts), seeds, budget, workers,
                            lambda st: probe.spec)
        rows.append((label, result))
        print(f"  mixed {label}: {mean_std(result['qd_score'])}", flush=True)
    print(table(f"mixed (error over layers x log2 width, 8x10 grid, QD offset 1.1): {budget} evaluations, "
                f"{workers} async workers, {seeds} seeds", rows, ["qd_score", "coverage", "best"]), flush=True)


def part_idleness(seeds: int, budget: int) -> None:
    problem = get_problem("sphere", dim=20)
    archive = {"bins": [50, 50]}
    rows = []
    for workers in (4, 16):
        for label, make in [
            ("cma-me, lanes", lambda s: get_strategy("cma-me", problem, seed=s, sigma0=SPHERE_SIGMA, **archive)),
            ("cma-me, pyribs Scheduler barrier",
             lambda s: SchedulerBarrier(get_strategy("cma-me", problem, seed=s, sigma0=SPHERE_SIGMA, **archive))),
            ("cma-mae, lanes", lambda s: get_strategy("cma-mae", problem, seed=s, sigma0=SPHERE_SIGMA, **archive)),
            ("cma-mae, pyribs Scheduler barrier",
             lambda s: SchedulerBarrier(get_strategy("cma-mae", problem, seed=s, sigma0=SPHERE_SIGMA, **archive))),
            ("map-elites (steady state)", lambda s: get_strategy("map-elites", problem, seed=s, sigma=SPHERE_SIGMA,
                                                                 **archive)),
        ]:
            result = run_method(problem, make, seeds, budget, workers, lambda st: st.archive.spec)
            rows.append((f"{label}, {workers} workers", result))
            print(f"  idleness {label} {workers}: {mean_std(result['idle'])}", flush=True)
    print(table(f"worker idleness, sphere dim 20: {budget} evaluations, exponential evaluation times, {seeds} seeds",
                rows, ["idle", "qd_score", "coverage"]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("illumination", "mixed", "idleness", "all"), default="all")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=5000)
    parser.add_argument("--mixed-budget", type=int, default=2000)
    parser.add_argument("--idle-budget", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--only", help="illumination part: only the methods whose label contains this text")
    args = parser.parse_args()
    t0 = time.perf_counter()
    if args.part in ("illumination", "all"):
        part_illumination(args.seeds, args.budget, args.workers, args.only)
    if args.part in ("mixed", "all"):
        part_mixed(args.seeds, args.mixed_budget, args.workers)
    if args.part in ("idleness", "all"):
        part_idleness(args.seeds, args.idle_budget)
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
