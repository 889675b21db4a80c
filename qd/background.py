"""Asks computed beside the run loop: a model-based proposal never stops results from being recorded.

``BackgroundAsks`` wraps any strategy. Its ``ask`` starts the inner strategy's ``ask`` on a thread
and returns what is ready (often nothing) at once; the run loop goes on recording finished
evaluations and dispatching queued work, and asks again. Tells that arrive while a proposal is
being computed are held and told to the inner strategy, in order, as soon as it is done (the
inner strategy is never used from two threads). A proposal is made for the pending
configurations of the moment it starts; ones that became pending since are not handed out twice.

``ask_time_limit_s`` bounds how long a slot waits: once the proposal has run that long, asks are
answered with a quasi-random point (scrambled Sobol over the space, avoiding pending and known
configurations); such trials have the origin ``"fallback"`` (``origin_of``) and are listed in
``fallbacks``. The late proposal is still used, for the next slots.

What the run loop uses (``qd.run``): ``busy`` (a proposal is being computed), ``wait(timeout)``
(block until it is done; when nothing is in flight), ``origin_of(config)``. ``state()`` adds
``proposing`` (seconds the current proposal has run) to the inner strategy's numbers.

Cost on CPU: the thread adds nothing to the proposal itself (it is the same ``ask``); the loop
polls every ``POLL_S`` while a proposal is computed. Python's GIL is released inside torch's
kernels, so recording results beside a BoTorch proposal slows it by a few per cent at most.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import qmc

from qd.checks import check_number
from qd.space import config_key
from qd.space import Config
from qd.store import Trial
from qd.strategy import Strategy

#: How often the run loop looks for a finished proposal while evaluations are in flight.
POLL_S = 0.05


class BackgroundAsks(Strategy):
    """``inner``'s asks on a thread beside the run loop (see the module docstring).

    Args:
        inner: the strategy that proposes.
        ask_time_limit_s: after this many seconds of a proposal, free slots get quasi-random
            points (None: they wait for the proposal).
        quick_s: how long ``ask`` waits for the proposal it has just started before returning
            (a cheap ask, such as a warm-up point, then answers at once).

    Raises:
        ValueError: ``ask_time_limit_s`` is not a number of seconds > 0 or None.
    """

    def __init__(self, inner: Strategy, *, ask_time_limit_s: float | None = None, quick_s: float = 0.05):
        super().__init__(inner.problem, inner.seed)
        check_number(ask_time_limit_s, "ask_time_limit_s", f"strategy {inner.name!r}", low=0, low_open=True,
                     none=True)  # seconds; null: wait for every proposal
        self.inner = inner
        self.name = inner.name
        self.ask_time_limit_s = None if ask_time_limit_s is None else float(ask_time_limit_s)
        self.quick_s = float(quick_s)
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self._result: list[Config] | None = None
        self._error: BaseException | None = None
        self._ready: list[Config] = []
        self._held: list[Trial] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._done.set()
        self._sobol = qmc.Sobol(d=self.space.dim, scramble=True, seed=np.random.default_rng([inner.seed, 7]))
        self._origins: dict[bytes, str] = {}
        self._state: dict[str, Any] = {}
        self.fallbacks: list[tuple[Config, float]] = []  # (config, seconds the proposal had run)
        self.proposal_seconds: list[float] = []

    # --- what the run loop uses ----------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """Whether a proposal is being computed now."""
        return not self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the current proposal is done (or ``timeout`` s); True when none is running."""
        return self._done.wait(timeout)

    def origin_of(self, config: Config) -> str:
        """"strategy", or "fallback" for a quasi-random point handed out at ``ask_time_limit_s``."""
        return self._origins.pop(self._key(config), "strategy")

    # --- Strategy ------------------------------------------------------------------------------
    def _key(self, config: Config) -> bytes:
        return self.space.key(config)

    def _run(self, n: int, pending: list[Config]) -> None:
        try:
            result = self.inner.ask(n, pending)
        except BaseException as e:  # raised again by the next ask, in the loop's thread
            self._error, result = e, []
        with self._lock:
            self._result = result
            self.proposal_seconds.append(time.monotonic() - self._started)
            self._done.set()

    def _collect(self) -> None:
        """Take a finished proposal's configurations and replay the tells held meanwhile."""
        if self.busy or self._thread is None:
            return
        self._thread.join()
        self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        self._ready.extend(self._result or [])
        self._result = None
        held, self._held = self._held, []
        for trial in held:
            self.inner.tell(trial)
        self._state = self._inner_state()

    def ask(self, n: int, pending: Sequence[Config] = ()) -> list[Config]:
        """Up to ``n`` configurations that are ready now, possibly none; starts a proposal when none runs.

        Args:
            n: free slots.
            pending: configurations being evaluated; none of them is handed out again.

        Returns:
            At most ``n`` configurations: ready proposals, then (once a proposal has run
            ``ask_time_limit_s``) quasi-random fallbacks.

        Raises:
            Exception: whatever the inner strategy's last ``ask`` raised, in the caller's thread.
        """
        self._collect()
        busy_keys = {self._key(c) for c in pending}
        out: list[Config] = []
        while self._ready and len(out) < n:
            config = self._ready.pop(0)
            key = self._key(config)
            if key not in busy_keys:
                out.append(config)
                busy_keys.add(key)
        if len(out) < n and not self.busy and not self._ready:
            self._done.clear()
            self._started = time.monotonic()
            self._thread = threading.Thread(target=self._run, args=(n - len(out), [*pending, *out]),
                                            name=f"qd-ask-{self.inner.name}", daemon=True)
            self._thread.start()
            if self.quick_s > 0 and self._done.wait(self.quick_s):
                self._collect()
                while self._ready and len(out) < n:
                    config = self._ready.pop(0)
                    if self._key(config) not in busy_keys:
                        out.append(config)
                        busy_keys.add(self._key(config))
        if len(out) < n and self.busy and self.ask_time_limit_s is not None:
            ran = time.monotonic() - self._started
            if ran >= self.ask_time_limit_s:
                for config in self._fallback(n - len(out), busy_keys):
                    out.append(config)
                    self._origins[self._key(config)] = "fallback"
                    self.fallbacks.append((config, ran))
        return out

    def _fallback(self, k: int, avoid: set[bytes]) -> list[Config]:
        out: list[Config] = []
        with warnings.catch_warnings():  # Sobol prefers powers of two; any count is still low-discrepancy
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(k):
                for _attempt in range(100):
                    config = self.space.decode(self.space.snap(self._sobol.random(1))[0])
                    if self._key(config) not in avoid:
                        break
                avoid.add(self._key(config))
                out.append(config)
        return out

    def tell(self, trial: Trial) -> None:
        """Tell the inner strategy now, or hold the trial until the running proposal is done."""
        with self._lock:
            if self.busy:
                self._held.append(trial)
                return
        self._collect()
        self.inner.tell(trial)

    def restore(self, trials: Sequence[Trial]) -> None:
        """Restore the inner strategy (before any proposal runs)."""
        self.inner.restore(trials)
        self._state = self._inner_state()

    def _inner_state(self) -> dict[str, Any]:
        try:
            return dict(self.inner.state())
        except Exception as e:  # progress must never stop a run
            return {"state": f"unavailable ({type(e).__name__})"}

    def state(self) -> dict[str, Any]:
        """The inner strategy's numbers, plus ``proposing``: how long the current proposal has run."""
        if not self.busy:
            self._state = self._inner_state()
            return {**self._state, "proposing": "no"}
        return {**self._state, "proposing": f"{time.monotonic() - self._started:.1f}s"}

    def close(self) -> None:
        """End of the run: a proposal still running is abandoned (its daemon thread ends on its own)."""
        if not self.busy:
            self._collect()
