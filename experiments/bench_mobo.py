"""Benchmark: the ``botorch`` strategy against Optuna's samplers and random search.

Every run goes through the same loop as ``qd run`` (``qd.optimize``) with
the in-process evaluator and a temporary SQLite store; ``--workers`` evaluations are in flight
(default 1). Each finished run appends one JSON line to ``--out``; runs already there are
skipped, so an interrupted benchmark resumes where it stopped. The table is printed at the end
(or alone, with ``--report``):

    hypervolume (problem's reference point): median [IQR] over seeds,
    ratio of medians to the best Optuna sampler on that problem,
    mean ask latency (seconds per ``ask`` call, wall clock).

``--tutorial`` instead repeats BoTorch's multi-objective tutorial set-up: BraninCurrin with
Gaussian noise of standard deviation (15.19, 0.63), 2 (d + 1) = 6 Sobol points, then 20
synchronous batches of q = 4 (ask 4, evaluate, tell), hypervolume of the noise-free values of
everything evaluated, against reference point (18, 6) (in BoTorch's maximised form (-18, -6)).
As in the tutorial, the GPs are given the noise levels (``--tutorial-noise known``, the
strategy's ``noise`` option); ``--tutorial-noise inferred`` has them fit the noise instead.

Examples::

    python experiments/bench_mobo.py --problems branin-currin zdt1 --seeds 5 --budget 100
    python experiments/bench_mobo.py --report --out bench_mobo.jsonl
    python experiments/bench_mobo.py --tutorial --seeds 5
    python experiments/bench_mobo.py --latency --problems branin-currin mixed-conditional-2 \
        --strategies botorch gp --sizes 200
    python experiments/bench_mobo.py --latency --problems mixed-conditional-3 --strategies botorch gp --sizes 50
    python experiments/bench_mobo.py --run-cost --problems mixed-int --seeds 1 --budget 100
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import qd
from qd.problem import Evaluation, Problem
from qd.registry import get_problem
from qd.results import hypervolume, pareto_trials, reference_point
from qd.store import Trial
from qd.strategies import get_strategy

PROBLEMS = ["branin-currin", "zdt1", "zdt2", "zdt3", "dtlz2", "mixed"]
PROBLEM_OPTIONS: dict[str, dict[str, Any]] = {"zdt1": {"dim": 6}, "zdt2": {"dim": 6}, "zdt3": {"dim": 6},
                                              "dtlz2": {"dim": 6, "n_objectives": 3}}
STRATEGIES = ["botorch", "tpe", "nsga2", "gp", "random"]
OPTUNA = ("tpe", "nsga2", "nsga3", "gp")
TUTORIAL_NOISE = (15.19, 0.63)
TUTORIAL_MAX_HV = 59.36011874867746


def run_one(problem: str, strategy: str, seed: int, budget: int, workers: int,
            strategy_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """One run through the standard loop; returns its final hypervolume and ask latencies."""
    with tempfile.TemporaryDirectory() as tmp:
        pb = _problem(problem)
        strat = get_strategy(strategy, pb, seed=seed, **(strategy_options or {}))
        latencies: list[float] = []
        ask = strat.ask

        def timed_ask(n: int, pending: Sequence = ()) -> list:
            t0 = time.perf_counter()
            out = ask(n, pending)
            latencies.append(time.perf_counter() - t0)
            return out

        strat.ask = timed_ask  # type: ignore[method-assign]
        t0, c0 = time.perf_counter(), time.process_time()
        run = qd.optimize(pb, strat, budget=budget, workers=workers, seed=seed, storage=f"sqlite:///{tmp}/bench.db",
                          name="bench", progress=False)
        report = run.report
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        trials = run.store.trials()
        directions = pb.directions
        ref = reference_point(pb, trials, directions)
        front = pareto_trials(trials, directions)
        hv = hypervolume(np.array([t.values for t in front]), directions, ref.point) if (ref and front) else 0.0
    return {"problem": problem, "strategy": strategy, "options": strategy_options or {}, "seed": seed,
            "budget": budget, "workers": workers, "hypervolume": hv, "finished": report.finished,
            "failed": report.failed, "mean_ask_s": float(np.mean(latencies)) if latencies else 0.0,
            "max_ask_s": float(np.max(latencies)) if latencies else 0.0, "wall_s": wall, "cpu_s": cpu}


def _key(row: dict[str, Any]) -> tuple:
    return (row["problem"], row["strategy"], json.dumps(row.get("options", {}), sort_keys=True), row["seed"],
            row["budget"], row["workers"])


def load_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _label(row: dict[str, Any]) -> str:
    return row["strategy"] + ("" if not row.get("options") else json.dumps(row["options"], sort_keys=True))


def _max_hypervolume(problem: str) -> float:
    """The problem's known maximum hypervolume (NaN if it declares none)."""
    try:
        return float(getattr(_problem(problem), "max_hypervolume", math.nan))
    except Exception:  # a problem that cannot be built here still gets its table
        return math.nan


def report(rows: list[dict[str, Any]]) -> str:
    """The benchmark table, one block per (problem, budget, workers).

    Columns: hypervolume median [IQR] over seeds; the median divided by the best Optuna
    sampler's median; the median gap to the problem's maximum hypervolume (regret) and that gap
    relative to the best Optuna sampler's (below 1: closer to the true front); ask latency.
    """
    groups: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[(r["problem"], r["budget"], r["workers"])][_label(r)].append(r)
    lines = []
    for (problem, budget, workers), by_strategy in sorted(groups.items(), key=lambda kv: str(kv[0])):
        best_hv = _max_hypervolume(problem)
        med = {s: float(np.median([r["hypervolume"] for r in rs])) for s, rs in by_strategy.items()}
        gap = {s: float(np.median([best_hv - r["hypervolume"] for r in rs])) for s, rs in by_strategy.items()}
        optuna = {s: v for s, v in med.items() if s in OPTUNA}
        best_name = max(optuna, key=optuna.get) if optuna else "-"
        best_optuna = optuna.get(best_name, math.nan)
        lines.append(f"\n{problem}  (budget {budget}, workers {workers}; max HV {best_hv:.4f}; "
                     f"best Optuna sampler: {best_name})")
        lines.append(f"  {'strategy':<10} {'seeds':>5} {'HV median':>10} {'IQR':>21} {'/best Optuna':>12} "
                     f"{'gap to max':>10} {'gap/Optuna':>10} {'ask s mean':>10} {'ask s max':>9} {'run CPU s':>9}")
        for s in sorted(by_strategy, key=lambda s: -med[s]):
            rs = by_strategy[s]
            hv = np.array([r["hypervolume"] for r in rs])
            q1, q3 = np.percentile(hv, [25, 75])
            ratio = med[s] / best_optuna if best_optuna > 0 else math.nan
            gap_ratio = gap[s] / gap[best_name] if best_name in gap and gap[best_name] > 0 else math.nan
            lines.append(f"  {s:<10} {len(rs):>5} {med[s]:>10.4f} [{q1:>9.4f}, {q3:>9.4f}] {ratio:>12.4f} "
                         f"{gap[s]:>10.4f} {gap_ratio:>10.3f} {np.mean([r['mean_ask_s'] for r in rs]):>10.3f} "
                         f"{np.max([r['max_ask_s'] for r in rs]):>9.2f} "
                         f"{np.median([r.get('cpu_s', math.nan) for r in rs]):>9.1f}")
    return "\n".join(lines)


# --- BoTorch's tutorial set-up ---------------------------------------------------------------
def tutorial_run(strategy: str, seed: int, n_batches: int = 20, q: int = 4, noise: str = "known",
                 botorch_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """BraninCurrin with noise (15.19, 0.63), 6 Sobol points then ``n_batches`` synchronous batches of ``q``.

    ``noise``: "known" gives botorch's GPs the noise levels (as the tutorial's ``train_Yvar``),
    "inferred" has them fit it. ``botorch_options``: more options for the botorch strategy.
    """
    problem = get_problem("branin-currin")
    rng = np.random.default_rng(seed)
    options: dict[str, Any] = {}
    if strategy == "botorch":
        options["n_init"] = 6
        if noise == "known":
            options["noise"] = dict(zip((o.name for o in problem.objectives), TUTORIAL_NOISE))
        options.update(botorch_options or {})
    strat = get_strategy(strategy, problem, seed=seed, **options)
    true_values: list[list[float]] = []
    number = 0
    asks: list[float] = []

    def evaluate(configs: list[dict]) -> None:
        nonlocal number
        for c in configs:
            ev: Evaluation = problem.evaluate(c, seed)
            true = np.asarray(ev.values, dtype=float)
            noisy = true + rng.normal(0.0, TUTORIAL_NOISE)
            true_values.append(true.tolist())
            strat.tell(Trial(number=number, params=c, state="complete", values=noisy.tolist()))
            number += 1

    evaluate(strat.ask(6))
    for _ in range(n_batches):
        t0 = time.perf_counter()
        batch = strat.ask(q)
        asks.append(time.perf_counter() - t0)
        evaluate(batch)
    hv = hypervolume(np.array(true_values), problem.directions, problem.reference_point)
    return {"tutorial": True, "strategy": strategy, "seed": seed, "noise": noise if strategy == "botorch" else "-",
            "options": (botorch_options or {}) if strategy == "botorch" else {},
            "hypervolume": hv, "evaluations": number, "mean_ask_s": float(np.mean(asks))}


def _tutorial_label(row: dict[str, Any]) -> str:
    # Rows written before the noise option existed ran with inferred noise.
    noise = row.get("noise", "inferred")
    label = row["strategy"] if noise == "-" else f"{row['strategy']} (noise {noise})"
    return label + (" " + json.dumps(row["options"], sort_keys=True) if row.get("options") else "")


def tutorial_report(rows: list[dict[str, Any]]) -> str:
    lines = [f"\nBoTorch tutorial set-up (BraninCurrin, noise sd {TUTORIAL_NOISE}, 6 + 20 x 4 evaluations; "
             f"noise-free HV, max {TUTORIAL_MAX_HV:.2f}; the tutorial's qNEHVI reaches about 57.77)"]
    by: dict[str, list] = defaultdict(list)
    for r in rows:
        by[_tutorial_label(r)].append(r)
    for s, rs in sorted(by.items()):
        hv = np.array([r["hypervolume"] for r in rs])
        q1, q3 = np.percentile(hv, [25, 75])
        lines.append(f"  {s:<10} seeds {len(rs):>2}  HV min {hv.min():.3f}  median {np.median(hv):.3f} "
                     f"[IQR {q1:.3f}, {q3:.3f}]  max {hv.max():.3f}  mean {hv.mean():.3f}  "
                     f"ask(4) {np.mean([r['mean_ask_s'] for r in rs]):.2f} s")
        lines.append("    per seed: " + "  ".join(f"{r['seed']}: {r['hypervolume']:.3f}"
                                                  for r in sorted(rs, key=lambda r: r["seed"])))
    return "\n".join(lines)


# --- ask latency ------------------------------------------------------------------------------
class MixedConditional3(Problem):
    """A plug-in-like problem: 6 mixed parameters (one conditional), 3 objectives, one of them cheap.

    ``optimizer`` (adam, sgd, rmsprop), ``momentum`` (float, only for sgd), ``layers`` (int 1..8),
    ``width`` (int 16..512, log), ``lr`` (float, log), ``dropout`` (float); minimise error,
    latency and parameters (cheap: a function of layers and width).
    """

    name = "mixed-conditional-3"
    reference_point = (1.5, 1.5, 1.1)

    def __init__(self) -> None:
        from qd.space import Categorical, Float, Int, Space

        self.space = Space([Categorical("optimizer", ("adam", "sgd", "rmsprop")),
                            Float("momentum", 0.0, 0.99, active_if={"optimizer": ["sgd"]}),
                            Int("layers", 1, 8), Int("width", 16, 512, log=True),
                            Float("lr", 1e-5, 1e-1, log=True), Float("dropout", 0.0, 0.5)])
        from qd.problem import Objective

        self.objectives = (Objective("error"), Objective("latency"), Objective("params", cheap=True))

    def cheap_values(self, config: dict) -> dict[str, float]:
        return {"params": (math.log2(config["layers"]) + 2 * math.log2(config["width"]) - 8) / 13}

    def evaluate(self, config: dict, seed: int) -> Evaluation:
        cap = 2 * math.log2(config["layers"]) + 2 * math.log2(config["width"]) - 8
        best_lr = {"adam": -3.0, "sgd": -1.5, "rmsprop": -3.5}[config["optimizer"]]
        error = (0.05 + 0.4 * math.exp(-cap / 4) + 0.02 * (math.log10(config["lr"]) - best_lr) ** 2
                 + 0.2 * (config["dropout"] - 0.025 * cap) ** 2
                 + (0.1 * (config.get("momentum", 0.9) - 0.9) ** 2 if config["optimizer"] == "sgd" else 0.01))
        latency = 0.1 * config["layers"] + config["width"] / 512 * 0.5 + 0.05 * (config["optimizer"] != "sgd")
        return Evaluation(values=[error, latency, self.cheap_values(config)["params"]])


class MixedConditional2(MixedConditional3):
    """The same 6 mixed parameters (one conditional) with two expensive objectives: error and latency."""

    name = "mixed-conditional-2"
    reference_point = (1.5, 1.5)

    def __init__(self) -> None:
        super().__init__()
        self.objectives = self.objectives[:2]

    def evaluate(self, config: dict, seed: int) -> Evaluation:
        return Evaluation(values=super().evaluate(config, seed).values[:2])


class MixedInt(Problem):
    """4 integer parameters of 2 to 16 levels and a float; two objectives (ZDT1-like trade-off)."""

    name = "mixed-int"
    reference_point = (1.1, 11.0)

    def __init__(self) -> None:
        from qd.problem import Objective
        from qd.space import Float, Int, Space

        self.space = Space([Int("a", 0, 1), Int("b", 0, 3), Int("c", 0, 7), Int("e", 0, 15), Float("x", 0.0, 1.0)])
        self.objectives = (Objective("f1"), Objective("f2"))

    def evaluate(self, config: dict, seed: int) -> Evaluation:
        g = 1 + 9 * (config["a"] / 1 + abs(config["b"] / 3 - 0.5) + (config["c"] / 7) ** 2 + config["e"] / 15) / 4
        f1 = config["x"]
        return Evaluation(values=[f1, g * (1 - math.sqrt(f1 / g))])


EXTRA_PROBLEMS = {MixedConditional3.name: MixedConditional3, MixedConditional2.name: MixedConditional2,
                  MixedInt.name: MixedInt}


def _problem(name: str) -> Problem:
    if name in EXTRA_PROBLEMS:
        return EXTRA_PROBLEMS[name]()
    return get_problem(name, **PROBLEM_OPTIONS.get(name, {}))


def latency(problem_name: str, sizes: Sequence[int] = (50, 100, 200), seed: int = 0,
            options: dict[str, Any] | None = None, strategies: Sequence[str] = ("botorch", "gp")
            ) -> list[dict[str, Any]]:
    """Seconds (wall and CPU) per ``ask(1)`` of each strategy with 50, 100, 200 observations.

    The observations come from a TPE run on the problem (clustered near the front as in a real
    run, so NEHVI's pruned baseline is realistic), the same for every strategy. At each size two
    asks are timed: the first after the observations arrived in bulk (GP fits from scratch) and
    a steady-state one after one more observation (fits warm-started from the previous ones, as
    in a run). ``first_model_ask`` is the very first model-based ask (at the smallest size).
    """
    problem = _problem(problem_name)
    tpe = get_strategy("tpe", problem, seed=seed)
    strats = {}
    for name in strategies:
        strats[name] = get_strategy(name, problem, seed=seed, **(options or {} if name == "botorch" else {}))
        if hasattr(strats[name], "n_init"):
            strats[name].n_init = 0
    rows = []
    history: list[Trial] = []

    def trial(config: dict, number: int) -> Trial:
        values, _, constraints = problem.normalise(problem.evaluate(config, seed))
        return Trial(number=number, params=config, state="complete", values=values, constraints=constraints)

    def timed(strat) -> tuple[float, float, dict]:
        t0, c0 = time.perf_counter(), time.process_time()
        config = strat.ask(1)[0]
        return time.perf_counter() - t0, time.process_time() - c0, config

    told = {name: 0 for name in strats}
    for size in sizes:
        while len(history) < size:
            t = trial(tpe.ask(1)[0], len(history))
            tpe.tell(t)
            history.append(t)
        for name, strat in strats.items():
            for t in history[told[name]:]:
                strat.tell(t)
            told[name] = len(history)
            cold, cold_cpu, config = timed(strat)
            strat.tell(trial(config, 10_000 + size))  # its own extra observation, as in a run
            warm, warm_cpu, _ = timed(strat)
            rows.append({"latency": True, "problem": problem_name, "strategy": name, "observations": size,
                         "cold_s": cold, "cold_cpu_s": cold_cpu, "warm_s": warm, "warm_cpu_s": warm_cpu,
                         "options": (options or {}) if name == "botorch" else {}})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def latency_report(rows: list[dict[str, Any]]) -> str:
    lines = ["\nask(1) latency, seconds: wall (CPU of this process); 'first' = fits from scratch, "
             "'steady' = warm-started fits as in a run; ratio = botorch CPU / gp CPU (steady)"]
    cpu = {(r["problem"], r["observations"], r.get("strategy", "botorch")): r["warm_cpu_s"] for r in rows}
    for r in rows:
        name = r.get("strategy", "botorch")
        ratio = ""
        if name == "botorch" and (r["problem"], r["observations"], "gp") in cpu:
            ratio = f"   ratio {r['warm_cpu_s'] / cpu[(r['problem'], r['observations'], 'gp')]:.2f}"
        lines.append(f"  {r['problem']:<20} {name:<8} {r['observations']:>4} observations: first {r['cold_s']:6.2f} "
                     f"({r['cold_cpu_s']:6.2f})   steady {r['warm_s']:6.2f} ({r['warm_cpu_s']:6.2f}){ratio}")
    return "\n".join(lines)


def run_cost_report(rows: list[dict[str, Any]]) -> str:
    """Whole-run cost of each strategy against GPSampler (``gp``) on the same problem, seed and budget.

    One line per run: CPU seconds of this process, wall seconds, final hypervolume; botorch
    lines add the ratios of its CPU and wall time to gp's run with the same problem, seed,
    budget and workers.
    """
    lines = ["\nwhole runs: CPU s (this process), wall s, final hypervolume; ratio = botorch / gp, same seed"]
    gp = {(r["problem"], r["seed"], r["budget"], r["workers"]): r for r in rows if r["strategy"] == "gp"}
    for r in sorted(rows, key=lambda r: (r["problem"], r["budget"], r["seed"], r["strategy"] != "botorch")):
        peer = gp.get((r["problem"], r["seed"], r["budget"], r["workers"]))
        ratio = ""
        if r["strategy"] != "gp" and peer is not None:
            ratio = f"   ratio CPU {r['cpu_s'] / peer['cpu_s']:.2f}  wall {r['wall_s'] / peer['wall_s']:.2f}"
        lines.append(f"  {r['problem']:<20} {_label(r):<8} seed {r['seed']}  {r['budget']} evaluations: "
                     f"CPU {r['cpu_s']:7.1f}  wall {r['wall_s']:7.1f}  HV {r['hypervolume']:.4f}{ratio}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", nargs="+", default=PROBLEMS, help=f"default: {' '.join(PROBLEMS)}")
    ap.add_argument("--strategies", nargs="+", default=STRATEGIES, help=f"default: {' '.join(STRATEGIES)}")
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1 (default 5)")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--budget", type=int, default=100)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--botorch-options", type=json.loads, default={},
                    help='JSON options for the botorch strategy, e.g. \'{"num_restarts": 4}\'')
    ap.add_argument("--out", type=Path, default=Path("bench_mobo.jsonl"))
    ap.add_argument("--report", action="store_true", help="print the table of --out and stop")
    ap.add_argument("--tutorial", action="store_true", help="run BoTorch's tutorial set-up instead")
    ap.add_argument("--tutorial-noise", choices=["known", "inferred"], default="known",
                    help="--tutorial: botorch's GPs get the noise levels, as in the tutorial (default), or fit them")
    ap.add_argument("--latency", action="store_true", help="time botorch asks at 50, 100, 200 observations instead")
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200],
                    help="observation counts of --latency (default 50 100 200)")
    ap.add_argument("--run-cost", action="store_true",
                    help="whole runs of --strategies (default botorch gp), printing CPU and wall against gp")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = load_rows(args.out)
    bench = [r for r in rows if not r.get("tutorial") and not r.get("latency")]
    if args.report:
        print(report(bench))
        for kind, show in (("tutorial", tutorial_report), ("latency", latency_report)):
            chosen = [r for r in rows if r.get(kind)]
            if chosen:
                print(show(chosen))
        return 0
    if args.latency:
        new = []
        for problem in args.problems:
            new += latency(problem, sizes=args.sizes, options=args.botorch_options,
                           strategies=[s for s in args.strategies if s in ("botorch", "gp")] or ["botorch"])
        with args.out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in new)
        print(latency_report(new))
        return 0
    if args.run_cost and args.strategies == STRATEGIES:
        args.strategies = ["botorch", "gp"]
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    if args.tutorial:
        done = {(_tutorial_label(r), r["seed"]) for r in rows if r.get("tutorial")}
        for seed in seeds:
            for strategy in args.strategies:
                noise = args.tutorial_noise if strategy == "botorch" else "-"
                options = args.botorch_options if strategy == "botorch" else {}
                if (_tutorial_label({"strategy": strategy, "noise": noise, "options": options}), seed) in done:
                    continue
                row = tutorial_run(strategy, seed, noise=args.tutorial_noise, botorch_options=options)
                print(json.dumps(row), flush=True)
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
        print(tutorial_report([r for r in load_rows(args.out) if r.get("tutorial")]))
        return 0
    done = {_key(r) for r in bench}
    for seed in seeds:  # seeds outermost: a partial benchmark still compares every strategy
        for problem in args.problems:
            for strategy in args.strategies:
                options = args.botorch_options if strategy == "botorch" else {}
                key = (problem, strategy, json.dumps(options, sort_keys=True), seed, args.budget, args.workers)
                if key in done:
                    continue
                row = run_one(problem, strategy, seed, args.budget, args.workers, options)
                print(json.dumps(row), flush=True)
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    finished = [r for r in load_rows(args.out) if not r.get("tutorial") and not r.get("latency")]
    if args.run_cost:
        chosen = {(p, s) for p in args.problems for s in args.strategies}
        print(run_cost_report([r for r in finished if (r["problem"], _label(r)) in chosen and r["seed"] in seeds
                               and r["budget"] == args.budget and r["workers"] == args.workers]))
        return 0
    print(report(finished))
    return 0


if __name__ == "__main__":
    sys.exit(main())
