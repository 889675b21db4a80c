"""Sample-efficient illumination: ``sail`` against MAP-Elites, CMA-MAE and pyribs' BOP-Elites at equal evaluations.

Expensive-evaluation set-up: a few hundred evaluations (``--budget``, default 200) on low-dimensional
problems, several seeds (``--seeds``), all in one run:

- ``arm``: planar arm repertoire, 6 joints, 20x20 grid over the end effector; QD score counted from
  the lowest possible score ``(1 - pi^2) * 100`` (as in ``bench_qd.py``), so every elite counts.
- ``sphere`` and ``rastrigin``: linear projection, ``dim`` 6, 20x20 grid; QD offset 0 (the scores
  are 0-100).
- ``mixed``: ints, a log int, a categorical, a bool and floats; ``error`` over layers x log2 width
  (8x10 grid), QD offset 1.1 (the problem's reference point).

Methods, each scored the same way (its finished trials inserted in order into a fresh archive of the
same spec, ``qd.metrics.replay``):

- ``map-elites``: Gaussian mutation (``bench_qd.py``'s step sizes), 32 Sobol points first.
- ``cma-mae``: 5 CMA-ES lanes, learning rate 0.1 (0.01 is tuned for millions of evaluations).
- ``bop-elites``: pyribs' ``BayesianOptimizationEmitter`` + ``BayesianOptimizationScheduler``
  (scikit-learn GP of objective and measures, EJIE acquisition, pattern search; needs ``pymoo``),
  driven *directly* with pyribs' ask/tell at equal evaluations: batches of ``--workers`` solutions
  (its ``batch_size``), the same number of Sobol points first as ``sail``'s warm-up, ``min_obj``
  the QD offset. Solutions are in the encoded cube and evaluated as the configuration they decode
  to (rounding inside the objective for the mixed problem).
- ``sail (modelled measures)``: the ``sail`` strategy as ``qd run`` gets it for these problems
  (they do not declare ``cheap_measures``): GPs of the objective and both measures, like BOP-Elites.
- ``sail (cheap measures)``: the same problems with ``cheap_measures(config)`` declared (the
  measures are simple functions of the configuration), so only the objective is modelled.

``map-elites``, ``cma-mae`` and ``sail`` run through ``bench_qd.simulate``: ``--workers``
asynchronous workers with exponential evaluation times, exactly the ask/tell calls of ``qd run``.
``sail``'s ask latency (model-based asks: refit or condition the GPs, illuminate the acquisition,
pick a batch) is reported as mean and maximum seconds.

Usage: ``python experiments/bench_sail.py [--budget 200] [--seeds 3] [--bop-seeds 1] [--workers 4] [--only sail]``.
BOP-Elites runs ``--bop-seeds`` seeds only: pyribs' pattern search over EJIE evaluates one point
per call through scipy's frozen distributions, about 10 s per ask here, 10+ minutes per run.
Keep it on a couple of cores: torch uses one thread.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_qd import ARM_SIGMA, SPHERE_SIGMA, evaluate, mean_std, simulate  # noqa: E402

from problems.arm import Arm, arm_end_effector  # noqa: E402
from problems.mixed import Mixed  # noqa: E402
from problems.projection import Rastrigin, Sphere, projection_measures  # noqa: E402
from qd.archive import EliteSpec, build_archive, elite_spec  # noqa: E402
from qd.metrics import replay  # noqa: E402
from qd.problem import Problem  # noqa: E402
from qd.store import Trial  # noqa: E402
from qd.strategies import get_strategy  # noqa: E402

ARM_QD_OFFSET = (1 - math.pi**2) * 100


# --- the same problems, with their measures declared cheap ----------------------------------------
class CheapArm(Arm):
    def cheap_measures(self, config: dict[str, Any]) -> dict[str, float]:
        x, y = arm_end_effector(np.array([[config[f"theta{i}"] for i in range(self.dof)]]))[0]
        return {"x": float(x), "y": float(y)}


class _CheapProjection:
    def cheap_measures(self, config: dict[str, Any]) -> dict[str, float]:
        m = projection_measures(np.array([[config[f"x{i}"] for i in range(self.dim)]]))[0]  # type: ignore[attr-defined]
        return {"sum_first_half": float(m[0]), "sum_second_half": float(m[1])}


class CheapSphere(_CheapProjection, Sphere):
    pass


class CheapRastrigin(_CheapProjection, Rastrigin):
    pass


class CheapMixed(Mixed):
    def cheap_measures(self, config: dict[str, Any]) -> dict[str, float]:
        return {"layers": float(config["layers"]), "log2_width": math.log2(config["width"])}


# --- pyribs' BOP-Elites, driven directly -------------------------------------------------------------
def run_bop_elites(problem: Problem, spec: EliteSpec, budget: int, batch: int, n_init: int,
                   seed: int) -> tuple[list[Trial], list[float]]:
    """BOP-Elites at ``budget`` evaluations; returns the trials in order and the seconds of each ask."""
    from ribs.archives import GridArchive
    from ribs.emitters import BayesianOptimizationEmitter
    from ribs.schedulers import BayesianOptimizationScheduler

    d = problem.space.dim
    archive = GridArchive(solution_dim=d, dims=spec.bins, ranges=[(m.low, m.high) for m in problem.measures],
                          seed=seed)
    emitter = BayesianOptimizationEmitter(archive, bounds=[(0.0, 1.0)] * d, num_initial_samples=n_init,
                                          batch_size=batch, search_nrestarts=max(5, batch),
                                          min_obj=spec.score_factor * spec.qd_score_offset, seed=seed)
    scheduler = BayesianOptimizationScheduler(archive, [emitter])
    trials: list[Trial] = []
    asks: list[float] = []
    while len(trials) < budget:
        t0 = time.perf_counter()
        X = scheduler.ask()
        asks.append(time.perf_counter() - t0)
        last = len(X) >= budget - len(trials)
        X = X[: budget - len(trials)]
        results = [evaluate(problem, c, len(trials) + i) for i, c in enumerate(problem.space.decode_many(X))]
        trials.extend(results)
        if last:  # the budget is spent: nothing more to learn
            break
        scheduler.tell(np.array([spec.score_factor * r.values[spec.objective_index] for r in results]),
                       np.array([r.measures for r in results]))
    return trials, asks[1:]  # the first ask only returns the Sobol sample


# --- running -------------------------------------------------------------------------------------------
def run_case(title: str, problem: Problem, cheap: Problem, archive: dict[str, Any], sigma: float, budget: int,
             seeds: int, workers: int, only: str | None, bop_seeds: int,
             skip: str | None = None) -> list[tuple[str, dict[str, list[float]]]]:
    spec = elite_spec(problem, **archive)
    n_init = min(2 * (problem.space.dim + 1), 20)
    methods: dict[str, Callable[[int], tuple[list[Trial], list[float]]]] = {}

    def through_loop(p: Problem, name: str, **opts: Any) -> Callable[[int], tuple[list[Trial], list[float]]]:
        def go(seed: int) -> tuple[list[Trial], list[float]]:
            strategy = get_strategy(name, p, seed=seed, **archive, **opts)
            trials, _ = simulate(strategy, p, budget, workers, seed)
            return trials, [s for _, s in getattr(strategy, "latencies", [])]
        return go

    methods["map-elites"] = through_loop(problem, "map-elites", sigma=sigma)
    methods["cma-mae"] = through_loop(problem, "cma-mae", sigma0=sigma, learning_rate=0.1)
    methods["bop-elites (pyribs)"] = lambda seed: run_bop_elites(problem, spec, budget, workers, n_init, seed)
    methods["sail (modelled measures)"] = through_loop(problem, "sail")
    methods["sail (cheap measures)"] = through_loop(cheap, "sail")
    rows = []
    for label, go in methods.items():
        if (only and only not in label) or (skip and skip in label):
            continue
        out: dict[str, list[float]] = {"qd_score": [], "coverage": [], "best": [], "seconds": [], "ask_mean_s": [],
                                       "ask_max_s": []}
        for seed in range(min(seeds, bop_seeds) if label.startswith("bop") else seeds):
            t0 = time.perf_counter()
            trials, asks = go(seed)
            out["seconds"].append(time.perf_counter() - t0)
            final = replay(problem, trials, lambda: build_archive(problem, spec), every=budget)[-1]
            for k in ("qd_score", "coverage", "best"):
                out[k].append(final[k])
            out["ask_mean_s"].append(float(np.mean(asks)) if asks else 0.0)
            out["ask_max_s"].append(float(np.max(asks)) if asks else 0.0)
        rows.append((label, out))
        print(f"  {title} {label}: qd {mean_std(out['qd_score'])} in {np.mean(out['seconds']):.0f} s", flush=True)
    return rows


def table(title: str, rows: list[tuple[str, dict[str, list[float]]]]) -> str:
    base = dict(rows).get("map-elites")
    head = (f"\n### {title}\n\n| method | seeds | QD score | x map-elites | coverage | best | ask s (mean / max) | "
            f"run s |\n|---|---|---|---|---|---|---|---|")
    lines = []
    for name, r in rows:
        ratio = f"{np.mean(r['qd_score']) / np.mean(base['qd_score']):.2f}" if base else "-"
        ask = f"{np.mean(r['ask_mean_s']):.2f} / {np.max(r['ask_max_s']):.2f}" if np.max(r["ask_max_s"]) > 0 else "-"
        lines.append(f"| {name} | {len(r['qd_score'])} | {mean_std(r['qd_score'])} | {ratio} | "
                     f"{mean_std(r['coverage'])} | {mean_std(r['best'])} | {ask} | {np.mean(r['seconds']):.0f} |")
    return "\n".join([head, *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=6, help="joints of the arm, dimensions of sphere/rastrigin")
    parser.add_argument("--only", help="only the methods whose label contains this text")
    parser.add_argument("--skip", help="leave out the methods whose label contains this text")
    parser.add_argument("--problems", default="arm,sphere,rastrigin,mixed")
    parser.add_argument("--bop-seeds", type=int, default=1,
                        help="seeds for BOP-Elites (pyribs' pattern search takes ~10 s per ask on one core)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    d = args.dim
    cases = {
        "arm": (f"arm ({d} joints, 20x20 grid, offset (1 - pi^2) 100)", Arm(dof=d), CheapArm(dof=d),
                {"bins": [20, 20], "qd_score_offset": ARM_QD_OFFSET}, ARM_SIGMA),
        "sphere": (f"sphere (dim {d}, 20x20 grid)", Sphere(dim=d), CheapSphere(dim=d), {"bins": [20, 20]},
                   SPHERE_SIGMA),
        "rastrigin": (f"rastrigin (dim {d}, 20x20 grid)", Rastrigin(dim=d), CheapRastrigin(dim=d),
                      {"bins": [20, 20]}, SPHERE_SIGMA),
        "mixed": ("mixed (error over layers x log2 width, 8x10 grid, offset 1.1)", Mixed(), CheapMixed(),
                  {"bins": [8, 10], "objective": "error"}, 0.1),
    }
    tables = []
    for key in args.problems.split(","):
        title, problem, cheap, archive, sigma = cases[key]
        rows = run_case(title, problem, cheap, archive, sigma, args.budget, args.seeds, args.workers, args.only,
                        args.bop_seeds, args.skip)
        tables.append(table(f"{title}: {args.budget} evaluations, {args.workers} workers, {args.seeds} seeds", rows))
        print(tables[-1], flush=True)
    print("\n## all\n" + "\n".join(tables))
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
