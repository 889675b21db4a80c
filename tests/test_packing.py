"""Automatic packing: evaluations per GPU from measured memory (the policy is arithmetic: CPU-tested)."""

from __future__ import annotations

import os
import time

import pytest

from evaluators.base import Outcome
from evaluators.packing import GPU_SOURCE, MemoryPacker, PackingPolicy
from qd.problem import Evaluation
from qd.registry import get_problem

ZDT1 = get_problem("zdt1").__class__

H200_MB = 143_771.0


def test_slots_fill_memory_up_to_the_target_and_no_further():
    policy = PackingPolicy(target=0.8, context_mb=500.0, slack=1.0, max_slots=64)
    # 0.8 * 10,000 MiB over 1,500 MiB per slot (1,000 peak + 500 context): 5 slots, not 6.
    assert policy.slots(10_000.0, 1_000.0) == 5
    assert policy.per_slot_mb(1_000.0) * 5 <= 0.8 * 10_000.0 < policy.per_slot_mb(1_000.0) * 6
    # More memory per evaluation: fewer slots; a larger GPU: more.
    assert policy.slots(10_000.0, 3_000.0) == 2 < policy.slots(40_000.0, 3_000.0) == 9
    assert policy.gpu_fraction(10_000.0, 1_000.0) == pytest.approx(0.2)


def test_slots_are_capped_and_never_zero():
    policy = PackingPolicy(max_slots=8)
    assert policy.slots(H200_MB, 300.0) == 8  # a small evaluation: the cap, not hundreds of processes
    assert policy.slots(10_000.0, 50_000.0) == 1  # larger than the target: still one at a time


def test_slack_and_context_are_charged_per_slot():
    tight = PackingPolicy(target=1.0, context_mb=0.0, slack=1.0, max_slots=100)
    padded = PackingPolicy(target=1.0, context_mb=0.0, slack=2.0, max_slots=100)
    assert tight.slots(1_000.0, 100.0) == 10 and padded.slots(1_000.0, 100.0) == 5


@pytest.mark.parametrize("kwargs, field", [({"target": 0.0}, "target"), ({"target": 1.5}, "target"),
                                            ({"slack": 0.5}, "slack"), ({"context_mb": -1.0}, "context_mb"),
                                            ({"max_slots": 0}, "max_slots")])
def test_bad_policy_is_refused_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"{field}="):
        PackingPolicy(**kwargs)


def test_bad_measurements_are_refused():
    with pytest.raises(ValueError, match="peak_mb"):
        PackingPolicy().slots(H200_MB, 0.0)
    with pytest.raises(ValueError, match="gpu_total_mb"):
        PackingPolicy().slots(0.0, 100.0)


def _outcome(key: int, peak: float, source: str = GPU_SOURCE) -> Outcome:
    return Outcome(key, Evaluation(values={"f": 0.0}, metadata={"peak_memory_mb": peak, "peak_memory_source": source}))


def test_packer_starts_cautious_then_packs_by_the_largest_gpu_peak():
    packer = MemoryPacker(H200_MB, PackingPolicy(max_slots=64), start=1, min_samples=2)
    assert packer.slots() == 1
    packer.observe([_outcome(0, 4_000.0), _outcome(1, 90_000.0, source="process_peak_rss")])  # RSS: ignored
    assert packer.slots() == 1 and packer.peaks == [4_000.0]
    packer.observe([_outcome(2, 6_000.0), Outcome(3, error="boom", kind="exception")])  # failures: ignored
    assert packer.slots() == PackingPolicy(max_slots=64).slots(H200_MB, 6_000.0) == 15


def test_packer_learns_the_gpu_size_from_outcomes_and_opens_up_when_nothing_reports_gpu_memory():
    packer = MemoryPacker(None, PackingPolicy(max_slots=64), start=1, min_samples=2)
    total = Evaluation(values={"f": 0.0}, metadata={"peak_memory_mb": 6_000.0, "peak_memory_source": GPU_SOURCE,
                                                    "gpu_total_mb": H200_MB})
    packer.observe([Outcome(0, total), Outcome(1, total)])
    assert packer.gpu_total_mb == H200_MB and packer.slots() == 15
    cpu = MemoryPacker(None, start=1, min_samples=2)
    cpu.observe([_outcome(0, 500.0, source="process_peak_rss")])
    assert cpu.slots(otherwise=6) == 1  # not enough seen yet
    cpu.observe([_outcome(1, 500.0, source="process_peak_rss")])
    assert cpu.slots(otherwise=6) == 6 and cpu.slots() == 1


# --- the run loop with automatic packing on a real process pool ------------------------------------
GPU_MB = 10_000.0
SMALL_MB, LARGE_MB = 400.0, 3_000.0  # 0.8 * 10,000 MiB: 7 small evaluations, or 1 large, with 600 MiB each besides


class _GpuLike(ZDT1):
    """zdt1 whose evaluations report a GPU peak (as the peft problem does): small until ``small``
    evaluations have run in processes other than the first one (counted in a shared file, so the
    phase ends only once the pool has grown, however long its workers take to start), large after."""

    def __init__(self, log: str, small: int, sleep_s: float = 0.5):
        super().__init__(dim=3)
        self.log, self.small, self.sleep_s = log, small, sleep_s

    def evaluate(self, config, seed):
        started = time.time()
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")
        with open(self.log) as f:
            pids = f.read().split()
        peak = SMALL_MB if sum(p != pids[0] for p in pids) <= self.small else LARGE_MB
        time.sleep(self.sleep_s if peak == SMALL_MB else self.sleep_s / 5)  # a short tail after the switch
        result = super().evaluate(config, seed)
        result.metadata = {"peak_memory_mb": peak, "peak_memory_source": GPU_SOURCE, "gpu_total_mb": GPU_MB,
                           "t0": started, "t1": time.time(), "n": len(pids), "pid": os.getpid()}
        return result


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    return max(sum(a <= t < b for a, b in spans) for t, _ in spans) if spans else 0


def test_the_run_loop_packs_process_workers_by_measured_gpu_memory(tmp_path):
    from evaluators.process import ProcessPoolEvaluator
    from qd.run import run
    from qd.store import RunInfo, Store
    from qd.strategies import get_strategy

    problem = _GpuLike(str(tmp_path / "count"), small=6)
    info = RunInfo(name="pack", problem="zdt1", problem_options={"dim": 3}, strategy="random",
                   strategy_options={}, seed=0)
    store = Store.create(f"sqlite:///{tmp_path}/runs.db", info, problem)
    evaluator = ProcessPoolEvaluator(gpu_packing=0.8)
    report = run(problem, get_strategy("random", problem, seed=0), evaluator, store, budget=40, workers=6,
                 progress=False)
    assert report.finished == 40
    meta = sorted((t.metadata for t in store.trials(["complete"])), key=lambda m: m["n"])
    assert len(meta) == 40
    spans = [(m["t0"], m["t1"]) for m in meta]
    # Before two peaks were measured: one at a time (the first two do not overlap).
    assert spans[0][1] <= spans[1][0]
    # Small peaks: the policy allows 6 (= workers, under its 7) and the pool grew past one worker.
    assert PackingPolicy(target=0.8, max_slots=6).slots(GPU_MB, SMALL_MB) == 6
    small = [m for m in meta if m["peak_memory_mb"] == SMALL_MB]
    assert len({m["pid"] for m in small}) >= 3 and _most_at_once([(m["t0"], m["t1"]) for m in small]) >= 2
    # A large peak allows one: once the driver has seen it, evaluations no longer overlap.
    assert PackingPolicy(target=0.8, max_slots=6).slots(GPU_MB, LARGE_MB) == 1
    seen = min(m["t1"] for m in meta if m["peak_memory_mb"] == LARGE_MB) + 1.0  # the busy ones drained by then
    later = [s for s in spans if s[0] > seen]
    assert len(later) >= 3 and _most_at_once(later) == 1
    assert evaluator.packer is not None and max(evaluator.packer.peaks) == LARGE_MB


@pytest.mark.parametrize("bad", [0.0, 1.5, "0.8", True])
def test_a_bad_gpu_packing_option_is_refused_naming_it(bad):
    from evaluators.process import ProcessPoolEvaluator

    with pytest.raises(ValueError, match="gpu_packing="):
        ProcessPoolEvaluator(gpu_packing=bad)
