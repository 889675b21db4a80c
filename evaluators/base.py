"""Evaluators: where evaluations run. One interface for in-process, process-pool and Ray.

The run loop submits ``Job``s and collects ``Outcome``s as they finish, in any order. An
evaluator never raises for a failing evaluation: exceptions, timeouts, crashed workers and
out-of-memory all come back as an ``Outcome`` with ``error`` set and a ``kind`` that says which.
"""

from __future__ import annotations

import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Literal

from qd.checks import is_int
from qd.problem import Evaluation, Problem
from qd.space import Config

FailureKind = Literal["exception", "timeout", "crash", "oom", "system"]


@dataclass(frozen=True)
class Job:
    """One evaluation to run.

    Args:
        key: the trial number; the ``Outcome`` carries it back.
        config: a valid configuration of the problem.
        seed: the evaluation's seed, passed to ``Problem.evaluate``.
    """

    key: int  # the trial number
    config: Config
    seed: int


@dataclass
class Outcome:
    """A finished evaluation, successful or not.

    Args:
        key: the ``Job``'s key.
        evaluation: what ``Problem.evaluate`` returned (None when it failed); the run loop checks
            it with ``Problem.normalise``.
        error: None on success, else the reason (``error_text``: the exception line, then the end of
            its traceback).
        kind: why it failed: ``"exception"``, ``"timeout"``, ``"crash"`` (the worker died),
            ``"oom"`` or ``"system"`` (the evaluator itself, e.g. a worker that did not start).
        metadata: ``wall_time_s``, ``worker``, ``peak_rss_mb``, ... as the evaluator measured them.
    """

    key: int
    evaluation: Evaluation | None = None
    error: str | None = None
    kind: FailureKind | None = None
    metadata: dict[str, Any] = field(default_factory=dict)  # wall_time_s, worker, peak_rss_mb, ...

    @property
    def ok(self) -> bool:
        """Whether the evaluation returned (``error`` is None)."""
        return self.error is None


def error_text(exc: BaseException, limit: int = 2000) -> str:
    """The exception line first, then the end of its traceback (where the cause usually is).

    An exception without a message (the allocator's ``MemoryError``, a bare ``raise KeyError()``)
    is described by what it means, so a recorded reason is never just ``MemoryError: ``.

    Args:
        exc: the exception.
        limit: the most characters of traceback kept (its end).

    Returns:
        The reason as recorded with a failed trial.
    """
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__
        message = ""
    if not message:
        message = _no_message(exc)
    head = f"{type(exc).__name__}: {message}"
    try:
        tb = "".join(traceback.format_exception(exc))
    except Exception:  # noqa: BLE001
        tb = ""
    return head if len(tb) <= len(head) else f"{head}\n{tb[-limit:]}"


def _no_message(exc: BaseException) -> str:
    if isinstance(exc, MemoryError):
        limit = address_space_limit_mb()
        where = f" under this worker's address-space limit of {limit} MiB" if limit else ""
        return f"(no message) an allocation failed: the evaluation ran out of memory{where}"
    return "(no message)"


def address_space_limit_mb() -> int | None:
    """This process's address-space limit in MiB (None: unlimited or unknown)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else soft // 2**20


class Evaluator(ABC):
    """Runs up to ``workers`` evaluations at once; the run loop's only view of where they run.

    The contract: ``start`` once, then any number of ``submit`` and ``wait`` calls, then ``close``
    (also as a context manager). An evaluator never raises for a failing evaluation: exceptions,
    timeouts, crashed workers and out-of-memory come back as an ``Outcome`` with ``error`` and
    ``kind`` set. Register a new one in ``evaluators.EVALUATORS``; its constructor's keyword
    arguments are its options.
    """

    name = ""
    #: True when evaluations run inside ``wait`` (the run loop then need not flush before it).
    synchronous: bool = False

    @abstractmethod
    def start(self, problem: Problem, workers: int, timeout_s: float | None = None) -> None:
        """Prepare workers for ``problem``.

        Args:
            problem: the problem to evaluate (sent to the workers once).
            workers: evaluations in flight at once (>= 1).
            timeout_s: a bound on one evaluation's time (None: the problem's
                ``resources.timeout_s``, else no bound); one that runs over comes back with kind
                ``"timeout"``.

        Raises:
            ValueError: a setting the evaluator cannot honour (e.g. a timeout the in-process
                evaluator cannot enforce outside the main thread).
        """

    @abstractmethod
    def submit(self, job: Job) -> None:
        """Start an evaluation; returns at once (a synchronous evaluator may queue it until ``wait``).

        Args:
            job: the evaluation; its ``key`` comes back in the ``Outcome``.
        """

    @abstractmethod
    def wait(self, timeout: float | None = None) -> list[Outcome]:
        """Block until at least one evaluation finishes, or ``timeout`` seconds pass.

        Args:
            timeout: the most seconds to wait (None: until one finishes).

        Returns:
            The outcomes finished since the last call, in any order; empty on timeout or when
            nothing is in flight. A crash, timeout or error is an outcome with its ``kind`` and
            reason, never an exception.
        """

    @abstractmethod
    def close(self) -> None:
        """Stop every worker and abandon unfinished evaluations."""

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def evaluate_jobs(problem: Problem, jobs: list[Job], catch: type[BaseException] = Exception) -> list[tuple[str, int, Any]]:
    """Evaluate jobs, several at once through ``evaluate_population`` when more than one is given.

    Returns one ``(status, key, evaluation or reason)`` per job, status "ok", "oom" or "exception";
    what the evaluations raise (``catch``: a worker process passes ``BaseException``) becomes a failure.
    """

    def failed(key: int, e: BaseException) -> tuple[str, int, Any]:
        return ("oom" if isinstance(e, MemoryError) else "exception", key, error_text(e))

    if len(jobs) == 1:
        try:
            return [("ok", jobs[0].key, problem.evaluate(jobs[0].config, jobs[0].seed))]
        except catch as e:  # everything the evaluation raises is its failure
            return [failed(jobs[0].key, e)]
    try:
        results = problem.evaluate_population([j.config for j in jobs], [j.seed for j in jobs])
        if len(results) != len(jobs):
            raise ValueError(f"evaluate_population returned {len(results)} results for {len(jobs)} configurations")
    except catch as e:  # the whole population failed
        return [failed(j.key, e) for j in jobs]
    return [failed(j.key, r) if isinstance(r, BaseException) else ("ok", j.key, r) for j, r in zip(jobs, results)]


def population_size(problem: Problem) -> int:
    """The problem's ``max_population`` (1 when unset); raises naming a bad value."""
    size = problem.max_population
    if not (is_int(size) and size >= 1):
        raise ValueError(f"{type(problem).__name__}.max_population={size!r} is not allowed; allowed: an integer >= 1")
    return size
