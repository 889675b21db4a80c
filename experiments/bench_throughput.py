"""Throughput of the run loop against the ideal, and against Ray Tune with OptunaSearch as the peer.

The load: N evaluations on K workers, each sleeping for a heterogeneous time drawn from a
lognormal distribution with the given mean (default 1 s, sigma 0.5). A sleep costs no CPU, so the
numbers measure scheduling, not the machine's speed. An evaluation's duration is a hash of its
configuration mapped through the lognormal quantile function, so it does not depend on which
searcher proposed it, and every method sees the same distribution.

For each method, with ``wall`` the time from the start of the run to its last result and ``d_i``
the durations actually slept:

- achieved throughput = N / wall;
- ideal throughput = K / mean(d_i) (K workers never idle, no overhead);
- efficiency = achieved / ideal = sum(d_i) / (K * wall).

Methods (``--methods``):

- ``process``: ``qd.run`` with the process pool;
- ``ray``: ``qd.run`` with the Ray evaluator, actors (one per worker);
- ``ray-task``: ``qd.run`` with the Ray evaluator, one task per evaluation;
- ``tune``: Ray Tune, ``OptunaSearch`` (TPE), ``max_concurrent_trials=K``, its defaults otherwise;
- ``tune-reuse``: the same with ``reuse_actors=True`` (Tune's own way to cut per-trial start-up).

Our loop uses the ``tpe`` strategy by default, so both sides pay for TPE's proposals. Ray is
started once, before the Ray-based methods; its start-up is reported, not counted. Worker start-up
(processes, actors) is counted: it is part of a run.

    python experiments/bench_throughput.py --workers 2 --n 100 --out bench.json
    python experiments/bench_throughput.py --workers 16 --n 400    # on a machine with 16+ cores
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from qd.problem import Evaluation, Objective, Problem, Resources  # noqa: E402
from qd.space import Config, Float, Space  # noqa: E402

METHODS = ("process", "ray", "ray-task", "tune", "tune-reuse")


def lognormal_duration(x: float, z: float, mean_s: float, sigma: float) -> float:
    """A duration drawn from LogNormal(mu, sigma) with the given mean, by hashing the configuration."""
    digest = hashlib.blake2b(f"{x!r},{z!r}".encode(), digest_size=8).digest()
    u = (int.from_bytes(digest, "big") + 0.5) / 2**64  # uniform in (0, 1)
    mu = math.log(mean_s) - sigma**2 / 2
    return math.exp(mu + sigma * statistics.NormalDist().inv_cdf(u))


def loss(x: float, z: float) -> float:
    return (x - 0.3) ** 2 + (z - 0.6) ** 2


class SleepProblem(Problem):
    """Sleeps a lognormal time (a hash of the configuration) and returns a smooth loss."""

    name = "bench-sleep"

    def __init__(self, mean_s: float = 1.0, sigma: float = 0.5):
        self.mean_s, self.sigma = mean_s, sigma
        self.space = Space([Float("x", 0.0, 1.0), Float("z", 0.0, 1.0)])
        self.objectives = (Objective("loss", "minimize"),)
        self.resources = Resources(cpus=1)
        self.options = {"mean_s": mean_s, "sigma": sigma}

    def evaluate(self, config: Config, seed: int) -> Evaluation:
        d = lognormal_duration(config["x"], config["z"], self.mean_s, self.sigma)
        time.sleep(d)
        return Evaluation(values=[loss(config["x"], config["z"])], metadata={"duration_s": d})


def _summary(method: str, n: int, workers: int, wall_s: float, durations: list[float], **extra: Any) -> dict[str, Any]:
    mean_d = statistics.fmean(durations)
    ideal = workers / mean_d
    achieved = len(durations) / wall_s
    return {"method": method, "n": len(durations), "requested": n, "workers": workers, "wall_s": wall_s,
            "mean_duration_s": mean_d, "achieved_per_s": achieved, "ideal_per_s": ideal,
            "efficiency": achieved / ideal, **extra}


def bench_qd(method: str, n: int, workers: int, mean_s: float, sigma: float, strategy: str,
             tmp: Path) -> dict[str, Any]:
    from evaluators import make_evaluator
    from qd.run import run
    from qd.store import RunInfo, Store
    from qd.strategies import get_strategy

    problem = SleepProblem(mean_s, sigma)
    storage = f"sqlite:///{tmp}/{method}.db"
    info = RunInfo(name=method, problem=problem.name, problem_options=problem.options, strategy=strategy,
                   strategy_options={}, seed=0)
    store = Store.create(storage, info, problem)
    evaluator = {"process": lambda: make_evaluator("process"),
                 "ray": lambda: make_evaluator("ray", mode="actor"),
                 "ray-task": lambda: make_evaluator("ray", mode="task")}[method]()
    t0 = time.perf_counter()
    report = run(problem, get_strategy(strategy, problem, seed=0), evaluator, store, budget=n, workers=workers,
                 progress=False)
    wall = time.perf_counter() - t0
    trials = store.trials(["complete"])
    if report.complete != n:
        raise RuntimeError(f"{method}: {report.complete} of {n} evaluations complete; failures: "
                           f"{[t.reason for t in store.trials(['failed'])][:3]}")
    return _summary(method, n, workers, wall, [t.metadata["duration_s"] for t in trials], strategy=strategy)


def bench_tune(method: str, n: int, workers: int, mean_s: float, sigma: float, tmp: Path) -> dict[str, Any]:
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    def trainable(config: dict[str, float]) -> None:
        d = lognormal_duration(config["x"], config["z"], mean_s, sigma)
        time.sleep(d)
        tune.report({"loss": loss(config["x"], config["z"]), "duration_s": d})

    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space={"x": tune.uniform(0.0, 1.0), "z": tune.uniform(0.0, 1.0)},
        tune_config=tune.TuneConfig(search_alg=OptunaSearch(metric="loss", mode="min", seed=0), num_samples=n,
                                    max_concurrent_trials=workers, reuse_actors=(method == "tune-reuse")),
        run_config=tune.RunConfig(storage_path=str(tmp / "tune"), name=method, verbose=0),
    )
    t0 = time.perf_counter()
    results = tuner.fit()
    wall = time.perf_counter() - t0
    durations = [r.metrics["duration_s"] for r in results if r.metrics and "duration_s" in r.metrics]
    if len(durations) != n:
        raise RuntimeError(f"{method}: {len(durations)} of {n} trials reported; errors: {results.errors[:3]}")
    return _summary(method, n, workers, wall, durations, strategy="OptunaSearch (TPE)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", "-k", type=int, default=2, help="K: evaluations in flight (default 2)")
    parser.add_argument("--n", type=int, default=100, help="N: evaluations per method (default 100)")
    parser.add_argument("--mean", type=float, default=1.0, help="mean evaluation time in seconds (default 1)")
    parser.add_argument("--sigma", type=float, default=0.5, help="lognormal sigma (default 0.5)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {list(METHODS)}")
    parser.add_argument("--strategy", default="tpe", help="our loop's strategy (default tpe, like OptunaSearch)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods {unknown} is not allowed; allowed: {list(METHODS)}")
    for flag, value, ok in (("--workers", args.workers, args.workers >= 1), ("--n", args.n, args.n >= args.workers),
                            ("--mean", args.mean, args.mean > 0), ("--sigma", args.sigma, args.sigma >= 0)):
        if not ok:
            parser.error(f"{flag} {value} is not allowed; allowed: workers >= 1, n >= workers, mean > 0, sigma >= 0")

    # Tune's older progress reporter, quieter with verbose=0; its results go to a temporary folder.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    results: list[dict[str, Any]] = []
    ray_start_s = None
    with tempfile.TemporaryDirectory(prefix="qd-bench-") as tmpdir:
        tmp = Path(tmpdir)
        for method in methods:
            if method != "process" and ray_start_s is None:
                import logging

                import ray

                t0 = time.perf_counter()
                ray.init(num_cpus=args.workers, include_dashboard=False, logging_level=logging.WARNING,
                         log_to_driver=False)
                ray_start_s = time.perf_counter() - t0
            print(f"{method}: {args.n} evaluations on {args.workers} workers ...", file=sys.stderr, flush=True)
            if method.startswith("tune"):
                result = bench_tune(method, args.n, args.workers, args.mean, args.sigma, tmp)
            else:
                result = bench_qd(method, args.n, args.workers, args.mean, args.sigma, args.strategy, tmp)
            results.append(result)
            print(f"  wall {result['wall_s']:.1f} s, efficiency {result['efficiency']:.3f}", file=sys.stderr)
        if ray_start_s is not None:
            import ray

            ray.shutdown()

    peers = [r for r in results if r["method"].startswith("tune")]
    best_peer = max(peers, key=lambda r: r["efficiency"]) if peers else None
    print(f"\nK={args.workers} workers, N={args.n} evaluations, lognormal durations mean {args.mean:g} s "
          f"sigma {args.sigma:g}; Ray start-up {ray_start_s or 0:.1f} s (not counted)")
    print(f"{'method':<12} {'wall s':>8} {'mean d s':>9} {'achieved/s':>11} {'ideal/s':>8} {'efficiency':>11}"
          + ("  vs tune" if peers else ""))
    for r in results:
        ratios = "".join(f"  {r['achieved_per_s'] / p['achieved_per_s']:.2f}x {p['method']}" for p in peers
                         if r["method"] != p["method"] and not r["method"].startswith("tune"))
        print(f"{r['method']:<12} {r['wall_s']:>8.1f} {r['mean_duration_s']:>9.3f} {r['achieved_per_s']:>11.3f} "
              f"{r['ideal_per_s']:>8.3f} {r['efficiency']:>11.3f}{ratios}")
    if args.out:
        doc = {"workers": args.workers, "n": args.n, "mean_s": args.mean, "sigma": args.sigma,
               "ray_start_s": ray_start_s, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                       "platform": platform.platform()},
               "best_peer": best_peer["method"] if best_peer else None, "results": results}
        Path(args.out).write_text(json.dumps(doc, indent=2))
        print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
