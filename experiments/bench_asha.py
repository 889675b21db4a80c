"""Benchmark: what ``fidelity = "asha"`` saves, as an option of any strategy, on ``arch`` (epochs).

For each seed, a strategy runs twice on the same problem through ``qd run``'s loop (in-process
evaluator, temporary SQLite store): once at full fidelity (every configuration trained for the
fidelity parameter's top value; ``--full-budget`` evaluations) and once with ``fidelity="asha"`` (``eta``, rungs down to the
parameter's low end). Printed per run: evaluations, the fidelity spent (sum of the fidelity
parameter over finished trials: epochs for ``arch``, steps for ``peft``), the best top-fidelity
value of the first objective, and the hypervolume of the top-fidelity trials; then the ratio of
fidelity spent by ASHA to reach the full-fidelity run's final best (its ``saving``).

Usage: ``python experiments/bench_asha.py [--problem arch] [--strategy random] [--budget 40] [--seeds 1]``.
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

PROBLEM_OPTIONS = {"arch": {"dataset": "digits"}}


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
    for spent, best in curve:
        if best is not None and sign * best <= sign * target + 1e-12:
            return spent
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problem", default="arch")
    ap.add_argument("--strategy", default="random")
    ap.add_argument("--budget", type=int, default=40, help="evaluations of each run")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--eta", type=float, default=3)
    ap.add_argument("--full-budget", type=int, default=None, help="evaluations of the full-fidelity run "
                    "(default --budget)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for seed in range(args.seeds):
        full = run_one(args.problem, args.strategy, seed, args.full_budget or args.budget, {})
        asha = run_one(args.problem, args.strategy, seed, args.budget, {"fidelity": "asha", "eta": args.eta})
        for r in (full, asha):
            print(json.dumps({k: v for k, v in r.items() if k != "curve"}), flush=True)
        target = full["best"]
        reach = spent_to_reach(asha["curve"], target, full["sign"]) if target is not None else None
        reach_text = "never" if reach is None else f"{reach:.0f} ({reach / full['spent']:.2f} of the full run's cost)"
        print(f"seed {seed}: full fidelity spent {full['spent']:.0f} for best {target}; asha best {asha['best']} "
              f"after {asha['spent']:.0f}; asha reached the full run's best after {reach_text}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
