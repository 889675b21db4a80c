"""Benchmark: what ``fidelity = "asha"`` saves, as an option of any strategy, on ``arch`` (epochs) and ``peft`` (steps).

For each problem and seed, a strategy runs twice through ``qd run``'s loop (in-process evaluator,
temporary SQLite store): once at full fidelity (every configuration trained for the fidelity
parameter's top value; ``--full-budget`` evaluations) and once with ``fidelity="asha"`` (``eta``,
rungs down to the parameter's low end; ``--budget`` evaluations, most of them at low rungs).

Cost is the fidelity spent: the sum of the fidelity parameter over finished trials (epochs for
``arch``, steps for ``peft``). Quality is the best top-fidelity value of the first objective
(accuracy); lower rungs do not count. Equal final quality: the threshold is what the full run
had reached after ``--target`` of its evaluations (default half), and each run's cost is what it
had spent when its best first reached the threshold. Printed per seed, then per problem: both
costs summed over the seeds where ASHA reached the threshold, their ratio (the saving), and the
median per-seed saving; a seed where ASHA never reached it is counted and shown as such.

Usage: ``python experiments/bench_asha.py [--problems arch,peft] [--strategy random] [--full-budget 10]
[--budget 50] [--seeds 3]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import numpy as np
import torch

import qd
from qd.registry import get_problem
from qd.strategies import get_strategy

#: CPU-sized problems: arch on scikit-learn's digits (1-10 epochs); peft on a small BANKING77 split
#: (MiniLM, 1-27 steps, so rungs 1, 3, 9, 27 with eta 3).
PROBLEM_OPTIONS = {"arch": {"dataset": "digits"},
                   "peft": {"train_size": 256, "val_size": 128, "max_length": 16, "batch_size": 16, "min_steps": 1,
                            "max_steps": 27}}


def run_one(problem: str, strategy: str, seed: int, budget: int, options: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        pb = get_problem(problem, **PROBLEM_OPTIONS.get(problem, {}))
        strat = get_strategy(strategy, pb, seed=seed, **options)
        if "fidelity" not in options:  # the full-fidelity run: every configuration at the top value
            fid, inner_ask = pb.fidelity, strat.ask
            top_value = pb.space[fid].high
            strat.ask = lambda n, pending=(): [{**c, fid: top_value} for c in inner_ask(n, pending)]
        t0 = time.perf_counter()
        run = qd.optimize(pb, strat, budget=budget, seed=seed, storage=f"sqlite:///{tmp}/asha.db", name="asha",
                          progress=False)
        wall = time.perf_counter() - t0
        trials = [t for t in run.store.trials() if t.finished]
    fid = pb.fidelity
    top = pb.space[fid].high
    sign = pb.objectives[0].sign  # +1 minimise, -1 maximise
    spent, best, curve = 0.0, None, []
    for t in trials:
        spent += t.params[fid]
        if t.state == "complete" and t.params[fid] == top:
            v = t.values[0]
            best = v if best is None or sign * v < sign * best else best
        curve.append((spent, best))
    return {"problem": problem, "strategy": strategy, "options": options, "seed": seed, "evaluations": len(trials),
            "spent": spent, "best": best, "top_evaluations": sum(t.params[fid] == top for t in trials),
            "curve": curve, "wall_s": wall, "sign": sign}


def spent_to_reach(curve: list, target: float, sign: float) -> float | None:
    """The fidelity spent when a run's best top-fidelity value first reached ``target`` (None: never)."""
    for spent, best in curve:
        if best is not None and sign * best <= sign * target + 1e-12:
            return spent
    return None


def target_of(full: dict, fraction: float) -> float | None:
    """The quality the full-fidelity run had reached after ``fraction`` of its evaluations."""
    k = max(1, int(round(fraction * len(full["curve"]))))
    return full["curve"][k - 1][1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", default="arch,peft")
    ap.add_argument("--strategy", default="random")
    ap.add_argument("--full-budget", type=int, default=10, help="evaluations of the full-fidelity run")
    ap.add_argument("--budget", type=int, default=50, help="evaluations of the ASHA run (most of them cheap)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--eta", type=float, default=3)
    ap.add_argument("--min-fidelity", type=float, default=None, help="the lowest rung (default: the parameter's "
                    "low end)")
    ap.add_argument("--target", type=float, default=0.5, help="the quality threshold: the full run's best after "
                    "this fraction of its evaluations")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    summary = []
    for problem in args.problems.split(","):
        unit = get_problem(problem, **PROBLEM_OPTIONS.get(problem, {})).fidelity
        full_costs, asha_costs, savings = [], [], []
        for seed in range(args.seeds):
            full = run_one(problem, args.strategy, seed, args.full_budget, {})
            asha = run_one(problem, args.strategy, seed, args.budget, {"fidelity": "asha", "eta": args.eta,
                                                                  "min_fidelity": args.min_fidelity})
            for r in (full, asha):
                print(json.dumps({k: v for k, v in r.items() if k != "curve"}), flush=True)
            target = target_of(full, args.target)
            c_full = spent_to_reach(full["curve"], target, full["sign"])
            c_asha = spent_to_reach(asha["curve"], target, full["sign"])
            full_costs.append(c_full)
            asha_costs.append(c_asha)
            saving = c_full / c_asha if c_asha else None
            savings.append(saving)
            print(f"{problem} seed {seed}: target {objective_text(target)} (full run's best after {args.target:g} of "
                  f"its evaluations); {unit} spent to reach it: full {c_full:.0f}, asha "
                  f"{'never' if c_asha is None else f'{c_asha:.0f}'} (asha spent {asha['spent']:.0f} in all, "
                  f"best {objective_text(asha['best'])}); saving {'-' if saving is None else f'{saving:.2f}x'}",
                  flush=True)
        reached = [s for s in savings if s is not None]
        total_full = sum(c for c, a in zip(full_costs, asha_costs) if a is not None)
        total_asha = sum(a for a in asha_costs if a is not None)
        lowest = "the low end" if args.min_fidelity is None else f"{args.min_fidelity:g}"
        summary.append(f"{problem} ({args.strategy}, {args.seeds} seeds, eta {args.eta:g}, lowest rung {lowest}): "
                       f"{unit} spent until the "
                       f"quality threshold: full fidelity {total_full:.0f}, asha {total_asha:.0f} "
                       f"(asha reached it in {len(reached)}/{args.seeds} seeds); saving "
                       f"{total_full / total_asha if total_asha else float('nan'):.2f}x overall, median per seed "
                       f"{np.median(reached) if reached else float('nan'):.2f}x")
        print(summary[-1], flush=True)
    print("\n" + "\n".join(summary))
    return 0


def objective_text(v: float | None) -> str:
    return "none" if v is None else f"{v:.4g}"


if __name__ == "__main__":
    sys.exit(main())
