"""The run loop: keep ``workers`` evaluations in flight, record and tell each one as it finishes.

There is no batch barrier: as soon as one evaluation finishes, its result is written to the
store, told to the strategy, and a new configuration is asked for its slot.

Budget: the number of *finished* evaluations (complete, or failed by the evaluation itself).
Resume: trials left RUNNING by a driver that died are marked failed and ``stale`` (they do not
count towards the budget) and their configurations are evaluated again first; everything else
is replayed into the strategy with ``Strategy.restore``.

Each trial records the driver that started it (host, pid, process start time). Resuming a run
whose RUNNING trials belong to a driver still alive on this host is refused (``RunInUse``), so two
drivers never evaluate the same run; a driver on another host cannot be checked and is taken as
dead. A re-queued trial records the stale trial it re-runs (``requeue_of``) in the same write that
creates it, so a driver killed at any moment never re-queues one configuration twice.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from evaluators.base import Evaluator, Job, Outcome
from qd.experiment import ExperimentError
from qd.problem import EvaluationError, Problem
from qd.results import hypervolume, pareto_trials
from qd.space import Config
from qd.store import Store, Trial
from qd.strategy import Strategy

Callback = Callable[[Store, Trial], None]

STALE_REASON = "stale: the driver stopped while this evaluation was running; its configuration was queued again"
CANCELLED_REASON = "cancelled: the wall-time limit was reached while this evaluation was running"


class RunInUse(ExperimentError):
    """The run has evaluations running in a driver that is still alive."""


# Tokens of the run() calls in progress in this process (a trial's driver may be this very process).
_LIVE_RUNS: set[str] = set()


def _process_start(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of process ``pid`` from /proc, or None where unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def driver_identity(token: str) -> dict[str, object]:
    """What a trial records about the driver that starts it."""
    stat = _process_start(os.getpid())
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": stat[1] if stat else None, "token": token}


def driver_alive(driver: dict[str, object] | None) -> bool:
    """Whether the driver that started a trial is still running (known on its own host only)."""
    if not driver or driver.get("host") != socket.gethostname() or not isinstance(driver.get("pid"), int):
        return False
    pid = driver["pid"]
    if pid == os.getpid():
        return driver.get("token") in _LIVE_RUNS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    stat = _process_start(pid)
    if stat is None:
        return True
    state, started = stat
    # A zombie is dead; a different start time means the pid was reused by another process.
    return state not in ("Z", "X") and (driver.get("pid_start") is None or started == driver["pid_start"])


@dataclass
class RunReport:
    finished: int
    complete: int
    failed: int
    requeued: int
    elapsed_s: float
    stopped_by: str  # "budget", "time", "strategy"

    def __repr__(self) -> str:  # what a notebook cell shows: seconds rounded
        return (f"RunReport(finished={self.finished}, complete={self.complete}, failed={self.failed}, "
                f"requeued={self.requeued}, elapsed_s={self.elapsed_s:.1f}, stopped_by={self.stopped_by!r})")


def evaluation_seed(run_seed: int, trial_number: int) -> int:
    return int(np.random.SeedSequence([run_seed, trial_number]).generate_state(1)[0] & 0x7FFFFFFF)


class _Progress:
    """Progress over the budget, key figures first: the best value (one objective) or the Pareto set's
    size and hypervolume (several), then failures, the strategy's ``state()`` (e.g. archive coverage
    as a percentage) and the evaluations running.

    The hypervolume is shown only against a reference point the problem declares (as a share of the
    problem's ``max_hypervolume()`` when it knows it): against a point derived from the data it
    mixes the objectives' units and moves with the data, so it is left out.

    On a terminal this is a tqdm bar of fixed width whose figures are cut, whole, to the terminal's
    width. When stderr is not a terminal (a log file, a CI job, a notebook's captured stream)
    carriage-return redraws would pile up into one unreadable line, so a plain line is written every
    ``log_every_s`` seconds and once at the end instead.
    """

    BAR_FORMAT = "{desc} {n_fmt}/{total_fmt} |{bar:12}| {elapsed}<{remaining}{postfix}"

    def __init__(self, store: Store, problem: Problem, strategy: Strategy, budget: int, history: Sequence[Trial],
                 enabled: bool, log_every_s: float = 10.0):
        self.store, self.problem, self.strategy, self.budget = store, problem, strategy, budget
        self.stream = sys.stderr
        self.enabled = enabled
        self.tty = enabled and _isatty(self.stream)
        # Counts include the trials of earlier sessions of a resumed run, so best/hv describe the run.
        self.complete: list[Trial] = [t for t in history if t.state == "complete"]
        self.failed = sum(t.state == "failed" and not t.stale for t in history)
        self.finished = len(self.complete) + self.failed
        self.bar = tqdm(total=budget, initial=min(self.finished, budget), desc=store.info.name, disable=not self.tty,
                        file=self.stream, bar_format=self.BAR_FORMAT, dynamic_ncols=True)
        self.log_every_s = log_every_s
        self._t0 = time.monotonic()
        self._last = 0.0  # last postfix refresh (tty)
        self._last_line = self._t0  # last log line (not a tty)
        self._logged = -1  # finished count of the last log line
        self._running = 0
        self._max_hv: float | None | bool = False  # False: not asked yet

    def _max_hypervolume(self) -> float | None:
        if self._max_hv is False:
            try:  # a benchmark's known maximum (a property or a method); most problems do not know theirs
                top = getattr(self.problem, "max_hypervolume", None)
                top = top() if callable(top) else top
                self._max_hv = float(top) if top else None
            except Exception:
                self._max_hv = None
        return self._max_hv  # type: ignore[return-value]

    def fields(self, running: int) -> dict[str, str]:
        """The figures shown, most important first, as short strings (the log line's ``key=value`` pairs)."""
        post: dict[str, str] = {}
        directions = self.problem.directions
        names = self.problem.objective_names
        ok = [t for t in self.complete if t.feasible]
        if ok and len(directions) == 1:
            better = min if directions[0] == "minimize" else max
            post[f"best {names[0]}"] = f"{better(t.values[0] for t in ok):.4g}"
        elif ok:
            front = pareto_trials(ok, directions)
            post["pareto"] = str(len(front))
            ref = self.problem.reference_point
            if ref is not None and front:
                hv = hypervolume(np.array([t.values for t in front]), directions, ref)
                top = self._max_hypervolume()
                if top:
                    post["hv/max"] = f"{hv / top:.1%}"  # a share of the problem's known maximum
                else:
                    post["hv"] = f"{hv:.4g}"
        if self.failed:
            post["failed"] = str(self.failed)
        try:
            state = self.strategy.state()
        except Exception as e:  # progress must never stop a run
            state = {"state": f"unavailable ({type(e).__name__})"}
        for k, v in state.items():
            if k == "coverage" and isinstance(v, float):
                post[k] = f"{v:.1%}"
            else:
                post[k] = f"{v:.3g}" if isinstance(v, float) else str(v)
        post["running"] = str(running)
        return post

    def _postfix(self, running: int) -> str:
        """The figures that fit the terminal after the bar, whole ones only, in order of importance."""
        columns = shutil.get_terminal_size((80, 24)).columns
        fixed = len(self.store.info.name) + 2 * len(str(self.budget)) + 34  # desc, counts, bar, times
        room = max(0, columns - fixed - 1)
        out = ""
        for k, v in self.fields(running).items():
            item = f", {k}={v}"  # tqdm puts ", " before the postfix: the first one is dropped
            if len(out) + len(item) > room:
                break
            out += item
        return out[2:]

    def update(self, trial: Trial, running: int, force: bool = False) -> None:
        if trial.state == "complete":
            self.complete.append(trial)
        else:
            self.failed += 1
        self.finished += 1
        self._running = running
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            if force or now - self._last >= 1.0:
                self._last = now
                self.bar.postfix = self._postfix(running)
            self.bar.update(1)
        elif force or now - self._last_line >= self.log_every_s:
            self._log_line(running)

    def _log_line(self, running: int) -> None:
        self._last_line, self._logged = time.monotonic(), self.finished
        elapsed = self._last_line - self._t0
        pairs = " ".join(f"{k}={v}" if " " not in v else f"{k}=[{v}]" for k, v in self.fields(running).items())
        print(f"[{self.store.info.name}] {min(self.finished, self.budget)}/{self.budget} finished "
              f"({len(self.complete)} complete) {pairs} elapsed={elapsed:.0f}s", file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled and not self.tty and self._logged != self.finished:
            self._log_line(self._running)
        self.bar.close()


def _isatty(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):
        return False


def run(
    problem: Problem,
    strategy: Strategy,
    evaluator: Evaluator,
    store: Store,
    *,
    budget: int,
    workers: int = 1,
    time_limit_s: float | None = None,
    timeout_s: float | None = None,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
) -> RunReport:
    """Run until ``budget`` evaluations have finished (or ``time_limit_s`` passed); resumable."""
    if budget < 1:
        raise ValueError(f"budget={budget}: must be >= 1")
    if workers < 1:
        raise ValueError(f"workers={workers}: must be >= 1")
    t_start = time.monotonic()
    token = uuid.uuid4().hex
    driver = driver_identity(token)
    history = store.trials()
    busy = [t for t in history if t.state == "running" and driver_alive(t.driver)]
    if busy:
        d = busy[0].driver or {}
        raise RunInUse(f"run {store.info.name!r} has {len(busy)} evaluation(s) running in a driver that is still "
                       f"alive (pid {d.get('pid')} on {d.get('host')}); stop it before resuming this run, or "
                       f"choose another --name")
    for t in history:
        if t.state == "running":
            store.fail(t, STALE_REASON, stale=True, metadata={"requeue": True})
    # Stale trials not yet evaluated again (also those cancelled at a previous wall-time limit). A trial
    # re-launched by a driver that died before clearing the stale one's flag is not launched again.
    relaunched = {t.requeue_of for t in history if t.requeue_of is not None}
    requeue: deque[Trial] = deque(t for t in history
                                  if t.stale and t.metadata.get("requeue") and t.number not in relaunched)
    strategy.restore(history)
    finished = sum(t.finished for t in history)
    in_flight: dict[int, Trial] = {}
    bar = _Progress(store, problem, strategy, budget, history, progress)
    stopped_by = "budget"
    n_requeued = len(requeue)

    created = len(history)  # this driver's count of the run's trials (the trial number, when it runs alone)

    def launch(config: Config, origin: str, requeue_of: int | None = None) -> None:
        nonlocal created
        config = problem.space.validate(config)
        trial = store.start(config, problem.space.active_distributions(config), origin=origin,
                            seed=evaluation_seed(store.info.seed, created), driver=driver, requeue_of=requeue_of)
        created += 1
        in_flight[trial.number] = trial
        evaluator.submit(Job(trial.number, config, trial.seed))

    def record(outcome: Outcome) -> Trial:
        trial = in_flight.pop(outcome.key)
        meta = dict(outcome.metadata)
        if outcome.ok:
            try:
                values, measures, constraints = problem.normalise(outcome.evaluation)
            except EvaluationError as e:
                return store.fail(trial, f"invalid result: {e}", metadata=meta)
            meta.update(outcome.evaluation.metadata or {})
            return store.complete(trial, values, measures, constraints, meta)
        return store.fail(trial, f"{outcome.kind}: {outcome.error}", metadata=meta)

    evaluator.start(problem, workers, timeout_s)
    _LIVE_RUNS.add(token)
    try:
        while True:
            out_of_time = time_limit_s is not None and time.monotonic() - t_start >= time_limit_s
            slots = min(workers - len(in_flight), budget - finished - len(in_flight))
            if slots > 0 and not out_of_time:
                while requeue and slots > 0:
                    stale = requeue.popleft()
                    # The stale trial is finished and cannot be updated (Optuna refuses): the new trial's
                    # requeue_of is what marks it as evaluated again.
                    launch(stale.params, "requeue", requeue_of=stale.number)
                    slots -= 1
                if slots > 0:
                    asked = strategy.ask(slots, pending=[t.params for t in in_flight.values()])
                    for config in asked[:slots]:
                        launch(config, "strategy")
            if not in_flight:
                if out_of_time:
                    stopped_by = "time"
                elif finished < budget:
                    stopped_by = "strategy"
                break
            if out_of_time:
                stopped_by = "time"
                for trial in list(in_flight.values()):
                    store.fail(trial, CANCELLED_REASON, stale=True, metadata={"requeue": True})
                in_flight.clear()
                break
            wait_for = None if time_limit_s is None else max(0.05, time_limit_s - (time.monotonic() - t_start))
            for outcome in evaluator.wait(timeout=wait_for):
                trial = record(outcome)
                finished += 1
                strategy.tell(trial)
                for cb in callbacks:
                    cb(store, trial)
                bar.update(trial, len(in_flight), force=finished >= budget)
    finally:
        _LIVE_RUNS.discard(token)
        evaluator.close()
        bar.close()
    counts = store.counts()
    return RunReport(finished=finished, complete=counts["n_complete"], failed=counts["n_failed"],
                     requeued=n_requeued, elapsed_s=time.monotonic() - t_start, stopped_by=stopped_by)
