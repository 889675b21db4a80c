"""``process``: a pool of long-lived worker processes on this machine.

Workers stay alive between evaluations, so a problem's lazy caches (a loaded model, tokenised
data, embeddings) are paid for once per worker. Each worker runs one evaluation at a time; the
driver watches its pipe and its process sentinel, so that:

- an exception (or ``MemoryError`` under the memory limit) comes back as a failed outcome;
- an evaluation past its timeout is ended by killing the worker, which is then replaced;
- a worker that dies (segfault, ``os._exit``, the kernel's OOM killer) is reported with its exit
  code or signal, and replaced.

Workers are started with ``spawn`` (no fork of a driver that may hold threads) and limit
BLAS/OpenMP/torch to ``threads`` threads each: on a few shared cores, oversubscription costs
more than it gives.

A worker's start-up (a new interpreter, unpickling the problem and importing its modules) does
not count towards the per-evaluation timeout: the worker reports when it is ready, and the clock
of the job it was given starts then. A worker whose driver has died ends itself, so a killed
driver leaves no evaluation running (its trials are re-queued on resume).

Populations: for a problem whose ``max_population`` P is above 1 (several trainings sharing one
resident model), ``workers`` evaluations in flight take ``ceil(workers / P)`` processes, and each idle
worker is handed up to P queued jobs in one ``evaluate_population`` call; its start-up (model, data)
is paid once per worker. A timeout, crash or kill then fails the whole population.

Automatic GPU packing (``gpu_packing``, a memory target such as 0.85; off by default): for a run
that sets no GPU share, the pool starts one worker, and once evaluations report their GPU peak
(``evaluators.packing``) keeps as many at once as fit that fraction of the GPU's memory, never more
than ``workers``; a larger peak later retires idle workers down to the new count.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import pickle
import select
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from evaluators.base import Evaluator, Job, Outcome, error_text, evaluate_jobs, population_size
from evaluators.packing import MemoryPacker, PackingPolicy
from qd.problem import Problem

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "QD_TORCH_THREADS")
_STOP_SIGNALS = (signal.SIGINT, signal.SIGHUP, signal.SIGTERM)


def _worker_main(conn: Connection, problem_bytes: bytes, memory_mb: int | None, threads: int) -> None:
    # The driver stops its workers itself (SIGKILL): a Ctrl-C, a closed terminal or a service manager's
    # SIGTERM reaches the whole process group, and a worker dying of it before the driver reacts would
    # record its evaluation as a crash instead of leaving it to be re-run.
    for signum in _STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    try:
        _serve(conn, problem_bytes, memory_mb, threads)
    except (BrokenPipeError, ConnectionResetError, EOFError):  # the driver is gone: nothing to report to
        os._exit(0)


def _serve(conn: Connection, problem_bytes: bytes, memory_mb: int | None, threads: int) -> None:
    for var in _THREAD_VARS:
        os.environ[var] = str(threads)
    if memory_mb:
        import resource

        limit = int(memory_mb) * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    problem = pickle.loads(problem_bytes)
    # Only when the problem's module already imported torch: importing it here costs seconds per
    # worker for problems that never use it (torch takes OMP_NUM_THREADS from the environment).
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    _exit_with_parent()
    conn.send(("ready", [], {"worker_pid": os.getpid()}))
    while True:
        try:
            jobs = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if jobs is None:
            return
        t0 = time.perf_counter()
        replies = evaluate_jobs(problem, jobs, catch=BaseException)
        meta = {"wall_time_s": time.perf_counter() - t0, "worker_pid": os.getpid(), "peak_rss_mb": _peak_rss_mb()}
        if len(jobs) > 1:
            meta["population"] = len(jobs)
        try:
            message = pickle.dumps(("done", replies, meta), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # noqa: BLE001 - find the unpicklable results: each fails its job only
            for i, reply in enumerate(replies):
                try:
                    pickle.dumps(reply)
                except Exception as e:  # noqa: BLE001
                    replies[i] = ("exception", reply[1], f"result could not be sent back: {error_text(e)}")
            message = pickle.dumps(("done", replies, meta), protocol=pickle.HIGHEST_PROTOCOL)
        conn.send_bytes(message)  # pickled once (a check of each result first would pickle it twice)


@contextmanager
def _stop_signals_ignored() -> Iterator[None]:
    """Ignore SIGINT, SIGHUP and SIGTERM in this (main) thread for a moment; a no-op elsewhere."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in _STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _exit_with_parent(interval_s: float = 1.0) -> None:
    """End this worker when its driver dies (a SIGKILLed driver cannot stop it; a hung evaluation would
    otherwise run on, holding memory or a GPU that the resumed run needs)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="qd-exit-with-parent", daemon=True).start()


def _ready(objects: list, timeout: float | None) -> set:
    """Those of ``objects`` (connections, process sentinels) that are readable or closed within
    ``timeout`` s (None: no limit): ``multiprocessing.connection.wait`` without the selector it
    builds on each call, which the driver paid for every outcome."""
    poller, by_fd = select.poll(), {}
    for o in objects:
        fd = o if isinstance(o, int) else o.fileno()
        by_fd[fd] = o
        poller.register(fd, select.POLLIN)  # hang-ups and errors are always reported
    return {by_fd[fd] for fd, _ in poller.poll(None if timeout is None else max(0, math.ceil(timeout * 1e3)))}


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "worker process died"
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (killed: often the out-of-memory killer)" if -code == signal.SIGKILL else ""
        return f"worker process died with signal {name}{hint}"
    return f"worker process exited with code {code} during the evaluation"


@dataclass
class _Worker:
    process: mp.Process
    conn: Connection
    jobs: list[Job] = field(default_factory=list)  # what it evaluates now (one, or a population)
    started: float = 0.0  # when its jobs' clock started: dispatch, or start-up end if it was not ready then
    ready: bool = False  # it has finished starting up


class ProcessPoolEvaluator(Evaluator):
    """Evaluations in spawned worker processes on this machine (a crash or a hang kills one
    worker and fails its evaluations, nothing else).

    Args:
        threads: Torch/BLAS threads per worker process.
        gpu_packing: None (``workers`` processes), or the fraction of the GPU's memory that packed
            evaluations may fill: processes are then added or retired by their measured GPU peaks
            (``evaluators.packing.MemoryPacker``), at most ``workers``.
    """

    name = "process"
    #: A worker that has not finished starting up after this long is reported as a system failure.
    start_timeout_s = 300.0

    def __init__(self, threads: int = 1, gpu_packing: float | None = None):
        if gpu_packing is not None and (isinstance(gpu_packing, bool) or not isinstance(gpu_packing, (int, float))
                                        or not 0 < gpu_packing <= 1):
            raise ValueError(f"process option gpu_packing={gpu_packing!r} is not allowed; allowed: the fraction of "
                             f"the GPU's memory packed evaluations may fill, in (0, 1], or None (off)")
        self.threads, self.gpu_packing = threads, gpu_packing
        self.packer: MemoryPacker | None = None
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []
        self._queue: deque[Job] = deque()
        self._problem_bytes = b""
        self._memory_mb: int | None = None
        self._timeout_s: float | None = None
        self._size = 0
        self._population = 1

    def start(self, problem: Problem, workers: int, timeout_s: float | None = None) -> None:
        """Prepare ``workers`` evaluations in flight (processes are spawned on demand).

        A problem with ``max_population`` P > 1 gets ``ceil(workers / P)`` processes, each handed
        up to P queued jobs at once (``evaluate_population``); a timeout then bounds one such call.

        Args:
            problem: The problem to evaluate; its ``resources`` give the default timeout and memory cap.
            workers: Evaluations in flight at once (>= 1).
            timeout_s: Bound on one evaluation (or one population call); None: the problem's.
        """
        self._problem_bytes = pickle.dumps(problem)
        # A memory cap on the address space breaks CUDA's large virtual reservations.
        self._memory_mb = problem.resources.memory_mb if not problem.resources.gpus else None
        self._timeout_s = timeout_s if timeout_s is not None else problem.resources.timeout_s
        self._population = population_size(problem)
        self._size = -(-workers // self._population)
        if self.gpu_packing is not None:
            self.packer = MemoryPacker(None, PackingPolicy(target=self.gpu_packing, max_slots=self._size))

    def _limit(self) -> int:
        """Worker processes allowed now: ``workers`` (in processes), or what GPU packing allows."""
        return self._size if self.packer is None else min(self._size, self.packer.slots(otherwise=self._size))

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(child, self._problem_bytes, self._memory_mb, self.threads),
                                 daemon=True)
        with _stop_signals_ignored():  # inherited through exec: a worker still importing ignores them too
            proc.start()
        child.close()
        return _Worker(proc, parent)

    def _dispatch(self) -> None:
        if not self._queue and self.packer is None:
            return
        limit = self._limit()
        if len(self._workers) > limit:
            for w in [w for w in self._workers if not w.jobs][: len(self._workers) - limit]:
                self._retire(w)  # packing allows fewer now: idle ones go
        while self._queue:
            idle = next((w for w in self._workers if not w.jobs), None)
            if idle is not None and not idle.process.is_alive():  # died between evaluations
                self._retire(idle)
                continue
            if idle is None:
                if len(self._workers) >= limit:
                    return
                idle = self._spawn()
                self._workers.append(idle)
            # Populations: the queue shared evenly among the workers that can take some now, so
            # two workers get half each rather than one all of it and the other none.
            if self._population == 1:
                jobs = [self._queue.popleft()]
            else:
                takers = sum(not w.jobs for w in self._workers) + max(0, limit - len(self._workers))
                share = min(self._population, -(-len(self._queue) // max(1, takers)))
                jobs = [self._queue.popleft() for _ in range(share)]
            try:
                idle.conn.send_bytes(pickle.dumps(jobs, protocol=pickle.HIGHEST_PROTOCOL))  # as send(), less setup
            except OSError:  # its pipe broke: replace the worker, keep the jobs
                self._queue.extendleft(reversed(jobs))
                self._retire(idle)
                continue
            idle.jobs, idle.started = jobs, time.monotonic()

    def submit(self, job: Job) -> None:
        """Queue ``job``; its outcome comes back from ``wait``.

        Args:
            job: The configuration to evaluate, with its key and seed.
        """
        self._queue.append(job)
        if self._population == 1:  # populations are formed in wait(), from everything submitted by then
            self._dispatch()

    def _retire(self, worker: _Worker) -> None:
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=5)
        worker.conn.close()
        self._workers.remove(worker)

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        """``Evaluator.wait``: a crash, timeout or error comes back as an outcome, never raised."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._dispatch()
        while True:
            busy = [w for w in self._workers if w.jobs]
            if not busy:
                return []
            now = time.monotonic()
            horizon = [deadline] if deadline is not None else []
            horizon += [w.started + self.start_timeout_s for w in busy if not w.ready]
            if self._timeout_s is not None:
                horizon += [w.started + self._timeout_s for w in busy if w.ready]
            block = max(0.0, min(horizon) - now) if horizon else None
            ready = _ready([w.conn for w in busy] + [w.process.sentinel for w in busy], block)
            outcomes = []
            for w in busy:
                jobs = w.jobs
                if w.conn in ready:
                    try:
                        status, replies, meta = w.conn.recv()
                    except (EOFError, OSError):  # died while sending
                        w.process.join(timeout=5)
                        outcomes += [Outcome(j.key, error=_describe_exit(w.process.exitcode), kind="crash",
                                             metadata={"wall_time_s": time.monotonic() - w.started}) for j in jobs]
                        self._retire(w)
                        continue
                    except Exception as e:  # noqa: BLE001 - a result that pickles in the worker but not back here
                        w.jobs = []
                        outcomes += [Outcome(j.key, error=f"result could not be read back: {error_text(e)}",
                                             kind="exception", metadata={"wall_time_s": time.monotonic() - w.started})
                                     for j in jobs]
                        continue
                    if status == "ready":  # start-up done: the jobs' clock starts now
                        w.ready, w.started = True, time.monotonic()
                        continue
                    w.jobs = []
                    for kind, key, payload in replies:
                        if kind == "ok":
                            outcomes.append(Outcome(key, evaluation=payload, metadata=dict(meta)))
                        else:
                            outcomes.append(Outcome(key, error=payload, kind=kind, metadata=dict(meta)))
                elif w.process.sentinel in ready:
                    w.process.join(timeout=5)
                    elapsed = time.monotonic() - w.started
                    outcomes += [Outcome(j.key, error=_describe_exit(w.process.exitcode), kind="crash",
                                         metadata={"wall_time_s": elapsed}) for j in jobs]
                    self._retire(w)
                elif not w.ready and time.monotonic() - w.started >= self.start_timeout_s:
                    outcomes += [Outcome(j.key, error=f"worker process did not start within "
                                         f"{self.start_timeout_s:g} s", kind="system") for j in jobs]
                    self._retire(w)
                elif w.ready and self._timeout_s is not None and time.monotonic() - w.started >= self._timeout_s:
                    what = "evaluation" if len(jobs) == 1 else f"population of {len(jobs)} evaluations"
                    outcomes += [Outcome(j.key, error=f"{what} exceeded {self._timeout_s:g} s and was killed",
                                         kind="timeout", metadata={"wall_time_s": time.monotonic() - w.started})
                                 for j in jobs]
                    self._retire(w)
            if self.packer is not None:
                self.packer.observe(outcomes)
            self._dispatch()
            if outcomes:
                return outcomes
            if deadline is not None and time.monotonic() >= deadline:
                return []

    def close(self) -> None:
        """Stop every worker (idle ones asked to exit, busy ones killed) and drop queued jobs."""
        for w in list(self._workers):
            if not w.jobs and w.process.is_alive():
                try:
                    w.conn.send(None)
                except OSError:
                    pass
        for w in list(self._workers):
            w.process.join(timeout=2 if not w.jobs else 0)
            self._retire(w)
        self._queue.clear()
