"""The captured population step against the eager one on a GPU: same results, and the time of a step.

The same P members (``experiments/gpu_population.py``'s sizes and configurations) are trained twice
in one process on one frozen MiniLM: the step launched kernel by kernel (``graphs=False``) and
captured once as a CUDA graph and replayed (``graphs=True``). With every dropout off (the base
model's and LoRA's) both runs compute the same arithmetic, so their validation logits must agree to
bf16 rounding; with dropout on (as evaluations run) their masks differ and only the accuracies are
compared. Printed per P: training wall time and time per population step for each path, the
speed-up, max |difference| of the logits, and mean |difference| of the accuracies.

    python experiments/gpu_population_check.py --populations 8,16,32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "experiments"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from gpu_population import GPU_OPTIONS  # noqa: E402


def run(problem, configs, seeds, graphs: bool, lanes: int):
    import torch

    from problems import peft_population as pp

    members, alone, failed = pp._members(problem, configs, seeds)
    assert not alone and not failed, (alone, failed)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    population = pp.train_population(problem, members, lanes=lanes, graphs=graphs)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    steps = max(s + m.steps for s, m in zip(pp.lane_starts([m.steps for m in members], lanes), members))
    logits = pp._logits(population, problem._split("val"), problem._cache["population_data"])
    accuracy = (logits.argmax(-1).cpu() == problem._split("val").labels[None, :]).float().mean(1)
    return wall, steps, logits.float().cpu(), accuracy.numpy(), torch.cuda.max_memory_allocated() / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--populations", default="8,16,32", help="lanes P, in order (default 8,16,32)")
    parser.add_argument("--queue", type=int, default=3, help="members per lane (default 3: P x 3 members)")
    parser.add_argument("--cap", type=int, default=None, help="cut every configuration's steps to this many")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    import torch

    from problems.peft import PeftProblem

    rows = []
    for p in [int(x) for x in args.populations.split(",") if x]:
        n = p * args.queue
        for dropout in (False, True):
            problem = PeftProblem(**GPU_OPTIONS, population=p, population_queue=args.queue)
            space = problem.space
            configs = [space.validate(c) for c in space.sample(n, np.random.default_rng(args.seed))]
            if args.cap:
                configs = [dict(c, steps=min(c["steps"], args.cap)) for c in configs]
            if not dropout:
                configs = [dict(c, dropout=0.0) if "dropout" in c else c for c in configs]
                for module in problem._base()[1].modules():
                    if isinstance(module, torch.nn.Dropout):
                        module.p = 0.0
            seeds = list(range(n))
            problem.evaluate_population(configs[:1], seeds[:1])  # warm-up: model, data, CUDA
            eager = run(problem, configs, seeds, graphs=False, lanes=p)
            graph = run(problem, configs, seeds, graphs=True, lanes=p)
            row = {"lanes": p, "members": n, "dropout": dropout, "steps": eager[1],
                   "eager_s": eager[0], "graph_s": graph[0], "eager_ms_per_step": 1e3 * eager[0] / eager[1],
                   "graph_ms_per_step": 1e3 * graph[0] / graph[1], "speedup": eager[0] / graph[0],
                   "logits_max_abs_diff": float((eager[2] - graph[2]).abs().max()),
                   "accuracy_mean_abs_diff": float(np.abs(eager[3] - graph[3]).mean()),
                   "accuracy_mean_eager": float(eager[3].mean()), "accuracy_mean_graph": float(graph[3].mean()),
                   "peak_mib": graph[4]}
            rows.append(row)
            print(f"P={p:<3} members {n:<3} dropout {'on ' if dropout else 'off'} steps {row['steps']:<5} "
                  f"eager {row['eager_s']:6.1f} s ({row['eager_ms_per_step']:6.1f} ms/step)  "
                  f"graph {row['graph_s']:6.1f} s ({row['graph_ms_per_step']:6.1f} ms/step)  "
                  f"speed-up {row['speedup']:5.2f}x  max |logit diff| {row['logits_max_abs_diff']:.2e}  "
                  f"accuracy {row['accuracy_mean_eager']:.4f} vs {row['accuracy_mean_graph']:.4f} "
                  f"(mean |diff| {row['accuracy_mean_abs_diff']:.4f})  peak {row['peak_mib']:.0f} MiB", flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
