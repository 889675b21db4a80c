"""Automatic packing: how many evaluations share one GPU, from the GPU memory they were measured to use.

Where a user sets no GPU share per evaluation, a fixed guess either wastes the chip (too few at once)
or runs out of memory (too many). ``PackingPolicy`` turns measured peaks into a count of evaluations
per GPU (and the matching fraction for Ray's ``num_gpus``): each worker process costs its CUDA context
and allocator slack on top of the evaluation's own peak, and the sum stays under a utilisation target
of the GPU's memory. ``MemoryPacker`` gathers the peaks from finished outcomes
(``metadata["peak_memory_mb"]`` with source ``cuda_max_memory_allocated``, as the peft problem
reports it) and answers with the policy once it has seen enough of them; before that it keeps
the starting count, so a run starts cautiously and widens as it learns.

The ``process`` evaluator uses it with ``gpu_packing`` (a memory target, e.g. 0.85) for runs that
set no GPU share of their own: it keeps at most ``MemoryPacker.slots()`` evaluations (worker
processes) on the GPU, and at most ``workers``, growing as small peaks are measured and retiring
idle workers when a larger one comes in. The GPU's size comes with the outcomes too
(``metadata["gpu_total_mb"]``, as the peft problem reports it), so the driver never initialises CUDA.

The policy is arithmetic on numbers, so it is tested on a CPU (``tests/test_packing.py``, with a
real process pool and run loop for the wiring); the GPU benchmark ``experiments/gpu_population.py``
applies it to the memory its warm-up evaluations measured.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from qd.checks import is_int

#: The metadata source that says a peak is GPU memory (CPU peaks are process RSS: not packed by).
GPU_SOURCE = "cuda_max_memory_allocated"


@dataclass(frozen=True)
class PackingPolicy:
    """Evaluations per GPU from their measured memory.

    Attributes:
        target: fraction of the GPU's memory the packed evaluations may fill, in (0, 1].
        context_mb: memory each worker process holds besides its evaluation's peak (CUDA context,
            cuBLAS workspace): about 500-600 MiB on current GPUs.
        slack: factor on each measured peak for the caching allocator's reserve and run-to-run
            variation (>= 1).
        max_slots: the most evaluations per GPU whatever the memory says (past some count, more
            processes only add contention for the chip: on one H200, peft at 16 processes ran slower
            than at 8).
    """

    target: float = 0.85
    context_mb: float = 600.0
    slack: float = 1.25
    max_slots: int = 8

    def __post_init__(self) -> None:
        if not 0 < self.target <= 1:
            raise ValueError(f"PackingPolicy target={self.target!r} is not allowed; allowed: a fraction in (0, 1]")
        for name, value, low in (("context_mb", self.context_mb, 0.0), ("slack", self.slack, 1.0)):
            if not math.isfinite(value) or value < low:
                raise ValueError(f"PackingPolicy {name}={value!r} is not allowed; allowed: a number >= {low:g}")
        if not (is_int(self.max_slots) and self.max_slots >= 1):
            raise ValueError(f"PackingPolicy max_slots={self.max_slots!r} is not allowed; allowed: an integer >= 1")

    def per_slot_mb(self, peak_mb: float) -> float:
        """GPU memory one packed evaluation is charged: its peak with slack, plus its process's context."""
        return peak_mb * self.slack + self.context_mb

    def slots(self, gpu_total_mb: float, peak_mb: float) -> int:
        """Evaluations to run at once on one GPU.

        Args:
            gpu_total_mb: the GPU's memory in MiB.
            peak_mb: the largest measured peak of one evaluation in MiB (> 0).

        Returns:
            an integer in [1, max_slots]: 1 also when even one evaluation exceeds the target (it may
            still fit the whole GPU; the target is a margin, not a limit on a lone evaluation).
        """
        if not gpu_total_mb > 0:
            raise ValueError(f"gpu_total_mb={gpu_total_mb!r} is not allowed; allowed: a number > 0")
        if not peak_mb > 0 or not math.isfinite(peak_mb):
            raise ValueError(f"peak_mb={peak_mb!r} is not allowed; allowed: a finite number > 0")
        fit = int(self.target * gpu_total_mb // self.per_slot_mb(peak_mb))
        return max(1, min(self.max_slots, fit))

    def gpu_fraction(self, gpu_total_mb: float, peak_mb: float) -> float:
        """The GPU share per evaluation that packs ``slots`` of them (Ray's ``num_gpus``)."""
        return 1.0 / self.slots(gpu_total_mb, peak_mb)


@dataclass
class MemoryPacker:
    """Learns the evaluations-per-GPU count of a run from its finished outcomes.

    Attributes:
        gpu_total_mb: the GPU's memory in MiB (None: as the outcomes report it, ``gpu_total_mb`` in
            their metadata).
        policy: how peaks become a count.
        start: the count before ``min_samples`` GPU peaks have been seen.
        min_samples: peaks to see before trusting them.
    """

    gpu_total_mb: float | None
    policy: PackingPolicy = field(default_factory=PackingPolicy)
    start: int = 1
    min_samples: int = 2
    peaks: list[float] = field(default_factory=list)
    seen: int = 0  # successful outcomes observed, with a GPU peak or not

    def observe(self, outcomes: Iterable[Any]) -> None:
        """Record the GPU peak of every successful outcome (``Outcome`` objects of any evaluator)."""
        for o in outcomes:
            evaluation = getattr(o, "evaluation", None)
            if evaluation is None:
                continue
            self.seen += 1
            meta = getattr(evaluation, "metadata", None) or {}
            peak, total = meta.get("peak_memory_mb"), meta.get("gpu_total_mb")
            if self.gpu_total_mb is None and isinstance(total, (int, float)) and total > 0:
                self.gpu_total_mb = float(total)
            if meta.get("peak_memory_source") == GPU_SOURCE and isinstance(peak, (int, float)) and peak > 0:
                self.peaks.append(float(peak))

    def slots(self, otherwise: int | None = None) -> int:
        """The count to use now: ``start`` until enough peaks, then the policy on the largest seen.

        Args:
            otherwise: the count once ``min_samples`` evaluations have succeeded without a GPU peak
                (or without the GPU's size): nothing to pack by (None: keep ``start``).
        """
        if len(self.peaks) < self.min_samples or self.gpu_total_mb is None:
            if otherwise is not None and self.seen >= self.min_samples:
                return otherwise
            return self.start
        return self.policy.slots(self.gpu_total_mb, max(self.peaks))
