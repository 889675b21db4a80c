"""Processes on this host: who a process is (pid and start time) and whether it still runs.

A run's claim and its in-flight rows name the processes that may still write to it (the driver,
its record writer); a resume checks them with ``alive`` before taking the run over.
"""

from __future__ import annotations

import os
import socket
from typing import Any


def process_start(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of process ``pid`` from /proc, or None where unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def identity(pid: int) -> dict[str, Any]:
    """What is recorded of process ``pid`` of this host: ``host``, ``pid`` and ``pid_start``."""
    stat = process_start(pid)
    return {"host": socket.gethostname(), "pid": pid, "pid_start": stat[1] if stat else None}


def alive(process: dict[str, Any] | None) -> bool:
    """Whether a process recorded by ``identity`` still runs (known on its own host only: False
    elsewhere). A zombie is dead; a different start time means its pid now names another process."""
    if not process or process.get("host") != socket.gethostname() or not isinstance(process.get("pid"), int):
        return False
    pid = process["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    stat = process_start(pid)
    if stat is None:
        return True
    state, started = stat
    return state not in ("Z", "X") and (process.get("pid_start") is None or started == process["pid_start"])
