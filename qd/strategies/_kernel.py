"""BoTorch's fused qLogNEHVI kernel, built once per environment in qd's own cache, never waited on forever.

BoTorch 0.18 (``botorch.acquisition.multi_objective.logei._try_load_fused_kernel``) JIT-compiles
``botorch/csrc/logei_fused.cpp`` with ``torch.utils.cpp_extension.load`` the first time a
qLog(N)EHVI is constructed, into ``~/.cache/torch_extensions`` (or ``TORCH_EXTENSIONS_DIR``),
inside the calling process. Torch guards that build with a ``FileBaton``: a ``lock`` file created
with ``O_EXCL`` that other processes poll for, with no timeout and no owner. A process killed
mid-compile leaves the file behind and every later process waits on it for ever; a live compile
(minutes on a loaded machine with 2 cores) blocks the first ask of every other run.

qd takes this over (``FusedKernel``):

- BoTorch's own loader is switched off (``disable_botorch_loader``: its "attempted" flag is set
  when qd's BoTorch strategies are imported), so it never compiles nor waits.
- The kernel is built in a child process (``python -m qd.strategies._kernel build DIR``) into
  ``$QD_CACHE_DIR/kernels/logei_fused-<key>`` (default ``~/.cache/qd``), where the key hashes the
  kernel source, the torch and botorch versions, the Python ABI, the compiler flags and the CPU
  flags (it is built with ``-march=native``). The child holds an ``fcntl.flock`` lock on
  ``DIR.lock`` while it builds: the kernel releases the lock of a killed process, so a lock can
  never be stale. The lock file names the builder (pid, host, start time) for messages. A torch
  ``lock`` file found in the build directory by the lock holder is a killed builder's leftover and
  is removed (and said so).
- The asking process waits for the build at most ``timeout_s`` (``QD_KERNEL_TIMEOUT_S``,
  default 30 s) and otherwise goes on with BoTorch's pure-Python path; the build carries on in
  the background and later asks pick the kernel up once it is ready (``refresh``).
- Which path ran is ``KernelStatus.path`` ("fused" or "python") with its ``reason``; strategies
  show it in ``state()`` (key ``kernel``) and keep the history.
- ``QD_FUSED_KERNEL=0`` skips the kernel altogether; ``python -m qd.strategies._kernel build``
  (no directory) builds it ahead of time, e.g. right after installation.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NAME = "logei_fused_ext"
CFLAGS = ["-O3", "-march=native"]
DEFAULT_TIMEOUT_S = 30.0
READY = "ready.json"  # written by the builder after the library built and imported


@dataclass
class KernelStatus:
    """Which qLogNEHVI path runs, and why. ``path``: "fused" or "python"; ``pending``: a build is under way."""

    path: str
    reason: str
    build_dir: str | None = None
    pending: bool = False
    waited_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "reason": self.reason, "build_dir": self.build_dir, "pending": self.pending,
                "waited_s": round(self.waited_s, 3), "notes": list(self.notes)}


def cache_root() -> Path:
    """qd's cache: ``$QD_CACHE_DIR``, else ``$XDG_CACHE_HOME/qd``, else ``~/.cache/qd``."""
    if os.environ.get("QD_CACHE_DIR"):
        return Path(os.environ["QD_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qd"


def kernel_source() -> Path:
    import botorch

    return Path(botorch.__file__).resolve().parent / "csrc" / "logei_fused.cpp"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def build_key() -> str:
    """A hash of everything the built library depends on."""
    import botorch
    import torch

    h = hashlib.sha256()
    for part in (kernel_source().read_bytes(), torch.__version__.encode(), botorch.__version__.encode(),
                 sysconfig.get_config_var("EXT_SUFFIX").encode(), " ".join(CFLAGS).encode(), _cpu_flags().encode(),
                 platform.machine().encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def default_build_dir() -> Path:
    return cache_root() / "kernels" / f"logei_fused-{build_key()}"


def _lock_path(build_dir: Path) -> Path:
    return build_dir.with_name(build_dir.name + ".lock")


def lock_holder(build_dir: Path) -> dict[str, Any] | None:
    """The builder that holds the lock now (its record), or None when nobody holds it."""
    path = _lock_path(build_dir)
    if not path.exists():
        return None
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                return json.loads(f.read() or "{}")
            except json.JSONDecodeError:
                return {}
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def _import_library(build_dir: Path) -> Any:
    from torch.utils.cpp_extension import _import_module_from_library

    return _import_module_from_library(NAME, str(build_dir), True)


def build(build_dir: Path) -> list[str]:
    """Build the kernel into ``build_dir`` (blocking; the lock is held meanwhile). Returns notes.

    Run by the builder child; safe to run in several processes at once (one builds, the others
    wait for it and find the result).
    """
    build_dir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    with open(_lock_path(build_dir), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the OS if this process dies
        lock.seek(0)
        lock.truncate()
        lock.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))
        lock.flush()
        if (build_dir / READY).exists():
            return notes
        baton = build_dir / "lock"
        if baton.exists():  # only a lock holder builds here: this is a killed builder's leftover
            baton.unlink()
            notes.append(f"removed the stale build lock {baton} left by a killed build")
            print(notes[-1], flush=True)
        from torch.utils.cpp_extension import load

        t0 = time.monotonic()
        load(name=NAME, sources=[str(kernel_source())], extra_cflags=CFLAGS, build_directory=str(build_dir),
             verbose=False)
        (build_dir / READY).write_text(json.dumps({"seconds": time.monotonic() - t0, "notes": notes}))
        lock.seek(0)
        lock.truncate()
    return notes


def start_build(build_dir: Path) -> subprocess.Popen:
    """Start the builder child in its own session (it outlives a parent that stops waiting)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    log = open(build_dir.with_name(build_dir.name + ".log"), "ab")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[2]),
                                                                   os.environ.get("PYTHONPATH")) if p))
    try:
        return subprocess.Popen([sys.executable, "-m", "qd.strategies._kernel", "build", str(build_dir)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True)
    finally:
        log.close()


def disable_botorch_loader() -> None:
    """Stop BoTorch from compiling (and waiting on torch's lock) by itself; qd decides what ``_C`` is."""
    from botorch.acquisition.multi_objective import logei

    logei._load_attempted = True


def _set_botorch_kernel(module: Any) -> None:
    from botorch.acquisition.multi_objective import logei

    logei._load_attempted = True
    logei._C = module


class FusedKernel:
    """The fused kernel of one environment (see the module docstring).

    Args:
        build_dir: where it is built (default ``default_build_dir()``).
        timeout_s: how long ``ensure`` waits for a build (default ``QD_KERNEL_TIMEOUT_S`` or 30 s).
    """

    def __init__(self, build_dir: Path | str | None = None, timeout_s: float | None = None):
        self._build_dir = Path(build_dir) if build_dir is not None else None
        env_timeout = os.environ.get("QD_KERNEL_TIMEOUT_S")
        self.timeout_s = float(timeout_s if timeout_s is not None else env_timeout or DEFAULT_TIMEOUT_S)
        self.status: KernelStatus | None = None
        self._child: subprocess.Popen | None = None
        self._lock = threading.Lock()

    @property
    def build_dir(self) -> Path:
        if self._build_dir is None:
            self._build_dir = default_build_dir()
        return self._build_dir

    def _load(self, waited: float, notes: list[str]) -> KernelStatus:
        try:
            module = _import_library(self.build_dir)
        except Exception as e:  # a broken library: pure Python, and say why
            _set_botorch_kernel(None)
            return KernelStatus("python", f"the built kernel did not load ({type(e).__name__}: {e})",
                                str(self.build_dir), waited_s=waited, notes=notes)
        _set_botorch_kernel(module)
        return KernelStatus("fused", "compiled kernel", str(self.build_dir), waited_s=waited, notes=notes)

    def ensure(self) -> KernelStatus:
        """Make BoTorch use the kernel if it is (or becomes within ``timeout_s``) available; else pure Python."""
        with self._lock:
            if self.status is not None:
                return self.refresh()
            self.status = self._ensure()
            return self.status

    def _ensure(self) -> KernelStatus:
        disable_botorch_loader()
        if os.environ.get("QD_FUSED_KERNEL", "1").lower() in ("0", "false", "no", "off"):
            _set_botorch_kernel(None)
            return KernelStatus("python", "QD_FUSED_KERNEL is off")
        try:
            build_dir = self.build_dir
        except Exception as e:  # no kernel source in this BoTorch
            _set_botorch_kernel(None)
            return KernelStatus("python", f"no kernel source ({type(e).__name__}: {e})")
        if (build_dir / READY).exists():
            return self._load(0.0, [])
        holder = lock_holder(build_dir)
        t0 = time.monotonic()
        self._child = start_build(build_dir)
        while time.monotonic() - t0 < self.timeout_s:
            if self._child.poll() is not None:
                break
            time.sleep(0.1)
        waited = time.monotonic() - t0
        notes = self._notes()
        if (build_dir / READY).exists():
            return self._load(waited, notes)
        _set_botorch_kernel(None)
        if self._child.poll() is None:
            who = f" (waiting for pid {holder.get('pid')}'s build)" if holder else ""
            return KernelStatus("python", f"kernel build not finished after {self.timeout_s:g} s{who}; it goes on "
                                          f"in the background and later asks use it once ready",
                                str(build_dir), pending=True, waited_s=waited, notes=notes)
        return KernelStatus("python", f"kernel build failed (exit {self._child.returncode}; see "
                                      f"{build_dir.with_name(build_dir.name + '.log')})",
                            str(build_dir), waited_s=waited, notes=notes)

    def _notes(self) -> list[str]:
        ready = self.build_dir / READY
        if ready.exists():
            try:
                return list(json.loads(ready.read_text()).get("notes", []))
            except (OSError, json.JSONDecodeError):
                return []
        return []

    def refresh(self) -> KernelStatus:
        """Switch to the kernel once a background build has finished; returns the current status."""
        status = self.status
        if status is None or not status.pending:
            return status  # type: ignore[return-value]
        if (self.build_dir / READY).exists():
            self.status = self._load(status.waited_s, self._notes())
            self.status.reason += " (built in the background)"
        elif self._child is not None and self._child.poll() is not None:
            self.status = KernelStatus("python", f"kernel build failed (exit {self._child.returncode})",
                                       str(self.build_dir), waited_s=status.waited_s, notes=status.notes)
        return self.status


_DEFAULT: FusedKernel | None = None


def default_kernel() -> FusedKernel:
    """The process-wide kernel (one build check per process)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = FusedKernel()
    return _DEFAULT


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "build" or len(argv) > 2:
        print("usage: python -m qd.strategies._kernel build [BUILD_DIR]", file=sys.stderr)
        return 2
    build_dir = Path(argv[1]) if len(argv) == 2 else default_build_dir()
    with contextlib.suppress(Exception):
        import torch

        torch.set_num_threads(1)
    build(build_dir)
    print(f"fused qLogNEHVI kernel ready in {build_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
