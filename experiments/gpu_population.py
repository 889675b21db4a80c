"""Population batching against process packing: peft evaluations per hour on one GPU.

The same peft configurations (``experiments/peft_gpu.toml``'s sizes: 2,000 training and 1,000
validation examples, 32 tokens, batch 32, 50-600 steps) are evaluated in each mode through the
``process`` evaluator:

- ``one``: one worker process, one evaluation at a time (one per GPU);
- ``procs-K``: K worker processes sharing the GPU, one evaluation each (as Ray's fractional GPUs do);
- ``pop-P``: one worker process training P configurations at once on one frozen copy of MiniLM
  (``PeftProblem(population=P, population_queue=Q)``, ``problems/peft_population.py``): it is handed
  up to P x Q configurations per call and starts each as soon as one of the P in training finishes;
  ``pop-PxK``: K such processes;
- ``auto``: the process count ``evaluators.packing.PackingPolicy`` picks from the GPU memory the
  process modes' evaluations were measured to use (run when it differs from those measured).

Each mode first warms its workers up (one short evaluation per slot: processes started, model and
data loaded, CUDA initialised), then evaluates its configurations with every slot busy. Reported per
mode: steady evaluations per hour (after the warm-up) and the warm-up time, GPU busy % (``nvidia-smi``,
sampled every half second), achieved model FLOP/s as a fraction of the GPU's dense bf16 peak, GPU
memory (nvidia-smi's total, and the largest per-process peak torch reports), failures, and the
validation accuracy of the configurations every mode evaluated. Model FLOPs are counted from the
encoder's linear layers and attention (forward over every layer; the backward pass's input gradients
from the lowest adapted layer up; validation forward), per token, over the steps each configuration
trains: the same count for every mode, so the ratios are those of useful work.

    python experiments/gpu_population.py --out gpu_population.json          # on one GPU
    python experiments/gpu_population.py --cpu --evals 8 --procs 2 --populations 4   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "experiments"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])

from gpu_fractional import GpuSampler  # noqa: E402

#: experiments/peft_gpu.toml's problem options.
GPU_OPTIONS = {"train_size": 2000, "val_size": 1000, "max_length": 32, "batch_size": 32, "min_steps": 50,
               "max_steps": 600, "device": "cuda", "gpus_per_eval": 0.125}
CPU_OPTIONS = {"train_size": 64, "val_size": 32, "max_length": 16, "batch_size": 8, "min_steps": 2,
               "max_steps": 6, "device": "cpu"}
BF16_PEAK = 790e12  # dense bf16 FLOP/s of one H200 as measured on random data (the datasheet says 990)


def model_flops(config: dict[str, Any], options: dict[str, Any], layers: int = 6, hidden: int = 384,
                intermediate: int = 1536) -> float:
    """Model FLOPs of one evaluation: training steps (forward, and backward input gradients from the
    lowest adapted layer up) and the validation forward pass, at full width (as on a GPU)."""
    tokens = options["max_length"]
    linear = 4 * hidden * hidden + 2 * hidden * intermediate  # multiply-adds per token per layer
    forward = 2 * linear + 4 * tokens * hidden  # + attention scores and weighted values
    backward = 2 * linear + 8 * tokens * hidden
    adapted = [i for i in range(layers) if config.get(f"layer_{i}")]
    below = min(adapted) if adapted else layers
    per_token = layers * forward + (layers - below) * backward
    train = config["steps"] * options["batch_size"] * tokens * per_token
    val = options["val_size"] * tokens * layers * forward
    return float(train + val)


def run_mode(name: str, processes: int, population: int, queue: int, configs: list[dict[str, Any]], warmup: list[dict[str, Any]],
             options: dict[str, Any], sampler: GpuSampler) -> dict[str, Any]:
    from evaluators import Job
    from evaluators.process import ProcessPoolEvaluator
    from problems.peft import PeftProblem

    problem = PeftProblem(**options, population=population, population_queue=queue)
    evaluator = ProcessPoolEvaluator(threads=1)
    evaluator.start(problem, processes * problem.max_population)
    t_start = time.time()
    try:
        key = 0
        for config in warmup[: processes * population]:
            evaluator.submit(Job(10**6 + key, config, seed=10**6 + key))
            key += 1
        warm = []
        while len(warm) < key:
            warm += evaluator.wait()
        t0 = time.time()
        for i, config in enumerate(configs):
            evaluator.submit(Job(i, config, seed=i))
        outcomes = []
        while len(outcomes) < len(configs):
            outcomes += evaluator.wait()
            print(f"  {name}: {len(outcomes)}/{len(configs)}", file=sys.stderr, flush=True)
        t1 = time.time()
    finally:
        evaluator.close()
    by_key = {o.key: o for o in outcomes}
    ok = [by_key[i] for i in range(len(configs)) if by_key[i].ok]
    failures = [f"{o.kind}: {o.error.splitlines()[0]}" for o in outcomes if not o.ok]
    wall = t1 - t0
    flops = sum(model_flops(configs[o.key], options) for o in ok)
    gpu = sampler.between(t0, t1)
    return {
        "mode": name, "processes": processes, "population": population, "queue": queue if population > 1 else 1,
        "evaluations": len(configs),
        "complete": len(ok), "n_failed": len(failures), "failures": failures[:5],
        "warmup_s": t0 - t_start, "wall_s": wall, "evals_per_hour": len(ok) / wall * 3600.0,
        "model_flops": flops, "flops_per_s": flops / wall, "peak_fraction": flops / wall / BF16_PEAK,
        "eval_peak_memory_mb": max((o.evaluation.metadata.get("peak_memory_mb", 0.0) for o in ok), default=None),
        "accuracy": {o.key: o.evaluation.values["accuracy"] for o in ok},
        "warmup_failures": [f"{o.kind}: {o.error.splitlines()[0]}" for o in warm if not o.ok][:3],
        **gpu,
    }


def auto_processes(results: list[dict[str, Any]], cpu: bool) -> int | None:
    """The processes ``PackingPolicy`` packs on this GPU from the largest evaluation peak measured so far."""
    from evaluators.packing import PackingPolicy

    peaks = [r["eval_peak_memory_mb"] for r in results if r["population"] == 1 and r["eval_peak_memory_mb"]]
    if cpu or not peaks:
        return None
    import torch

    total_mb = torch.cuda.get_device_properties(0).total_memory / 2**20
    return PackingPolicy().slots(total_mb, max(peaks))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--evals", type=int, default=96,
                        help="configurations for the population modes (default 96; at most two populations per process)")
    parser.add_argument("--proc-evals", type=int, default=48,
                        help="configurations for the procs-K modes, K >= 8 (default 48; K < 8: K/8 of it)")
    parser.add_argument("--one-evals", type=int, default=4, help="configurations for the one-at-a-time mode (default 4)")
    parser.add_argument("--procs", default="8,16,4", help="K for the procs-K modes, in order (default 8,16,4)")
    parser.add_argument("--populations", default="32,16,8",
                        help="P (one process) or PxK (K processes) for the pop modes, in order (default 32,16,8)")
    parser.add_argument("--queue", type=int, default=3,
                        help="population_queue of the pop modes: configurations per lane one worker takes (default 3)")
    parser.add_argument("--order", default="procs8,pop,procs,auto,one",
                        help="which groups run first (procs8: the 8-process baseline first; default procs8,pop,procs,auto,one)")
    parser.add_argument("--deadline", type=float, default=None, help="start no mode after this many seconds")
    parser.add_argument("--cpu", action="store_true", help="smoke test on the CPU at tiny sizes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results as JSON here (after every mode)")
    args = parser.parse_args(argv)
    procs = [int(k) for k in args.procs.split(",") if k]
    pops = [tuple(int(x) for x in (p.split("x") + ["1"])[:2]) for p in args.populations.split(",") if p]
    if any(k < 1 for k in procs + [x for p in pops for x in p]) or min(args.evals, args.proc_evals, args.one_evals, args.queue) < 1:
        parser.error("--procs, --populations and the --*evals counts must be integers >= 1")

    import torch

    from problems.peft import PeftProblem

    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA GPU is visible to torch; use --cpu for a smoke test")
    options = CPU_OPTIONS if args.cpu else GPU_OPTIONS
    space = PeftProblem(**options).space
    rng = np.random.default_rng(args.seed)
    n = max(args.evals, args.proc_evals, args.one_evals)
    configs = [space.validate(c) for c in space.sample(n, rng)]
    warmup = [space.validate({**c, "steps": options["min_steps"]})
              for c in space.sample(max(procs + [p * k for p, k in pops] + [1]), rng)]

    groups = {"procs8": [("procs-8", 8, 1, args.proc_evals)] if 8 in procs else [],
              # at most two full populations per process: as many as a steady rate needs
              "pop": [(f"pop-{p}" + (f"x{k}" if k > 1 else ""), k, p, min(args.evals, 2 * p * args.queue * k))
                      for p, k in pops],
              "auto": [("auto", 0, 1, args.proc_evals)],
              # fewer for fewer processes, so every mode takes about as long
              "procs": [(f"procs-{k}", k, 1, max(1, args.proc_evals * min(k, 8) // 8)) for k in procs if k != 8],
              "one": [("one", 1, 1, args.one_evals)]}
    modes = [m for g in args.order.split(",") for m in groups[g]]
    results: list[dict[str, Any]] = []
    auto_choice = None
    start = time.time()
    with GpuSampler() as sampler:
        for name, k, p, count in modes:
            if args.deadline is not None and time.time() - start > args.deadline:
                print(f"{name}: skipped (past --deadline)", file=sys.stderr)
                continue
            if name == "auto":
                k = auto_processes(results, args.cpu)
                if k is None or any(r["mode"] == f"procs-{k}" for r in results):
                    print(f"auto: packing picks {k} processes (measured above, or nothing to pack by)", file=sys.stderr)
                    auto_choice = k
                    continue
                auto_choice = k
                count = max(1, args.proc_evals * min(k, 8) // 8)
            print(f"{name}: {count} evaluations, {k} process(es) x population {p}", file=sys.stderr, flush=True)
            results.append(run_mode(name, k, p, args.queue, configs[:count], warmup, options, sampler))
            if args.out:
                Path(args.out).write_text(json.dumps({"partial": True, "configs": configs, "results": results},
                                                     indent=2, default=str))
    report(results, configs, options, args)
    if auto_choice is not None or "auto" in args.order:
        print(f"automatic packing by measured GPU memory: {auto_choice} processes")
    if args.out:
        doc = {"options": options, "gpu": torch.cuda.get_device_name(0) if not args.cpu else None,
               "torch": torch.__version__, "bf16_peak_flops": BF16_PEAK, "configs": configs, "results": results}
        Path(args.out).write_text(json.dumps(doc, indent=2, default=str))
        print(f"written {args.out}")
    return 0


def report(results: list[dict[str, Any]], configs: list[dict[str, Any]], options: dict[str, Any], args: Any) -> None:
    where = "CPU (smoke test)" if args.cpu else "one GPU"
    print(f"\npeft evaluations on {where}: train {options['train_size']}, val {options['val_size']}, "
          f"{options['max_length']} tokens, batch {options['batch_size']}, steps {options['min_steps']}-{options['max_steps']}")
    print(f"{'mode':<9} {'evals':>5} {'failed':>6} {'warm-up s':>9} {'wall s':>7} {'evals/h':>8} {'GPU busy %':>10} "
          f"{'TFLOP/s':>8} {'% of peak':>9} {'GPU MiB':>8} {'eval peak MiB':>13}")
    for r in results:
        util = "-" if r["gpu_util_mean_pct"] is None else f"{r['gpu_util_mean_pct']:.1f}"
        mem = "-" if r["gpu_mem_max_mib"] is None else f"{r['gpu_mem_max_mib']:.0f}"
        peak = "-" if r["eval_peak_memory_mb"] is None else f"{r['eval_peak_memory_mb']:.0f}"
        print(f"{r['mode']:<9} {r['evaluations']:>5} {r['n_failed']:>6} {r['warmup_s']:>9.1f} {r['wall_s']:>7.1f} "
              f"{r['evals_per_hour']:>8.0f} {util:>10} {r['flops_per_s'] / 1e12:>8.2f} {100 * r['peak_fraction']:>9.2f} "
              f"{mem:>8} {peak:>13}")
    by = {r["mode"]: r for r in results}
    packed = [r for r in results if r["mode"].startswith("procs-")]
    pops = [r for r in results if r["mode"].startswith("pop-")]
    if packed and pops:
        best_pack = max(packed, key=lambda r: r["evals_per_hour"])
        best_pop = max(pops, key=lambda r: r["evals_per_hour"])
        print(f"best population ({best_pop['mode']}) / best process packing ({best_pack['mode']}), evaluations per hour: "
              f"{best_pop['evals_per_hour'] / best_pack['evals_per_hour']:.2f}")
        if "procs-8" in by:
            print(f"best population / procs-8, model FLOP/s: {best_pop['flops_per_s'] / by['procs-8']['flops_per_s']:.2f}")
    # Validation accuracy of the same configurations: each mode against the first one, on those both evaluated.
    if results:
        ref = results[0]
        print(f"validation accuracy, each mode against {ref['mode']} on the configurations both evaluated:")
        for r in results:
            both = sorted(set(r["accuracy"]) & set(ref["accuracy"]))
            if both:
                mean = statistics.fmean(r["accuracy"][k] for k in both)
                ref_mean = statistics.fmean(ref["accuracy"][k] for k in both)
                diff = statistics.fmean(abs(r["accuracy"][k] - ref["accuracy"][k]) for k in both)
                print(f"  {r['mode']:<9} {len(both):>3} configurations: mean {mean:.4f} ({ref['mode']} {ref_mean:.4f}), "
                      f"mean |difference| {diff:.4f}")

if __name__ == "__main__":
    sys.exit(main())
