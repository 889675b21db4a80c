"""Multi-objective surrogate illumination: ``mo-sail`` against ``mome`` at equal evaluations.

Expensive-evaluation set-up: ``--budget`` evaluations (default 200), ``--seeds`` seeds, both
strategies in the same run, asked in batches of ``--batch`` configurations (each batch evaluated,
then told), on:

- ``zdt1``: 6 variables, measures the means of the two halves of the distance variables, 10x10
  grid, reference point (11, 11);
- ``arm``: 6 joints, ``objectives=2`` (evenness ``score``, maximised, and ``bend``, the mean
  absolute joint angle, minimised), 10x10 grid over the end effector, reference point
  ``((1 - pi^2) 100, pi)``.

The MOQD score (sum over cells of each front's hypervolume, the run's objective scaling) is
computed the same way for both: the finished trials inserted in order into a fresh archive of
the same spec (``qd.metrics.replay``). Printed: mean ± std per strategy and the ratio of means.

Usage: ``python experiments/bench_mosail.py [--budget 200] [--seeds 3] [--batch 8] [--problems zdt1,arm]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from problems.arm import Arm  # noqa: E402
from problems.zdt import ZDT1  # noqa: E402
from qd.archive import build_archive  # noqa: E402
from qd.metrics import replay  # noqa: E402
from qd.problem import Problem  # noqa: E402
from qd.store import Trial  # noqa: E402
from qd.strategies import get_strategy  # noqa: E402
from qd.testing import evaluate  # noqa: E402


def batches(name: str, problem: Problem, budget: int, batch: int, seed: int, **options: Any) -> tuple[list[Trial], Any]:
    """``budget`` evaluations asked ``batch`` at a time; returns the trials in order and the strategy."""
    strategy = get_strategy(name, problem, seed=seed, **options)
    trials: list[Trial] = []
    while len(trials) < budget:
        configs = strategy.ask(min(batch, budget - len(trials)))
        done = [evaluate(problem, c, len(trials) + i) for i, c in enumerate(configs)]
        for t in done:
            strategy.tell(t)
        trials += done
    return trials, strategy


def mean_std(xs: list[float]) -> str:
    return f"{np.mean(xs):.4g} ± {np.std(xs):.2g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--problems", default="zdt1,arm")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = {"zdt1": ("zdt1 (6 variables, 10x10 grid)", ZDT1(dim=6)),
             "arm": ("arm (6 joints, objectives=2, 10x10 grid)", Arm(dof=6, objectives=2))}
    options = {"bins": [10, 10]}
    t0 = time.perf_counter()
    lines = []
    for key in args.problems.split(","):
        title, problem = cases[key]
        scores: dict[str, list[float]] = {"mome": [], "mo-sail": []}
        coverage: dict[str, list[float]] = {"mome": [], "mo-sail": []}
        asks: list[float] = []
        for seed in range(args.seeds):
            for name in scores:
                trials, strategy = batches(name, problem, args.budget, args.batch, seed, **options)
                final = replay(problem, trials, lambda: build_archive(problem, strategy.spec), every=args.budget)[-1]
                scores[name].append(final["moqd_score"])
                coverage[name].append(final["coverage"])
                asks += [s for _, s in getattr(strategy, "latencies", [])]
                print(f"  {key} seed {seed} {name}: moqd {final['moqd_score']:.4g} coverage {final['coverage']:.3f}",
                      flush=True)
        ratio = np.mean(scores["mo-sail"]) / np.mean(scores["mome"])
        lines.append(f"{title}, {args.budget} evaluations, batches of {args.batch}, {args.seeds} seeds: "
                     f"MOQD mome {mean_std(scores['mome'])} (coverage {np.mean(coverage['mome']):.3f}) | "
                     f"mo-sail {mean_std(scores['mo-sail'])} (coverage {np.mean(coverage['mo-sail']):.3f}) | "
                     f"ratio {ratio:.2f} | mo-sail ask s mean {np.mean(asks):.2f} max {np.max(asks):.2f}")
        print(lines[-1], flush=True)
    print("\n" + "\n".join(lines))
    print(f"(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
