"""``inprocess``: evaluations run one at a time in the driver. No isolation, no timeouts: for
debugging, notebooks and problems that take microseconds."""

from __future__ import annotations

import time
from collections import deque

from evaluators.base import Evaluator, Job, Outcome, error_text
from qd.problem import Problem


class InProcessEvaluator(Evaluator):
    name = "inprocess"
    #: Evaluations run inside ``wait``: the run loop need not flush before it (nothing idles).
    synchronous = True

    def __init__(self) -> None:
        self._queue: deque[Job] = deque()
        self._problem: Problem | None = None

    def start(self, problem: Problem, workers: int, timeout_s: float | None = None) -> None:
        self._problem = problem

    def submit(self, job: Job) -> None:
        self._queue.append(job)

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        if not self._queue:
            return []
        job = self._queue.popleft()
        t0 = time.perf_counter()
        try:
            evaluation = self._problem.evaluate(job.config, job.seed)
            return [Outcome(job.key, evaluation, metadata={"wall_time_s": time.perf_counter() - t0})]
        except MemoryError as e:
            return [Outcome(job.key, error=error_text(e), kind="oom", metadata={"wall_time_s": time.perf_counter() - t0})]
        except Exception as e:
            return [Outcome(job.key, error=error_text(e), kind="exception", metadata={"wall_time_s": time.perf_counter() - t0})]

    def close(self) -> None:
        self._queue.clear()
