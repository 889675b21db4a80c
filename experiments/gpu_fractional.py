"""Fractional GPUs through the Ray evaluator: several small trainings per GPU vs one per GPU.

Each evaluation is a real training of the ``arch`` problem (an MLP or CNN on the vendored MNIST
test split, read from its IDX files). The same configurations are evaluated twice through
``RayEvaluator``:

- ``fractional``: each evaluation declares ``gpus = 1/share`` (default 1/4), with ``share``
  evaluations in flight per GPU;
- ``whole``: each evaluation declares ``gpus = 1``, one in flight per GPU.

Reported for each: wall time, evaluations per hour, mean GPU utilisation (``nvidia-smi``
sampled every half second in a thread, averaged over the phase and the GPUs), peak GPU memory,
how many evaluations ran at once, and failures. Small networks leave most of a GPU idle (kernel
launches and Python dominate), which sharing recovers; the ratio of evaluations per hour is the
figure of merit.

Needs only torch, ray and optuna besides this repository (no network, no install: the repository
is put on the workers' path). ``--cpu`` runs a smoke test without a GPU: the training runs on the
CPU and Ray is given one *logical* GPU, so the scheduling is exercised as on a GPU machine.

    python experiments/gpu_fractional.py --out gpu_fractional.json                 # on one H200 GPU
    python experiments/gpu_fractional.py --cpu --evals 4 --max-epochs 1            # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Ray's workers inherit the environment of the local Ray started below: they can import the repository.
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])


class GpuSampler:
    """Samples ``nvidia-smi`` utilisation and memory of every GPU every ``interval_s`` in a thread."""

    QUERY = ["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used", "--format=csv,noheader,nounits"]

    def __init__(self, interval_s: float = 0.5):
        self.interval_s = interval_s
        self.available = shutil.which("nvidia-smi") is not None
        self.samples: list[tuple[float, int, float, float]] = []  # (time, gpu, utilisation %, memory MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gpu-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(self.QUERY, capture_output=True, text=True, timeout=10).stdout
                now = time.time()
                for line in out.strip().splitlines():
                    index, util, mem = (part.strip() for part in line.split(","))
                    self.samples.append((now, int(index), float(util), float(mem)))
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            self._stop.wait(self.interval_s)

    def __enter__(self) -> GpuSampler:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self.available:
            self._thread.join(timeout=15)

    def between(self, t0: float, t1: float) -> dict[str, float | None]:
        rows = [s for s in self.samples if t0 <= s[0] <= t1]
        if not rows:
            return {"gpu_util_mean_pct": None, "gpu_util_max_pct": None, "gpu_mem_max_mib": None, "samples": 0}
        return {"gpu_util_mean_pct": statistics.fmean(r[2] for r in rows), "gpu_util_max_pct": max(r[2] for r in rows),
                "gpu_mem_max_mib": max(r[3] for r in rows), "samples": len(rows)}


def configurations(problem: Any, n: int, max_epochs: int, seed: int) -> list[dict[str, Any]]:
    """``n`` configurations of the arch space (uniform draws, epochs capped), the same for both phases."""
    rng = np.random.default_rng(seed)
    out = []
    for config in problem.space.sample(n, rng):
        config["epochs"] = min(config["epochs"], max_epochs)
        out.append(problem.space.validate(config))
    return out


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    depth = best = 0
    for _, step in events:
        depth += step
        best = max(best, depth)
    return best


def run_phase(name: str, problem: Any, configs: list[dict[str, Any]], workers: int, sampler: GpuSampler,
              timeout_s: float | None) -> dict[str, Any]:
    """Evaluate every configuration with ``workers`` in flight; keep all of them busy."""
    from evaluators import Job
    from evaluators.ray_cluster import RayEvaluator

    evaluator = RayEvaluator(max_retries=1)
    evaluator.start(problem, workers, timeout_s)
    queue = list(enumerate(configs))
    outcomes = []
    t0 = time.time()
    try:
        while queue and len(queue) > len(configs) - workers:  # fill every slot
            key, config = queue.pop(0)
            evaluator.submit(Job(key, config, seed=key))
        while len(outcomes) < len(configs):
            for outcome in evaluator.wait():
                outcomes.append(outcome)
                if queue:
                    key, config = queue.pop(0)
                    evaluator.submit(Job(key, config, seed=key))
                print(f"  {name}: {len(outcomes)}/{len(configs)} done", file=sys.stderr, flush=True)
    finally:
        evaluator.close()
    t1 = time.time()
    ok = [o for o in outcomes if o.ok]
    failures = [f"{o.kind}: {o.error.splitlines()[0]}" for o in outcomes if not o.ok]
    wall = t1 - t0
    return {
        "phase": name, "gpus_per_eval": problem.resources.gpus, "workers": workers, "evaluations": len(outcomes),
        "complete": len(ok), "failures": failures[:10], "n_failed": len(failures), "wall_s": wall,
        "evals_per_hour": len(outcomes) / wall * 3600.0,
        "eval_wall_mean_s": statistics.fmean(o.metadata["wall_time_s"] for o in ok) if ok else None,
        "max_concurrent": max_overlap([(o.metadata["started_at"], o.metadata["ended_at"]) for o in ok]) if ok else 0,
        "accuracy_mean": statistics.fmean(o.evaluation.values["accuracy"] for o in ok) if ok else None,
        "devices": sorted({o.evaluation.metadata.get("device", "?") for o in ok}),
        **sampler.between(t0, t1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--evals", type=int, default=48, help="evaluations per phase (default 48)")
    parser.add_argument("--share", type=int, default=4, help="evaluations per GPU in the fractional phase (default 4)")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all torch sees)")
    parser.add_argument("--max-epochs", type=int, default=3, help="cap on a configuration's epochs (default 3)")
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "digits"], help="arch dataset (default mnist)")
    parser.add_argument("--timeout", type=float, default=None, help="per-evaluation timeout in seconds")
    parser.add_argument("--phases", default="fractional,whole", help="which phases, in order (default both)")
    parser.add_argument("--cpu", action="store_true", help="smoke test without a GPU (one logical GPU for Ray)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if not phases or set(phases) - {"fractional", "whole"}:
        parser.error(f"--phases {args.phases!r} is not allowed; allowed: 'fractional', 'whole' or both, comma-separated")
    if args.share < 1 or args.evals < 1 or args.max_epochs < 1:
        parser.error("--share, --evals and --max-epochs must be integers >= 1")

    import ray
    import torch

    from problems.arch import ArchProblem

    if args.cpu:
        n_gpus, device = 1, "cpu"  # a logical GPU: Ray schedules by it, the training runs on the CPU
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA GPU is visible to torch; use --cpu for a smoke test")
        n_gpus, device = args.gpus or torch.cuda.device_count(), "cuda"
    cpus = os.cpu_count() or 1
    if n_gpus * args.share > cpus:
        print(f"note: {n_gpus * args.share} evaluations in flight on {cpus} CPU cores", file=sys.stderr)
    ray.init(num_cpus=max(cpus, n_gpus * args.share), num_gpus=n_gpus, include_dashboard=False,
             logging_level=logging.WARNING, log_to_driver=False)

    base = ArchProblem(dataset=args.dataset, device=device)
    configs = configurations(base, args.evals, args.max_epochs, args.seed)
    results = []
    with GpuSampler() as sampler:
        for phase in phases:
            gpus = 1.0 / args.share if phase == "fractional" else 1.0
            workers = n_gpus * (args.share if phase == "fractional" else 1)
            problem = ArchProblem(dataset=args.dataset, device=device, gpus_per_eval=gpus)
            # Declared explicitly: on --cpu the arch problem would declare no GPU at all.
            problem.resources = dataclasses.replace(problem.resources, gpus=gpus, cpus=1)
            print(f"{phase}: {len(configs)} evaluations, {gpus:g} GPU each, {workers} in flight", file=sys.stderr)
            results.append(run_phase(phase, problem, configs, workers, sampler, args.timeout))
            if args.out:  # after each phase, so a run cut short still leaves what it measured
                Path(args.out).write_text(json.dumps({"partial": True, "results": results}, indent=2, default=str))
    ray.shutdown()

    print(f"\n{len(configs)} arch evaluations ({args.dataset}, epochs <= {args.max_epochs}) on {n_gpus} "
          f"{'logical GPU (CPU smoke test)' if args.cpu else 'GPU(s)'}")
    print(f"{'phase':<11} {'gpu/eval':>8} {'in flight':>9} {'wall s':>8} {'evals/h':>9} {'gpu util %':>10} "
          f"{'max at once':>11} {'failed':>6}")
    for r in results:
        util = "-" if r["gpu_util_mean_pct"] is None else f"{r['gpu_util_mean_pct']:.1f}"
        print(f"{r['phase']:<11} {r['gpus_per_eval']:>8.3g} {r['workers']:>9} {r['wall_s']:>8.1f} "
              f"{r['evals_per_hour']:>9.0f} {util:>10} {r['max_concurrent']:>11} {r['n_failed']:>6}")
    by = {r["phase"]: r for r in results}
    speedup = by["fractional"]["evals_per_hour"] / by["whole"]["evals_per_hour"] if len(by) == 2 else None
    if speedup is not None:
        print(f"fractional / whole evaluations per hour: {speedup:.2f}")
    if args.out:
        gpu_names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if not args.cpu else []
        doc = {"evals": len(configs), "share": args.share, "gpus": n_gpus, "cpu_smoke_test": args.cpu,
               "dataset": args.dataset, "max_epochs": args.max_epochs, "speedup_evals_per_hour": speedup,
               "machine": {"cpus": cpus, "gpu_names": gpu_names, "torch": torch.__version__, "ray": ray.__version__,
                           "python": platform.python_version()},
               "configs": configs, "results": results}
        Path(args.out).write_text(json.dumps(doc, indent=2, default=str))
        print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
