"""Where a population step's GPU time goes: time per captured step by adapter method and by lanes,
and the costliest kernels of an eager step.

The same sampled configurations as ``experiments/gpu_population.py`` (its sizes), steps cut to
``--cap``. For each row: P lanes training members of one method (or all methods mixed, as runs
draw them), the step captured as a CUDA graph; printed: ms per step and ms per step per lane. Then
one eager step of the mixed population under ``torch.profiler``: kernels per step and the kernels
that take most GPU time.

    python experiments/gpu_population_profile.py --lanes 32,64,128 --cap 40
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


def sample(problem, n: int, method: str | None, seed: int) -> list[dict]:
    space = problem.space
    rng = np.random.default_rng(seed)
    out: list[dict] = []
    while len(out) < n:
        for c in space.sample(4 * n, rng):
            c = space.validate(c)
            if method is None or c["method"] == method:
                out.append(c)
            if len(out) == n:
                break
    return out


def members_of(problem, configs, steps: int):
    """The configurations as population members, each cut to ``steps`` (every lane busy every step)."""
    from problems import peft_population as pp

    members, alone, failed = pp._members(problem, configs, list(range(len(configs))))
    assert not alone and not failed, (alone, failed)
    for m in members:
        m.steps = steps
    return members


def step_time(problem, configs, lanes: int, steps: int, graphs: bool = True) -> float:
    import torch

    from problems import peft_population as pp

    members = members_of(problem, configs, steps)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    pp.train_population(problem, members, lanes=lanes, graphs=graphs)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lanes", default="32,64,128", help="lanes P of the mixed rows (default 32,64,128)")
    parser.add_argument("--method-lanes", type=int, default=0, help="lanes of the one-method rows (default 0: none)")
    parser.add_argument("--variants", default="grouped:torch,merged:torch,merged:efficient",
                        help="adapter path (grouped or merged) and attention kernels (torch's choice or efficient) "
                             "of the mixed rows; the last one is profiled (default grouped:torch,merged:torch,merged:efficient)")
    parser.add_argument("--cap", type=int, default=40, help="steps of every member (default 40)")
    parser.add_argument("--profile-lanes", type=int, default=64, help="lanes of the profiled eager step (0: none)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    import torch

    from problems import peft_population as pp
    from problems.peft import PeftProblem

    problem = PeftProblem(**GPU_OPTIONS, population=max(int(x) for x in args.lanes.split(",")), population_queue=1)
    problem.evaluate_population(sample(problem, 2, None, 99), [0, 1])  # warm-up: model, data, CUDA
    rows = []
    plan = [(v, None, lanes) for v in args.variants.split(",") for lanes in [int(x) for x in args.lanes.split(",")]]
    if args.method_lanes:
        plan += [(args.variants.split(",")[-1], m, args.method_lanes) for m in problem.methods]
    for variant, method, lanes in plan:
        path, attention = variant.split(":")
        pp.MERGED = path == "merged"
        pp.SDPA_BACKENDS = None if attention == "torch" else ("EFFICIENT_ATTENTION", "FLASH_ATTENTION", "MATH")
        torch.cuda.reset_peak_memory_stats()
        configs = sample(problem, lanes, method, 0)
        ms = 1e3 * step_time(problem, configs, lanes, args.cap)
        rows.append({"variant": variant, "method": method or "mixed", "lanes": lanes, "ms_per_step": ms})
        print(f"{variant:<18} {method or 'mixed':<6} lanes {lanes:<4} {ms:7.2f} ms/step  {ms / lanes:6.3f} ms/step/lane  "
              f"peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=2))
    if args.profile_lanes:
        from torch.profiler import ProfilerActivity, profile

        members = members_of(problem, sample(problem, args.profile_lanes, None, 0), 3)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            pp.train_population(problem, members, lanes=args.profile_lanes, graphs=False)
            torch.cuda.synchronize()
        events = prof.key_averages()
        kernels = sum(e.count for e in events if e.device_type.name == "CUDA") / 3
        total = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 3 / 1e3
        print(f"eager step, {args.profile_lanes} lanes: {kernels:.0f} kernels, {total:.1f} ms of GPU time per step")
        print(events.table(sort_by="self_device_time_total", row_limit=args.top, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    sys.exit(main())
