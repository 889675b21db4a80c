"""Test-split score of a finished peft run's Pareto set, next to the hand-picked default.

The search only ever sees the validation split; this script retrains each chosen configuration
with the run's problem options and scores it, with the run's metric, on the held-out test split
(BANKING77's test.csv, or the part of the user's dataset carved off by ``test_size``). It picks at
most ``--max`` Pareto members spread over the trainable-parameter range, the ``--best`` with the
best validation metric, and always adds the
hand-picked default (LoRA r=8 on query and value of every layer: ``PeftProblem.default_config``).
Retraining runs in ``--workers`` processes.

    python experiments/peft_test_split.py --storage sqlite:///peft_gpu.db --name peft-gpu --out test.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from qd.results import pareto_trials
from qd.session import problem_of
from qd.store import Store

_problem = None


def _init(name: str, options: dict) -> None:
    global _problem
    os.environ.setdefault("QD_TORCH_THREADS", "1")
    from qd.registry import get_problem

    _problem = get_problem(name, **options)


def _test(args: tuple[dict, int]) -> float:
    config, seed = args
    return float(_problem.test_score(config, seed))


def spread(trials: list, key, k: int) -> list:
    """Up to ``k`` trials evenly spaced in ``key`` order (both ends kept)."""
    ordered = sorted(trials, key=key)
    if len(ordered) <= k:
        return ordered
    return [ordered[i] for i in sorted(set(np.linspace(0, len(ordered) - 1, k).round().astype(int)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--storage", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--max", type=int, default=10, help="Pareto members to retrain (default 10)")
    parser.add_argument("--best", type=int, default=2, help="also the Pareto members with the best metric (default 2)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--out", help="write the table as JSON here")
    args = parser.parse_args()

    store = Store.open(args.storage, args.name)
    problem = problem_of(store)
    names = problem.objective_names
    metric = problem.metric
    front = pareto_trials(store.trials(), problem.directions)
    chosen = spread(front, key=lambda t: t.values[names.index("trainable_params")], k=args.max)
    sign = 1 if problem.objectives[names.index(metric)].direction == "minimize" else -1
    for trial in sorted(front, key=lambda t: sign * t.values[names.index(metric)])[: args.best]:
        if trial not in chosen:
            chosen.append(trial)
    rows = [{"label": f"pareto #{t.number}", "params": t.params,
             "validation": dict(zip(names, t.values))} for t in chosen]
    rows.append({"label": "default (LoRA r=8 on query, value)", "params": problem.default_config(), "validation": None})
    with ProcessPoolExecutor(args.workers, mp.get_context("spawn"), initializer=_init,
                             initargs=(store.info.problem, store.info.problem_options)) as pool:
        scores = list(pool.map(_test, [(r["params"], 0) for r in rows]))
    for row, score in zip(rows, scores):
        row[f"test_{metric}"] = score
    print(f"{'configuration':<38} {'val ' + metric:>14} {'test ' + metric:>14} {'trainable':>10} {'train s':>8}")
    for r in rows:
        v = r["validation"] or {}
        print(f"{r['label']:<38} {v.get(metric, float('nan')):>14.4f} {r[f'test_{metric}']:>14.4f} "
              f"{v.get('trainable_params', float('nan')):>10.0f} {v.get('train_time_s', float('nan')):>8.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2, default=str)


if __name__ == "__main__":
    main()
