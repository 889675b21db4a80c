"""Benchmark: what ``fidelity = "asha"`` saves, as an option of any strategy, on ``arch`` (epochs) and ``peft`` (steps).

For each problem and seed, a strategy runs twice through ``qd.optimize``'s loop (in-process
evaluator, temporary SQLite store): once at full fidelity (every configuration trained for the
fidelity parameter's top value; ``--full-budget`` evaluations) and once with ``fidelity="asha"``
(``eta``, rungs from the problem's lowest rung up), given the same fidelity spend.

What makes the comparison fair:

- **One quality, searched and measured.** Quality is the best top-fidelity value of the problem's
  first objective (accuracy). Both runs search the problem restricted to that objective
  (``FirstObjective``), so ASHA ranks each rung by the quality it is judged on. (Searching all of
  ``arch``'s or ``peft``'s objectives, ASHA promotes by non-dominated rank: the smallest and
  fastest models are on the first front whatever their accuracy, and fill the upper rungs.)
- **Equal spend.** Cost is the fidelity spent: the sum of the fidelity parameter over finished
  trials (epochs, steps). The ASHA run is given enough evaluations to spend what the full run
  spends, and its record is cut at that spend.
- **Equal final quality.** Per seed, the threshold is the quality both runs reached: the lower of
  their final bests (``--threshold common``); each run's cost is what it had spent when its best
  first reached it. The full run's own final best (``--threshold full``, with ``--target`` the
  fraction of its evaluations) favours the full run: it is the maximum of its own noisy
  evaluations, which it reaches by definition and the other run must beat. Lower rungs never
  count as quality.
- **Informative rungs.** The lowest rung must rank configurations: one training step of ``peft``
  leaves every model near chance, so its lowest rung is 3 steps.

Printed per seed, then per problem: both costs summed over the seeds where ASHA reached the
threshold, their ratio (the saving), the median per-seed saving, and the mean final quality of
both runs at equal spend.

Usage: ``python experiments/bench_asha.py [--problems arch,peft] [--strategy random] [--full-budget 10]
[--seeds 3] [--size cpu|gpu] [--jobs 1] [--results FILE] [--summarise FILE]``.

ASHA's warm-up (the spend before its first top-rung evaluation) is one top-fidelity evaluation per
rung, so a budget of only a few full evaluations cannot show a saving: with peft's 4 rungs and 8 full
evaluations, half the budget went before ASHA's first top-rung result (saving 1.00x). The recorded
figures (``docs/results/asha/``, re-printed with ``--summarise``) ran with 24 (peft) and 30 (arch)::

    python experiments/bench_asha.py --problems peft --size gpu --full-budget 24 --seeds 8 --jobs 16 \
        --results docs/results/asha/peft_gpu.jsonl
    python experiments/bench_asha.py --problems arch --size gpu --full-budget 30 --seeds 8 --jobs 16 \
        --results docs/results/asha/arch.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

import qd
from qd.fidelity import rung_values
from qd.problem import Evaluation, Problem
from qd.registry import get_problem
from qd.strategies import get_strategy

#: Problem options and the lowest ASHA rung, per size. CPU: arch on scikit-learn's digits (1-10
#: epochs: rungs 1, 3, 10), peft on a small BANKING77 split (MiniLM, rungs 3, 9, 27 steps). GPU:
#: peft on a larger split, on the GPU (rungs 3, 9, 27, 81 steps).
SIZES: dict[str, dict[str, tuple[dict[str, Any], float | None]]] = {
    "cpu": {"arch": ({"dataset": "digits"}, None),
            "peft": ({"train_size": 256, "val_size": 128, "max_length": 16, "batch_size": 16, "min_steps": 1,
                      "max_steps": 27}, 3)},
    "gpu": {"arch": ({"dataset": "digits"}, None),
            "peft": ({"train_size": 1000, "val_size": 300, "max_length": 32, "batch_size": 32, "min_steps": 1,
                      "max_steps": 81, "device": "auto"}, 3)},
}


class FirstObjective(Problem):
    """``inner`` with its first objective alone: the same space, fidelity, measures and evaluations."""

    def __init__(self, inner: Problem):
        self.inner = inner
        self.name = inner.name
        self.options = dict(getattr(inner, "options", {}))
        self.space, self.fidelity, self.measures = inner.space, inner.fidelity, inner.measures
        self.constraints, self.resources = inner.constraints, inner.resources
        self.objectives = inner.objectives[:1]

    def evaluate(self, config, seed: int) -> Evaluation:
        ev = self.inner.evaluate(config, seed)
        values = ev.values
        first = values[self.objectives[0].name] if isinstance(values, Mapping) else list(values)[0]
        return Evaluation([first], ev.measures, ev.constraints, ev.metadata)


def asha_evaluations(spend: float, values: list[float], eta: float) -> int:
    """Evaluations an ASHA run needs to spend about ``spend``: per configuration entering the lowest
    rung, a share ``eta^-k`` reaches rung k; with 30% to spare, since promotions lag early on."""
    per_config = sum(v * eta ** -k for k, v in enumerate(values))
    evals_per_config = sum(eta ** -k for k in range(len(values)))
    return int(math.ceil(1.3 * spend / per_config * evals_per_config))


def run_one(job: tuple) -> dict:
    problem, strategy, seed, budget, options, size, spend_cap = job
    torch.set_num_threads(1)
    problem_options = SIZES[size][problem][0]
    with tempfile.TemporaryDirectory() as tmp:
        pb = FirstObjective(get_problem(problem, **problem_options))
        strat = get_strategy(strategy, pb, seed=seed, **options)
        fid = pb.fidelity
        top = pb.space[fid].high
        if "fidelity" not in options:  # the full-fidelity run: every configuration at the top value
            inner_ask = strat.ask
            strat.ask = lambda n, pending=(): [{**c, fid: top} for c in inner_ask(n, pending)]
        t0 = time.perf_counter()
        run = qd.optimize(pb, strat, budget=budget, seed=seed, storage=f"sqlite:///{tmp}/asha.db", name="asha",
                          progress=False)
        wall = time.perf_counter() - t0
        trials = sorted((t for t in run.store.trials() if t.finished), key=lambda t: t.number)
    sign = pb.objectives[0].sign  # +1 minimise, -1 maximise
    spent, best, curve, tops = 0.0, None, [], 0
    for t in trials:
        if spend_cap is not None and spent + t.params[fid] > spend_cap + 1e-9:
            break  # equal spend: the record is cut where the full run's spend ends
        spent += t.params[fid]
        if t.state == "complete" and t.params[fid] == top:
            tops += 1
            v = t.values[0]
            best = v if best is None or sign * v < sign * best else best
        curve.append((spent, best))
    return {"problem": problem, "strategy": strategy, "options": options, "seed": seed, "evaluations": len(curve),
            "spent": spent, "best": best, "top_evaluations": tops, "curve": curve, "wall_s": wall, "sign": sign}


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


def objective_text(v: float | None) -> str:
    return "none" if v is None else f"{v:.4g}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", default="arch,peft")
    ap.add_argument("--strategy", default="random")
    ap.add_argument("--full-budget", type=int, default=10, help="evaluations of the full-fidelity run")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--eta", type=float, default=3)
    ap.add_argument("--size", choices=sorted(SIZES), default="cpu", help="problem sizes (gpu: a larger peft)")
    ap.add_argument("--min-fidelity", type=float, default=None,
                    help="the lowest rung for every problem (default: the size's per-problem choice)")
    ap.add_argument("--threshold", choices=["common", "full"], default="common",
                    help="common: the lower of both runs' final bests; full: the full run's best after --target")
    ap.add_argument("--target", type=float, default=1.0, help="--threshold full: the full run's best after "
                    "this fraction of its evaluations (1: its final best)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (processes)")
    ap.add_argument("--results", default=None, help="append each finished run here (JSON lines), as it finishes")
    ap.add_argument("--summarise", default=None, help="print the summary of the runs in this --results file "
                    "(same other arguments), running nothing")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    jobs, plans = [], {}
    for problem in args.problems.split(","):
        options, lowest = SIZES[args.size][problem]
        lowest = args.min_fidelity if args.min_fidelity is not None else lowest
        pb = get_problem(problem, **options)
        param = pb.space[pb.fidelity]
        values = rung_values(param, args.eta, lowest)
        spend = args.full_budget * param.high
        asha_budget = asha_evaluations(spend, values, args.eta)
        plans[problem] = (pb.fidelity, values, spend)
        asha_options = {"fidelity": "asha", "eta": args.eta, "min_fidelity": lowest}
        for seed in range(args.seeds):
            jobs.append((problem, args.strategy, seed, args.full_budget, {}, args.size, None))
            jobs.append((problem, args.strategy, seed, asha_budget, asha_options, args.size, spend))
    if args.summarise:
        with open(args.summarise) as f:
            results = [json.loads(line) for line in f if line.strip()]
    else:
        results = []
        with multiprocessing.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
            for r in pool.imap_unordered(run_one, jobs, chunksize=1):
                results.append(r)
                print(f"done: {r['problem']} seed {r['seed']} {'asha' if r['options'] else 'full'} "
                      f"({r['wall_s']:.0f} s)", flush=True)
                if args.results:
                    with open(args.results, "a") as f:
                        f.write(json.dumps(r) + "\n")
    summary = []
    for problem, (unit, values, spend) in plans.items():
        full_costs, asha_costs, savings, finals = [], [], [], []
        for seed in range(args.seeds):
            pair = sorted((r for r in results if r["problem"] == problem and r["seed"] == seed),
                          key=lambda r: bool(r["options"]))
            if len(pair) != 2:
                print(f"{problem} seed {seed}: {len(pair)} of its 2 runs finished; left out", flush=True)
                continue
            full, asha = pair
            for r in (full, asha):
                print(json.dumps({k: v for k, v in r.items() if k != "curve"}), flush=True)
            target = target_of(full, args.target)
            if args.threshold == "common" and asha["best"] is not None:
                target = min(target, asha["best"]) if full["sign"] < 0 else max(target, asha["best"])
            c_full = spent_to_reach(full["curve"], target, full["sign"])
            c_asha = spent_to_reach(asha["curve"], target, full["sign"])
            full_costs.append(c_full)
            asha_costs.append(c_asha)
            finals.append((full["best"], asha["best"]))
            saving = c_full / c_asha if c_asha else None
            savings.append(saving)
            how = ("the lower final best" if args.threshold == "common"
                   else f"full run's best after {args.target:g} of its evaluations")
            print(f"{problem} seed {seed}: target {objective_text(target)} ({how}); {unit} spent to reach it: "
                  f"full {c_full:.0f}, asha "
                  f"{'never' if c_asha is None else f'{c_asha:.0f}'} (each run spent at most {spend:.0f}; asha "
                  f"{asha['spent']:.0f}, best {objective_text(asha['best'])}, {asha['top_evaluations']} at the top); "
                  f"saving {'-' if saving is None else f'{saving:.2f}x'}", flush=True)
        reached = [s for s in savings if s is not None]
        total_full = sum(c for c, a in zip(full_costs, asha_costs) if a is not None)
        total_asha = sum(a for a in asha_costs if a is not None)
        mean_full = np.mean([f for f, _ in finals if f is not None])
        asha_finals = [a for _, a in finals if a is not None]
        mean_asha = np.mean(asha_finals) if asha_finals else math.nan
        summary.append(f"{problem} ({args.strategy}, {len(finals)} seeds, eta {args.eta:g}, rungs "
                       f"{'/'.join(f'{v:g}' for v in values)} {unit}, threshold {args.threshold}): "
                       f"{unit} spent until it: "
                       f"full fidelity {total_full:.0f}, asha {total_asha:.0f} (asha reached it in "
                       f"{len(reached)}/{len(finals)} seeds); saving "
                       f"{total_full / total_asha if total_asha else float('nan'):.2f}x overall, median per seed "
                       f"{np.median(reached) if reached else float('nan'):.2f}x; final quality at equal spend "
                       f"({spend:.0f} {unit}): full {mean_full:.4f}, asha {mean_asha:.4f} (mean over seeds)")
        print(summary[-1], flush=True)
    print("\n" + "\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
