"""Automatic packing: evaluations per GPU from measured memory (the policy is arithmetic: CPU-tested)."""

from __future__ import annotations

import pytest

from evaluators.base import Outcome
from evaluators.packing import GPU_SOURCE, MemoryPacker, PackingPolicy
from qd.problem import Evaluation

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
