"""``ray``: evaluations on a Ray cluster, each with the resources its problem declares.

By default a local Ray is started (and shut down again by ``close``); ``address`` joins a running
cluster instead (``"auto"``, ``"host:port"`` or ``"ray://host:10001"``; the CLI's
``--ray-address``). If Ray is already initialised in this process, that Ray is used as it is.

Each evaluation asks Ray for ``problem.resources``: ``num_cpus=cpus``, ``num_gpus=gpus`` (a
fraction such as 0.25 lets four evaluations share one GPU) and ``memory=memory_mb``.

Workers (``mode``):

- ``"actor"`` (default): one actor per worker slot, each holding the problem, unpickled once.
  A problem's lazy caches (a loaded model, tokenised data) survive between evaluations, as in the
  process pool, and a slot's resources (its GPU share) stay reserved while the run lasts. A slot
  runs one evaluation at a time; a new one is sent the moment one finishes (``ray.wait`` with
  ``num_returns=1``), so no slot idles while evaluations are queued. An evaluation past its
  timeout is ended by killing its actor (Ray cannot force-cancel an actor task), which is replaced.
- ``"task"``: one Ray task per evaluation, scheduled anywhere the resources are free; a timeout
  ends it with ``ray.cancel(force=True)``. The task is a streaming generator that first reports
  that it started, so time spent waiting for a worker process does not count towards the
  timeout. Ray reuses worker processes, which keep the unpickled problem in a per-process cache,
  so caches usually survive too, without guarantee.

Populations (actor mode): for a problem whose ``max_population`` P is above 1, ``workers``
evaluations in flight take ``ceil(workers / P)`` actors, and each idle actor is handed up to P
queued jobs in one ``evaluate_population`` call, so the model and data it holds serve all of them; a
timeout then bounds the call, and a lost worker re-queues every job of it. Task mode sends one job
per task.

Actors are the default: a loaded model or dataset is the common case for ML configuration
problems, and a reserved GPU share per slot is what fractional sharing needs. Tasks suit
clusters whose nodes come and go (an autoscaler), where a long-lived actor ties a slot to a node.

Failures come back as outcomes, never as exceptions, with the process pool's kinds:

- the evaluation raised: ``exception`` (``MemoryError``: ``oom``), with a traceback excerpt;
- past its timeout (counted from when the evaluation started on a ready worker): ``timeout``;
- no worker placed and started within ``start_timeout_s`` (the cluster lacks the resources): ``system``;
- killed by Ray's memory monitor (``OutOfMemoryError``): ``oom``, not retried;
- its worker or node died (``WorkerCrashedError``, ``ActorDiedError``, ``NodeDiedError``, ...):
  retried on a new worker up to ``max_retries`` times (a node lost on a cluster is not the
  evaluation's fault), then ``crash`` (worker died) or ``system`` (anything else from Ray).
  An evaluation that kills its own process is thus run ``1 + max_retries`` times before it fails.

NaN or infinite results are rejected by the run loop, as for every evaluator.

Memory: Ray's ``memory`` resource only reserves, it does not limit. With ``memory_limit`` (on by
default) a CPU-only evaluation's worker gets an address-space limit of its size after start-up
plus ``memory_mb``, so an evaluation that allocates past its declaration fails with
``MemoryError`` (``oom``) instead of taking memory from its neighbours. It is not applied to GPU
evaluations (CUDA reserves large virtual ranges).
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import exceptions as rex

from evaluators.base import Evaluator, Job, Outcome, error_text, evaluate_jobs, population_size
from qd.checks import check_bool, check_choice, check_int, check_number
from qd.problem import Problem, Resources

MODES = ("actor", "task")
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "QD_TORCH_THREADS")


# --- worker side --------------------------------------------------------------------------------
def _set_threads(threads: int) -> None:
    for var in _THREAD_VARS:
        os.environ[var] = str(threads)
    if "torch" in sys.modules:  # importing torch only for this costs seconds per worker
        sys.modules["torch"].set_num_threads(threads)


def _address_space_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def _cap_address_space(extra_mb: int) -> int:
    """Limit this process's address space to its current size plus ``extra_mb``; returns the limit in MiB.

    Relative, not absolute as in the process pool: a Ray worker already maps hundreds of MiB
    (its core worker, gRPC threads) before any evaluation runs.
    """
    limit_mb = int(_address_space_mb()) + int(extra_mb)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = limit_mb * 2**20 if hard == resource.RLIM_INFINITY else min(limit_mb * 2**20, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return limit // 2**20


# Fatal signals (SIGSEGV, SIGBUS, SIGFPE, SIGABRT, SIGILL) as faulthandler names them.
_FATAL_NAMES = {"Segmentation fault": "SIGSEGV", "Bus error": "SIGBUS", "Floating-point exception": "SIGFPE",
                "Aborted": "SIGABRT", "Illegal instruction": "SIGILL"}
_FATAL_FILES: list[Any] = []  # kept open for faulthandler


def _record_fatal_signals() -> str | None:
    """Have faulthandler write a fatal signal and the Python stack to a file named by this pid; returns its
    path. Ray's own report of a dead worker does not name the signal; the driver reads this file."""
    import faulthandler
    import tempfile

    if _FATAL_FILES:
        return _FATAL_FILES[0].name
    path = os.path.join(tempfile.gettempdir(), f"qd-fatal-{os.getpid()}.log")
    try:
        f = open(path, "w")  # noqa: SIM115 - must stay open for the life of the process
    except OSError:
        return None
    faulthandler.enable(file=f)
    _FATAL_FILES.append(f)
    return path


def fatal_signal(info: dict[str, Any]) -> str | None:
    """What killed a worker, from the file ``_record_fatal_signals`` named in its ``info`` (this host only)."""
    path = info.get("fatal_log")
    if not path or info.get("host") != socket.gethostname():
        return None
    try:
        with open(path) as f:
            text = f.read(20000)
    except OSError:
        return None
    lines = [line.strip() for line in text.splitlines()]
    head = next((line for line in lines if line.startswith("Fatal Python error:")), None)
    if head is None:
        return None
    what = head.split(":", 1)[1].strip()
    where = next((line for line in lines if line.startswith("File ")), None)
    name = _FATAL_NAMES.get(what)
    return (f"worker process died with signal {name} ({what})" if name else f"worker process died: {what}") + \
        (f" in {where}" if where else "")


def _exit_with_driver(driver: dict[str, Any] | None, interval_s: float = 1.0) -> None:
    """End this worker soon after the driver dies (same host only: a pid elsewhere cannot be checked).

    A SIGKILLed driver cannot stop its actors, and Ray takes up to a minute to notice; a hung
    evaluation would hold its CPU or GPU share that the resumed run needs."""
    if not driver or driver.get("host") != socket.gethostname():
        return
    pid, start = driver.get("pid"), driver.get("start")

    def alive() -> bool:
        stat = _process_stat(pid)
        return stat is not None and stat[0] not in ("Z", "X") and (start is None or stat[1] == start)

    def watch() -> None:
        while alive():
            time.sleep(interval_s)
        os._exit(1)

    import threading

    threading.Thread(target=watch, name="qd-exit-with-driver", daemon=True).start()


def _process_stat(pid: Any) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a process, or None when it does not exist."""
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError, TypeError):
        return None


def _driver() -> dict[str, Any]:
    stat = _process_stat(os.getpid())
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": stat[1] if stat else None}


def _evaluate(problem: Problem, job: Job) -> tuple[str, int, Any, dict[str, Any]]:
    """Run one evaluation; everything it raises becomes ("exception" | "oom", key, reason, meta)."""
    t0, started_at = time.perf_counter(), time.time()
    try:
        reply: tuple[str, int, Any] = ("ok", job.key, problem.evaluate(job.config, job.seed))
    except MemoryError as e:
        reply = ("oom", job.key, error_text(e))
    except BaseException as e:  # noqa: BLE001 - everything the evaluation raises is its failure
        reply = ("exception", job.key, error_text(e))
    # Wall-clock start and end (epoch seconds) show how evaluations overlapped, e.g. on a shared GPU.
    meta = {"wall_time_s": time.perf_counter() - t0, "started_at": started_at, "ended_at": time.time(),
            "worker_pid": os.getpid(), "host": socket.gethostname(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    return (*reply, meta)


def _evaluate_population(problem: Problem, jobs: list[Job]) -> list[tuple[str, int, Any, dict[str, Any]]]:
    """Run jobs in one ``evaluate_population`` call; one (status, key, payload, meta) per job."""
    t0, started_at = time.perf_counter(), time.time()
    replies = evaluate_jobs(problem, jobs, catch=BaseException)
    meta = {"wall_time_s": time.perf_counter() - t0, "started_at": started_at, "ended_at": time.time(),
            "worker_pid": os.getpid(), "host": socket.gethostname(), "population": len(jobs),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    return [(*reply, dict(meta)) for reply in replies]


@ray.remote(max_restarts=0, max_task_retries=0)
class _EvalActor:
    """One worker slot: holds the problem (and so its caches) for the whole run."""

    def __init__(self, problem: Problem, threads: int, memory_mb: int | None, driver: dict[str, Any] | None = None):
        _set_threads(threads)
        _exit_with_driver(driver)
        self.fatal_log = _record_fatal_signals()
        self.problem = problem
        self.limit_mb = _cap_address_space(memory_mb) if memory_mb else None

    def ready(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "address_space_limit_mb": self.limit_mb,
                "fatal_log": self.fatal_log}

    def evaluate(self, job: Job) -> tuple[str, int, Any, dict[str, Any]]:
        return _evaluate(self.problem, job)

    def evaluate_population(self, jobs: list[Job]) -> list[tuple[str, int, Any, dict[str, Any]]]:
        return _evaluate_population(self.problem, jobs)


# Task mode: problems unpickled in this worker process, by the id of their object in the store.
_TASK_PROBLEMS: dict[str, Problem] = {}
_TASK_LIMITED = False
_STARTED = "started"


@ray.remote(max_retries=0, num_returns="streaming")
def _eval_task(boxed: list[ray.ObjectRef], threads: int, memory_mb: int | None, job: Job,
               driver: dict[str, Any] | None = None):
    """Yields ``(STARTED, worker info)`` once running (the timeout counts from then, not from a wait for a
    worker), then the result."""
    global _TASK_LIMITED
    if not _FATAL_FILES:  # once per worker process (Ray reuses them)
        _exit_with_driver(driver)
    yield _STARTED, {"pid": os.getpid(), "host": socket.gethostname(), "fatal_log": _record_fatal_signals()}
    key = boxed[0].hex()  # boxed in a list, so Ray does not fetch the problem for every task
    if key not in _TASK_PROBLEMS:
        _set_threads(threads)
        _TASK_PROBLEMS.clear()
        _TASK_PROBLEMS[key] = ray.get(boxed[0])
    if memory_mb and not _TASK_LIMITED:
        _cap_address_space(memory_mb)
        _TASK_LIMITED = True
    yield _evaluate(_TASK_PROBLEMS[key], job)


# --- driver side --------------------------------------------------------------------------------
#: Ray runtime-environment keys an experiment may set, with what each allows. Several of them run
#: code in every worker (pip and uv install packages, working_dir and py_modules ship code,
#: worker_process_setup_hook calls a function): an experiment file is as powerful as a Python
#: script, so run only experiment files you trust.
RUNTIME_ENV_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "env_vars": ((dict,), "a table of string values"),
    "working_dir": ((str,), "a path or URI"),
    "py_modules": ((list,), "a list of paths or URIs"),
    "excludes": ((list,), "a list of patterns"),
    "pip": ((list, str, dict), "a list of requirements, a requirements file or a table"),
    "uv": ((list, str, dict), "a list of requirements, a requirements file or a table"),
    "conda": ((str, dict), "an environment name, a file or a table"),
    "container": ((dict,), "a table"),
    "image_uri": ((str,), "an image URI"),
    "py_executable": ((str,), "a command"),
    "java_jars": ((list,), "a list of paths or URIs"),
    "worker_process_setup_hook": ((str,), "the dotted name of a function"),
    "config": ((dict,), "a table of Ray's runtime-environment settings"),
}


def check_runtime_env(env: Any) -> None:
    """Raise ``ValueError`` naming the key unless ``env`` is None or a runtime environment of known keys and types."""
    if env is None:
        return
    if not isinstance(env, dict):
        raise ValueError(f"ray option runtime_env={env!r} is not allowed; allowed: a table (dict) or None")
    unknown = sorted(set(env) - set(RUNTIME_ENV_KEYS))
    if unknown:
        raise ValueError(f"ray option runtime_env has unknown key(s) {unknown}; allowed keys: {sorted(RUNTIME_ENV_KEYS)}")
    for key, value in env.items():
        types, text = RUNTIME_ENV_KEYS[key]
        ok = isinstance(value, types)
        if ok and key == "env_vars":
            ok = all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
        elif ok and isinstance(value, list):
            ok = all(isinstance(v, str) for v in value)
        if not ok:
            raise ValueError(f"ray option runtime_env.{key}={value!r} is not allowed; allowed: {text}")


def ray_options(resources: Resources) -> dict[str, Any]:
    """Ray's resource options for one evaluation with ``resources``; raises naming a bad field."""
    cpus, gpus = resources.cpus, resources.gpus
    check_number(cpus, "cpus", "resources", low=0)
    check_number(gpus, "gpus", "resources", low=0)
    if gpus > 1 and gpus != int(gpus):
        raise ValueError(f"resources.gpus={gpus!r} is not allowed; allowed: a fraction in [0, 1] (several "
                         f"evaluations share a GPU) or a whole number of GPUs")
    options: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus}
    if resources.memory_mb is not None:
        check_int(resources.memory_mb, "memory_mb", "resources", low=1)
        options["memory"] = resources.memory_mb * 2**20
    return options


def _failure(exc: BaseException) -> tuple[str, bool]:
    """The outcome kind of a Ray error and whether it is worth a retry on another worker."""
    if isinstance(exc, rex.RayTaskError):  # our wrapper itself failed (e.g. a result Ray cannot serialise)
        return "exception", False
    if isinstance(exc, rex.OutOfMemoryError):
        return "oom", False
    if isinstance(exc, rex.RayActorError):
        if "exit type: NODE_OUT_OF_MEMORY" in str(exc):  # Ray's memory monitor killed the actor
            return "oom", False
        if exc.actor_init_failed:  # a new actor would fail the same way
            return "system", False
        return ("crash" if not exc.preempted else "system"), True
    if isinstance(exc, rex.WorkerCrashedError):
        return "crash", True
    return "system", True


@dataclass
class _Slot:
    """An actor and the evaluation it runs (actor mode)."""

    actor: Any
    ready_ref: Any
    created: float
    info: dict[str, Any] = field(default_factory=dict)
    jobs: list[Job] = field(default_factory=list)  # what it runs now: one job, or a population
    ref: Any = None
    started: float = 0.0

    @property
    def ready(self) -> bool:
        return self.ready_ref is None


@dataclass
class _Task:
    """A running evaluation (task mode): its job, when it was submitted, and when it started running."""

    job: Job
    submitted: float
    started: float | None = None
    info: dict[str, Any] = field(default_factory=dict)


class RayEvaluator(Evaluator):
    """Evaluations on Ray. This class is actor mode (one long-lived actor per worker slot, the
    problem loaded once per actor); ``mode="task"`` builds a ``RayTaskEvaluator`` (one task per
    evaluation). Both share connection, resources, retries, timeouts and failure reasons."""

    name = "ray"
    #: How long a worker may take to be placed and started (waiting for free resources included)
    #: before the evaluation waiting for it is failed as a system failure.
    start_timeout_s = 600.0

    def __new__(cls, *args: Any, **kwargs: Any) -> RayEvaluator:
        mode = kwargs.get("mode", args[1] if len(args) > 1 else "actor")
        if cls is RayEvaluator and mode == "task":
            cls = RayTaskEvaluator
        return super().__new__(cls)

    def __init__(
        self,
        address: str | None = None,
        mode: str = "actor",
        max_retries: int = 2,
        num_cpus: int | None = None,
        num_gpus: int | None = None,
        memory_limit: bool = True,
        runtime_env: dict[str, Any] | None = None,
    ):
        """Options:

        - ``address``: a Ray cluster to join (None: start a local one; "auto": the one on this machine).
        - ``mode``: "actor" (one long-lived actor per worker slot) or "task" (one task per evaluation).
        - ``max_retries``: re-runs of an evaluation whose worker or node died (system failures).
        - ``num_cpus``, ``num_gpus``: what a local Ray may use (None: all it detects).
        - ``memory_limit``: cap each CPU-only evaluation's memory at ``resources.memory_mb`` over its
          worker's start-up size.
        - ``runtime_env``: Ray's runtime environment for the workers (e.g. ``{"env_vars": {...}}``).
        """
        if address is not None and (not isinstance(address, str) or not address):
            raise ValueError(f"ray option address={address!r} is not allowed; allowed: 'auto', 'host:port', "
                             f"'ray://host:port' or None (start a local Ray)")
        check_choice(mode, "mode", "ray", MODES)
        check_int(max_retries, "max_retries", "ray", low=0)
        for opt, value in (("num_cpus", num_cpus), ("num_gpus", num_gpus)):
            check_int(value, opt, "ray", low=0, none=True)
        check_bool(memory_limit, "memory_limit", "ray")
        check_runtime_env(runtime_env)
        self.address, self.mode, self.max_retries = address, mode, max_retries
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.memory_limit, self.runtime_env = memory_limit, runtime_env
        self._owns_ray = False
        self._size = 0
        self._timeout_s: float | None = None
        self._options: dict[str, Any] = {}
        self._threads = 1
        self._memory_mb: int | None = None
        self._problem_ref: Any = None
        self._queue: deque[Job] = deque()
        self._attempts: dict[int, int] = {}  # job key -> runs started
        self._slots: list[_Slot] = []
        self._start_failures = 0
        self._dead_logs: list[dict[str, Any]] = []  # infos of killed workers, whose files close() removes
        self._population = 1

    # --- set-up ---------------------------------------------------------------------------------
    def _connect(self) -> None:
        if ray.is_initialized():
            return
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                                  "runtime_env": self.runtime_env}
        if self.address is not None:
            ray.init(address=self.address, **kwargs)
        else:
            ray.init(num_cpus=self.num_cpus, num_gpus=self.num_gpus, **kwargs)
        self._owns_ray = True

    def start(self, problem: Problem, workers: int, timeout_s: float | None = None) -> None:
        """Connect to Ray (or start a local one) and put the problem in its object store.

        Args:
            problem: The problem to evaluate; its ``resources`` give the default timeout, CPUs, GPUs and memory.
            workers: Evaluations in flight at once (>= 1).
            timeout_s: Bound on one evaluation (or one population call); None: the problem's.

        Raises:
            ValueError: One evaluation cannot fit the local Ray this evaluator started (on a
                cluster it only warns, for an autoscaler).
        """
        self._options = ray_options(problem.resources)
        self._connect()
        self._population = population_size(problem) if self.mode == "actor" else 1
        self._size = -(-workers // self._population)
        self._check_fits(self._size)
        self._timeout_s = timeout_s if timeout_s is not None else problem.resources.timeout_s
        self._threads = max(1, int(problem.resources.cpus))
        gpus = problem.resources.gpus
        self._memory_mb = problem.resources.memory_mb if (self.memory_limit and not gpus) else None
        self._problem_ref = ray.put(problem)

    def _check_fits(self, workers: int) -> None:
        """Fail now, not by waiting forever, when one evaluation cannot fit the cluster at all."""
        total = ray.cluster_resources()
        needs = {"CPU": self._options["num_cpus"], "GPU": self._options["num_gpus"],
                 "memory": self._options.get("memory", 0)}
        short = {k: v for k, v in needs.items() if v and total.get(k, 0) < v}
        if short:
            msg = (f"one evaluation needs {short} but the Ray cluster has "
                   f"{ {k: total.get(k, 0) for k in short} }; lower the problem's resources or add nodes")
            if self._owns_ray and self.address is None:
                raise ValueError(msg)
            warnings.warn(msg + " (waiting for an autoscaler)", RuntimeWarning, stacklevel=3)
            return
        fit = min(int(total[k] // v) for k, v in needs.items() if v) if any(needs.values()) else workers
        if fit < workers:
            warnings.warn(f"workers={workers} but the Ray cluster fits {fit} evaluations of {needs} at once; "
                          f"the others wait", RuntimeWarning, stacklevel=3)

    def worker_info(self) -> list[dict[str, Any]]:
        """Actor mode: one entry per started worker: ``pid``, ``host`` and the ``job`` key it runs (or None)."""
        return [{**s.info, "job": s.jobs[0].key if s.jobs else None} for s in self._slots if s.ready]

    # --- submitting -----------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job``; its outcome comes back from ``wait``.

        Args:
            job: The configuration to evaluate, with its key and seed.
        """
        self._queue.append(job)
        if self._population == 1:  # populations are formed in wait(), from everything submitted by then
            self._dispatch()

    def _new_slot(self) -> _Slot:
        actor = _EvalActor.options(**self._worker_options()).remote(self._problem_ref, self._threads, self._memory_mb,
                                                                    _driver())
        return _Slot(actor, actor.ready.remote(), created=time.monotonic())

    def _worker_options(self) -> dict[str, Any]:
        # A Ray we started has the runtime environment job-wide; a Ray found running gets it per worker.
        if self.runtime_env is not None and not self._owns_ray:
            return {**self._options, "runtime_env": self.runtime_env}
        return dict(self._options)

    def _run(self, job: Job) -> None:
        self._attempts[job.key] = self._attempts.get(job.key, 0) + 1

    def _dispatch(self) -> None:
        while self._queue:
            idle = next((s for s in self._slots if s.ready and not s.jobs), None)
            if idle is None:
                # Start actors up to the slot count; a job waits for the first free ready one.
                if len(self._slots) < min(self._size, -(-len(self._queue) // self._population) + self._busy()):
                    self._slots.append(self._new_slot())
                    continue
                return
            # Populations: the queue shared evenly among the actors that can take some (idle, starting,
            # or still to start), so two actors get half each rather than one all of it.
            takers = sum(not s.jobs for s in self._slots) + self._size - len(self._slots)
            share = min(self._population, -(-len(self._queue) // max(1, takers)))
            jobs = [self._queue.popleft() for _ in range(share)]
            for job in jobs:
                self._run(job)
            ref = (idle.actor.evaluate.remote(jobs[0]) if len(jobs) == 1
                   else idle.actor.evaluate_population.remote(jobs))
            idle.jobs, idle.ref, idle.started = jobs, ref, time.monotonic()

    def _busy(self) -> int:
        return sum(bool(s.jobs) for s in self._slots)

    # --- collecting -----------------------------------------------------------------------------
    def _finish(self, job: Job, get: Any, started: float, extra: dict[str, Any],
                info: dict[str, Any] | None = None) -> tuple[Outcome | None, bool]:
        """Turn a finished ref into an outcome, or re-queue the job; returns (outcome, worker_lost)."""
        try:
            status, key, payload, meta = ray.get(get)
        except rex.RayError as e:
            death = None
            if not isinstance(e, rex.RayTaskError):  # the worker process is gone
                death = fatal_signal(info or {})
                self._forget(info)
            kind, retry = _failure(e)
            attempts = self._attempts.get(job.key, 1)
            lost = not isinstance(e, rex.RayTaskError)
            if retry and attempts <= self.max_retries:
                self._queue.appendleft(job)
                return None, lost
            self._attempts.pop(job.key, None)
            where = "worker or node died" if kind in ("crash", "system") else "ray"
            note = f" (after {attempts} attempts)" if attempts > 1 else ""
            meta = {"wall_time_s": time.monotonic() - started, "attempts": attempts, **extra}
            text = error_text(e)
            if death:  # Ray's message does not say what killed the worker
                name, _, rest = text.partition(": ")
                text = f"{name} ({death}): {rest}"
            return Outcome(job.key, error=f"{where}{note}: {text}", kind=kind, metadata=meta), lost
        except Exception as e:  # noqa: BLE001 - e.g. a result that cannot be deserialised here
            self._attempts.pop(job.key, None)
            return Outcome(job.key, error=f"result could not be read back: {error_text(e)}", kind="exception",
                           metadata={"wall_time_s": time.monotonic() - started, **extra}), False
        attempts = self._attempts.pop(job.key, 1)
        meta = {**meta, **extra, **({"attempts": attempts} if attempts > 1 else {})}
        if status == "ok":
            return Outcome(key, evaluation=payload, metadata=meta), False
        return Outcome(key, error=payload, kind=status, metadata=meta), False

    def _finish_population(self, jobs: list[Job], ref: Any, started: float, extra: dict[str, Any],
                           info: dict[str, Any] | None = None) -> list[tuple[Outcome | None, bool]]:
        """``_finish`` for a population: one (outcome or re-queued, worker lost) per job."""
        try:
            replies = ray.get(ref)
        except Exception:  # noqa: BLE001 - each job: its retry or failure, as _finish decides
            return [self._finish(job, ref, started, extra, info) for job in jobs]
        out = []
        for job, (status, key, payload, meta) in zip(jobs, replies):
            attempts = self._attempts.pop(job.key, 1)
            meta = {**meta, **extra, **({"attempts": attempts} if attempts > 1 else {})}
            out.append((Outcome(key, evaluation=payload, metadata=meta) if status == "ok"
                        else Outcome(key, error=payload, kind=status, metadata=meta), False))
        return out

    def _timeout_outcome(self, job: Job, started: float) -> Outcome:
        self._attempts.pop(job.key, None)
        return Outcome(job.key, error=f"evaluation exceeded {self._timeout_s:g} s and was cancelled",
                       kind="timeout", metadata={"wall_time_s": time.monotonic() - started})

    def _kill(self, slot: _Slot) -> None:
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass
        self._slots.remove(slot)
        self._dead_logs.append(slot.info)

    def _forget(self, info: dict[str, Any] | None) -> None:
        """Remove a dead worker's fatal-signal file once read (this host's only)."""
        if info and info.get("fatal_log") and info.get("host") == socket.gethostname():
            try:
                os.remove(info["fatal_log"])
            except OSError:
                pass

    def _collect(self, ready: set[Any]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        now = time.monotonic()
        for slot in list(self._slots):
            if not slot.ready:
                if slot.ready_ref in ready:
                    try:
                        slot.info = ray.get(slot.ready_ref)
                        slot.ready_ref = None
                        self._start_failures = 0
                    except rex.RayError as e:
                        outcomes += self._start_failed(slot, e)
                elif now - slot.created >= self.start_timeout_s:
                    self._kill(slot)
                    if self._queue:
                        outcomes.append(self._not_started(self._queue.popleft()))
                continue
            if not slot.jobs:
                continue
            if slot.ref in ready:
                jobs, slot.jobs = slot.jobs, []
                extra = {"worker_pid": slot.info.get("pid")}
                if len(jobs) == 1:
                    finished = [self._finish(jobs[0], slot.ref, slot.started, extra, slot.info)]
                else:
                    finished = self._finish_population(jobs, slot.ref, slot.started, extra, slot.info)
                if any(lost for _, lost in finished):
                    self._kill(slot)
                outcomes += [outcome for outcome, _ in finished if outcome is not None]
            elif self._timeout_s is not None and now - slot.started >= self._timeout_s:
                outcomes += [self._timeout_outcome(job, slot.started) for job in slot.jobs]
                self._kill(slot)  # Ray cannot force-cancel an actor task: end the actor
        return outcomes

    def _not_started(self, job: Job) -> Outcome:
        self._attempts.pop(job.key, None)
        return Outcome(job.key, error=f"no worker started within {self.start_timeout_s:g} s: the cluster has no free "
                       f"{self._options} for it", kind="system")

    def _start_failed(self, slot: _Slot, exc: BaseException) -> list[Outcome]:
        """An actor failed to start: retry, but fail a queued job rather than loop forever."""
        self._kill(slot)
        kind, retry = _failure(exc)
        self._start_failures += 1
        if (retry and self._start_failures <= self.max_retries) or not self._queue:
            return []
        self._start_failures = 0
        job = self._queue.popleft()
        self._attempts.pop(job.key, None)
        return [Outcome(job.key, error=f"could not start a worker: {error_text(exc)}", kind="system")]

    def _pending(self) -> dict[Any, float | None]:
        """Refs to wait on -> the deadline after which something must be done about them (None: none)."""
        refs: dict[Any, float | None] = {}
        for s in self._slots:
            if not s.ready:
                refs[s.ready_ref] = s.created + self.start_timeout_s
            elif s.jobs:
                refs[s.ref] = s.started + self._timeout_s if self._timeout_s is not None else None
        return refs

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        """``Evaluator.wait``: a crash, timeout or error comes back as an outcome, never raised."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._dispatch()
            pending = self._pending()
            if not pending:
                return []
            horizon = [d for d in pending.values() if d is not None] + ([deadline] if deadline is not None else [])
            block = max(0.0, min(horizon) - time.monotonic()) if horizon else None
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=block)
            if ready:  # take every other one that is done too, in one pass
                ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
            outcomes = self._collect(set(ready))
            self._dispatch()
            if outcomes:
                return outcomes
            if deadline is not None and time.monotonic() >= deadline:
                return []

    def close(self) -> None:
        """Kill the actors, drop queued jobs, and shut Ray down if this evaluator started it."""
        for slot in list(self._slots):
            self._kill(slot)
        for info in self._dead_logs:
            self._forget(info)
        self._dead_logs.clear()
        self._queue.clear()
        self._attempts.clear()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False


class RayTaskEvaluator(RayEvaluator):
    """Ray in task mode: one task per evaluation (no worker outlives its evaluation; a timed-out
    task is force-cancelled). Built by ``RayEvaluator(mode="task")``; everything else is shared."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._tasks: dict[Any, _Task] = {}  # its generator of (STARTED, result) -> running task

    def _dispatch(self) -> None:
        while self._queue and len(self._tasks) < self._size:
            job = self._queue.popleft()
            self._run(job)
            gen = _eval_task.options(**self._worker_options()).remote([self._problem_ref], self._threads,
                                                                     self._memory_mb, job, _driver())
            self._tasks[gen] = _Task(job, time.monotonic())

    def _collect(self, ready: set[Any]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        now = time.monotonic()
        for gen, task in list(self._tasks.items()):
            if gen in ready:
                try:
                    ref = next(gen)
                except StopIteration:  # cannot happen unless Ray lost the generator's items
                    ref = None
                if task.started is None and ref is not None:
                    try:
                        first = ray.get(ref)
                        if isinstance(first, tuple) and first[0] == _STARTED:
                            task.started, task.info = time.monotonic(), first[1]
                            continue
                    except rex.RayError:
                        pass  # failed before it started: the error is in this ref
                del self._tasks[gen]
                if ref is None:
                    outcome: Outcome | None = Outcome(task.job.key, error="the task ended without a result",
                                                      kind="system")
                else:
                    outcome, _ = self._finish(task.job, ref, task.started or task.submitted, {}, task.info)
                if outcome is not None:
                    outcomes.append(outcome)
            elif task.started is not None and self._timeout_s is not None and now - task.started >= self._timeout_s:
                ray.cancel(gen, force=True)
                del self._tasks[gen]
                outcomes.append(self._timeout_outcome(task.job, task.started))
            elif task.started is None and now - task.submitted >= self.start_timeout_s:
                ray.cancel(gen, force=True)
                del self._tasks[gen]
                outcomes.append(self._not_started(task.job))
        return outcomes

    def _pending(self) -> dict[Any, float | None]:
        return {gen: (t.submitted + self.start_timeout_s if t.started is None
                      else t.started + self._timeout_s if self._timeout_s is not None else None)
                for gen, t in self._tasks.items()}

    def close(self) -> None:
        """Cancel the tasks in flight, then close as ``RayEvaluator.close``."""
        for gen in list(self._tasks):
            try:
                ray.cancel(gen, force=True)
            except Exception:  # noqa: BLE001 - finished or gone
                pass
        for task in self._tasks.values():
            self._forget(task.info)
        self._tasks.clear()
        super().close()
