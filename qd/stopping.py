"""Stopping a run cleanly on SIGINT, SIGTERM and SIGHUP.

A driver stopped by Ctrl-C, ``kill`` (SIGTERM) or a closed terminal (SIGHUP) must leave a run that
resumes as if it had been killed, but tidier: no evaluation left RUNNING (the dashboard would
describe a dead run as running), no worker left behind, one hint, no traceback.

``StopOnSignals`` turns the first of these signals into ``Interrupted`` (a ``KeyboardInterrupt``)
raised in the main thread, where the run loop is waiting for results; later signals are ignored
while the loop cleans up (stopping workers, marking trials), so a second Ctrl-C cannot cut the
cleanup short or print a second traceback. ``mark_stale`` is the cleanup of the record: every
evaluation still in flight becomes a failed, *stale* trial whose configuration a resumed run
evaluates again. A process killed by SIGKILL cannot do any of this; ``--resume`` handles that case
(its trials are marked stale then).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterable
from typing import Any

#: What a driver stops on.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
INTERRUPTED_REASON = ("stale: the driver was stopped ({signal}) while this evaluation was running; its configuration "
                      "is evaluated again on --resume")


# The signal the last StopOnSignals stopped on: Ray's waits turn an exception raised by a signal
# handler into a plain KeyboardInterrupt, so the exception alone cannot say which signal it was.
_last_signal: int | None = None


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal; ``signum`` says which (the exit status is 128 + signum)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def name(self) -> str:
        """The signal's name, e.g. ``"SIGINT"``."""
        return signal.Signals(self.signum).name


class StopOnSignals:
    """Install the handlers now (main thread only; elsewhere it does nothing); ``restore()`` puts
    back the ones found. Install after anything that sets its own (``ray.init`` sets SIGTERM's)."""

    def __init__(self, signals: Iterable[int] = STOP_SIGNALS):
        global _last_signal
        self.signum: int | None = None
        _last_signal = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for s in signals:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except (OSError, ValueError):  # not available on this platform
                pass

    def _handle(self, signum: int, frame: object) -> None:
        global _last_signal
        if self.signum is not None:  # already stopping: let the cleanup finish
            return
        self.signum = _last_signal = signum
        raise Interrupted(signum)

    @property
    def stopped(self) -> bool:
        """Whether a signal has arrived."""
        return self.signum is not None

    def restore(self) -> None:
        """Put back the signal handlers found at install time."""
        for s, previous in self._previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


def mark_stale(store: Any, trials: Iterable[Any], error: BaseException | None) -> None:
    """Record the run loop's in-flight ``trials`` as stale (evaluated again on resume) after the
    loop ended by ``error``. Never raises: the original error is what the caller must see."""
    signum = stop_signal(error)
    what = signal.Signals(signum).name if signum else type(error).__name__ if error else "stopped"
    reason = INTERRUPTED_REASON.format(signal=what)
    for trial in list(trials):
        try:
            store.fail(trial, reason, stale=True, metadata={"requeue": True})
        except Exception as e:  # noqa: BLE001 - e.g. the database went away: resume marks them instead
            print(f"qd: could not mark trial {getattr(trial, 'number', '?')} stale ({type(e).__name__}: {e}); "
                  f"--resume will", file=sys.stderr)
            return


def stop_signal(error: BaseException | None) -> int | None:
    """The signal a run was stopped by, when ``error`` is how it stopped (None: not by a signal)."""
    if isinstance(error, Interrupted):
        return error.signum
    if isinstance(error, KeyboardInterrupt):
        return _last_signal or signal.SIGINT
    return None


def exit_status(error: KeyboardInterrupt) -> int:
    """The shell's convention: 128 + the signal's number (130 for Ctrl-C)."""
    return 128 + (stop_signal(error) or signal.SIGINT)


__all__ = ["Interrupted", "StopOnSignals", "mark_stale", "exit_status", "stop_signal", "STOP_SIGNALS"]
