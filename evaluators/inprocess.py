"""``inprocess``: evaluations run one at a time in the driver. No isolation: for debugging,
notebooks and problems that take microseconds.

A timeout (``--timeout`` or the problem's ``resources.timeout_s``) is enforced with ``SIGALRM``:
the evaluation is interrupted by an exception when its time is up, so Python code (a loop,
``time.sleep``) stops there; a single C call that holds the interpreter (one large matrix
product) ends first. Signals reach only the main thread, so a timeout given explicitly is refused
in another thread; use the ``process`` evaluator when an evaluation must be killed outright.
"""

from __future__ import annotations

import signal
import threading
import time
import warnings
from collections import deque

from evaluators.base import Evaluator, Job, Outcome, error_text
from qd.problem import Problem


class EvaluationTimeout(BaseException):
    """Raised inside an evaluation past its timeout. A ``BaseException``, so an evaluation's own
    ``except Exception`` does not swallow it."""


def _alarm(signum: int, frame: object) -> None:
    raise EvaluationTimeout()


class InProcessEvaluator(Evaluator):
    name = "inprocess"
    #: Evaluations run inside ``wait``: the run loop need not flush before it (nothing idles).
    synchronous = True

    def __init__(self) -> None:
        self._queue: deque[Job] = deque()
        self._problem: Problem | None = None
        self._timeout_s: float | None = None

    def start(self, problem: Problem, workers: int, timeout_s: float | None = None) -> None:
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
        self._queue.append(job)

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        if not self._queue:
            return []
        job = self._queue.popleft()
        t0 = time.perf_counter()
        limit = self._timeout_s
        previous, installed = None, False
        try:
            if limit is not None:
                previous, installed = signal.signal(signal.SIGALRM, _alarm), True
                signal.setitimer(signal.ITIMER_REAL, limit)
            try:
                evaluation = self._problem.evaluate(job.config, job.seed)
            finally:
                if limit is not None:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            return [Outcome(job.key, evaluation, metadata={"wall_time_s": time.perf_counter() - t0})]
        except EvaluationTimeout:
            return [Outcome(job.key, error=f"evaluation exceeded {limit:g} s and was interrupted", kind="timeout",
                            metadata={"wall_time_s": time.perf_counter() - t0})]
        except MemoryError as e:
            return [Outcome(job.key, error=error_text(e), kind="oom", metadata={"wall_time_s": time.perf_counter() - t0})]
        except Exception as e:
            return [Outcome(job.key, error=error_text(e), kind="exception", metadata={"wall_time_s": time.perf_counter() - t0})]
        finally:
            if installed:
                signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)

    def close(self) -> None:
        self._queue.clear()
