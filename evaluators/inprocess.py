"""``inprocess``: evaluations run one at a time in the driver. No isolation: for debugging,
notebooks and problems that take microseconds.

A timeout (``--timeout`` or the problem's ``resources.timeout_s``) is enforced with ``SIGALRM``:
the evaluation is interrupted by an exception when its time is up, so Python code (a loop,
``time.sleep``) stops there; a single C call that holds the interpreter (one large matrix
product) ends first. Signals reach only the main thread, so a timeout given explicitly is refused
in another thread; use the ``process`` evaluator when an evaluation must be killed outright.

A problem whose ``max_population`` P is above 1 gets up to P queued jobs in one
``evaluate_population`` call (the timeout then bounds the call).
"""

from __future__ import annotations

import signal
import threading
import time
import warnings
from collections import deque

from evaluators.base import Evaluator, Job, Outcome, evaluate_jobs, population_size
from qd.problem import Problem


class EvaluationTimeout(BaseException):
    """Raised inside an evaluation past its timeout. A ``BaseException``, so an evaluation's own
    ``except Exception`` does not swallow it."""


def _alarm(signum: int, frame: object) -> None:
    raise EvaluationTimeout()


class InProcessEvaluator(Evaluator):
    """Evaluations in the calling process, one job (or population) per ``wait``; timeouts by SIGALRM."""

    name = "inprocess"
    #: Evaluations run inside ``wait``: the run loop need not flush before it (nothing idles).
    synchronous = True

    def __init__(self) -> None:
        self._queue: deque[Job] = deque()
        self._problem: Problem | None = None
        self._timeout_s: float | None = None

    def start(self, problem: Problem, workers: int, timeout_s: float | None = None) -> None:
        """Prepare to evaluate ``problem`` (``workers`` is accepted; evaluations run one at a time).

        Args:
            problem: The problem to evaluate; its ``resources`` give the default timeout.
            workers: Evaluations in flight at once (>= 1).
            timeout_s: Bound on one evaluation (or one population call); None: the problem's.

        Raises:
            ValueError: ``timeout_s`` is given outside the main thread (SIGALRM cannot reach it); a
                problem's own timeout there is dropped with a warning instead.
        """
        self._problem = problem
        self._timeout_s = timeout_s if timeout_s is not None else problem.resources.timeout_s
        if self._timeout_s is not None and threading.current_thread() is not threading.main_thread():
            if timeout_s is not None:
                raise ValueError(f"timeout_s={timeout_s:g}: the inprocess evaluator enforces timeouts with SIGALRM, "
                                 f"which only the main thread receives; allowed here: no timeout, or the 'process' "
                                 f"or 'ray' evaluator")
            warnings.warn(f"the problem's timeout of {self._timeout_s:g} s is not enforced: the inprocess evaluator "
                          f"runs outside the main thread", RuntimeWarning, stacklevel=2)
            self._timeout_s = None

    def submit(self, job: Job) -> None:
        """Queue ``job``; its outcome comes back from ``wait``.

        Args:
            job: The configuration to evaluate, with its key and seed.
        """
        self._queue.append(job)

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        """Evaluate the next queued job, or the next ``max_population`` of them in one call.

        Args:
            timeout: Ignored: the evaluation runs now, bounded by the start's timeout.

        Returns:
            Their outcomes; [] when nothing is queued. An error or timeout is an outcome, never
            an exception.
        """
        if not self._queue:
            return []
        jobs = [self._queue.popleft() for _ in range(min(population_size(self._problem), len(self._queue)))]
        t0 = time.perf_counter()
        limit = self._timeout_s
        previous, installed = None, False
        try:
            if limit is not None:
                previous, installed = signal.signal(signal.SIGALRM, _alarm), True
                signal.setitimer(signal.ITIMER_REAL, limit)
            try:
                replies = evaluate_jobs(self._problem, jobs)
            finally:
                if limit is not None:
                    signal.setitimer(signal.ITIMER_REAL, 0)
        except EvaluationTimeout:
            what = "evaluation" if len(jobs) == 1 else f"population of {len(jobs)} evaluations"
            return [Outcome(j.key, error=f"{what} exceeded {limit:g} s and was interrupted", kind="timeout",
                            metadata={"wall_time_s": time.perf_counter() - t0}) for j in jobs]
        finally:
            if installed:
                signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)
        meta = {"wall_time_s": time.perf_counter() - t0, **({"population": len(jobs)} if len(jobs) > 1 else {})}
        return [Outcome(key, payload, metadata=dict(meta)) if kind == "ok" else
                Outcome(key, error=payload, kind=kind, metadata=dict(meta)) for kind, key, payload in replies]

    def close(self) -> None:
        """Drop queued jobs."""
        self._queue.clear()
