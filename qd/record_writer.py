"""The record writer: a child process that writes a run's cheap flushes beside the run loop.

Why a process and not a thread: a writer thread in the driver's process slowed the loop's own
numpy and pyribs work by about 60% on two cores (measured: a 10^6-evaluation map-elites run took
7.8 s with it, 4.5 s with no writes), though it held the interpreter lock for a twentieth of the
time; the same writes from a separate process cost the loop nothing measurable. So the driver
hands each flush's finished trials (their arrays copied into a shared staging area, pickle's
out-of-band buffers), its in-flight rows and the heartbeat through a pipe to this process, which encodes the segment, runs
``Record.write`` on a connection of its own and answers when the transaction has landed.

Guarantees, as for a write in the driver: one flush is one transaction, landed whole or not at all;
at most one write is in flight; the driver's next flush, read or close waits for it and re-raises
its error. The child dies with the driver (``PR_SET_PDEATHSIG``), and exits once the driver closes
the pipe, after the transaction in progress, if any, has landed; it ignores SIGINT (a Ctrl-C
reaches the driver, which stops the run and closes the writer in order). A kill -9 of the driver
therefore costs at most the write in flight (it lands whole or not at all), as it would have cost
those outcomes unflushed; where the child outlives its driver (no ``PR_SET_PDEATHSIG``), the run's
claim names it and a resume waits for it (``qd.run.claim_run``).

The child runs ``_child(READ_FD, WRITE_FD, DRIVER_PID)`` (``_BOOT``; ``python -m qd.record_writer`` runs it
too); the driver side is ``RecordWriter``.
"""

from __future__ import annotations

import atexit
import mmap
import os
import pickle
import signal
import subprocess
import sys
import weakref
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qd.columns import Columns

#: How long the driver waits for the writer to stop at close before killing it.
CLOSE_TIMEOUT_S = 120.0
#: The pipe's buffer: a flush's segment (about a megabyte for 4096 trials) in few round trips.
PIPE_BYTES = 2**20
#: The shared staging area (Linux ``memfd``) that a flush's arrays are copied into for the child to
#: read in place: one memory copy instead of two through the pipe's kernel buffer, and the driver
#: never blocks on a full pipe while a busy machine leaves the child unscheduled. A flush of more
#: goes through the pipe. Pages are only committed as they are used.
STAGE_BYTES = 32 * 2**20
_ALIGN = 64
_READY = b"ready"
_OK = b""


class RecordWriteError(RuntimeError):
    """The record writer process could not write a flush (nothing of it was written)."""


class RecordWriter:
    """The driver's end of a record writer process for one run's record.

    Start it with the record's database URL, run id and dims; it is ``ready`` once the child has
    opened the database (until then, and if it cannot start, the caller writes in its own process).

    Args:
        url: The record's SQLAlchemy URL (``qd.store.record_url``).
        run_id: The run's row in ``qd_runs``.
        dims: The record's (d, m, k, c).
    """

    def __init__(self, url: str, run_id: int, dims: tuple[int, int, int, int]):
        from qd import record

        to_child, self._out = os.pipe()
        self._in, from_child = os.pipe()
        for fd in (to_child, self._out):
            _widen(fd)
        stage_fd = _memfd(STAGE_BYTES)
        #: The driver's view of the staging area (None: every flush goes through the pipe).
        try:
            self._stage_map = None if stage_fd < 0 else mmap.mmap(stage_fd, STAGE_BYTES)
        except (OSError, ValueError):  # no staging: the pipe carries everything
            os.close(stage_fd)
            stage_fd, self._stage_map = -1, None
        self._stage = None if self._stage_map is None else memoryview(self._stage_map)
        try:
            self._proc: subprocess.Popen | None = subprocess.Popen(
                [sys.executable, "-c", _BOOT, str(Path(__file__).resolve().parent), str(to_child), str(from_child),
                 str(os.getpid()), str(stage_fd)],
                pass_fds=(to_child, from_child, *([stage_fd] if stage_fd >= 0 else [])), stdin=subprocess.DEVNULL)
        except OSError:
            self._proc = None
        for fd in (to_child, from_child, *([stage_fd] if stage_fd >= 0 else [])):
            os.close(fd)
        self._send = Connection(self._out, readable=False)
        self._recv = Connection(self._in, writable=False)
        self._state = "starting"  # -> "idle" <-> "writing"; or "failed" (why: ``failed``)
        self.failed: str | None = None
        self._error: tuple[str, str, str] | None = None  # the last write's error, until re-raised
        if self._proc is None:
            self._fail("the writer process could not be started")
            return
        try:
            self._send.send_bytes(pickle.dumps((url, run_id, dims, record.WAL_AUTOCHECKPOINT_BYTES)))
        except OSError as e:
            self._fail(f"the writer process did not take its set-up: {e}")
            return
        _OPEN.add(self)

    @property
    def pid(self) -> int | None:
        """The child's pid (None: it could not be started)."""
        return None if self._proc is None else self._proc.pid

    def ready(self) -> bool:
        """Whether the child has opened the record and takes writes (False while it starts, or
        when it could not: ``failed`` says why). Polls the pipe; never blocks."""
        self._poll()
        return self._state in ("idle", "writing")

    def busy(self) -> bool:
        """Whether a write handed over has not landed yet. Polls the pipe; never blocks."""
        self._poll()
        return self._state == "writing"

    def submit(self, finished: Sequence[Columns], started: Sequence[tuple[int, str]], ended: Sequence[int],
               heartbeat_of: str | None) -> None:
        """Hand one transaction over (``Record.write``'s arguments, the finished trials as the
        blocks they came in) and return at once; waits first for the write in flight. The arrays
        (pickle's out-of-band buffers) are copied into the staging area, which the child reads in
        place once the message arrives (through the pipe when they do not fit, or there is none):
        the caller pays one memory copy. Call only when ``ready``.

        Raises:
            RecordWriteError: The previous write failed, or the writer is gone (then nothing of
                this one was written).
        """
        self.wait()
        buffers: list[pickle.PickleBuffer] = []
        head = pickle.dumps((list(finished), list(started), list(ended), heartbeat_of), protocol=5,
                            buffer_callback=buffers.append)
        raws = [buffer.raw() for buffer in buffers]
        places = _places([raw.nbytes for raw in raws], 0 if self._stage is None else len(self._stage))
        try:
            if places is not None:  # the child reads them in place, once it has this message
                for (at, n), raw in zip(places, raws):
                    self._stage[at:at + n] = raw
                self._send.send_bytes(b"S" + len(raws).to_bytes(4, "little") + _encode_places(places) + head)
            else:
                self._send.send_bytes(b"P" + len(raws).to_bytes(4, "little") + head)
                for raw in raws:
                    self._send.send_bytes(raw)
        except OSError as e:
            self._fail("gone")
            n = sum(len(c) for c in finished)
            raise RecordWriteError(f"the record writer process is gone ({self._exit()}): {e}; these {n} "
                                   f"outcomes were not written") from e
        self._state = "writing"

    def wait(self) -> None:
        """Wait for the write in flight, re-raising its error as ``RecordWriteError``."""
        if self._state == "writing":
            self._take()
        error, self._error = self._error, None
        if error is not None:
            kind, message, trace = error
            raise RecordWriteError(f"writing to the record failed: {kind}: {message}\n{trace}")

    def close(self) -> None:
        """Wait for the write in flight, then stop the process (it exits at the pipe's end).

        Raises:
            RecordWriteError: The last write failed.
        """
        _OPEN.discard(self)
        self._poll()
        if self._state == "starting" and self._proc is not None:
            self._proc.kill()  # nothing was handed to it: no need to wait for its start
        try:
            self.wait()
        finally:
            for conn in (self._send, self._recv):
                conn.close()
            if self._proc is not None:
                try:
                    self._proc.wait(CLOSE_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            if self._stage is not None:
                self._stage.release()
                self._stage_map.close()
                self._stage = self._stage_map = None
            if self._state != "failed":
                self._fail("closed")

    # --- the pipe -----------------------------------------------------------------------------
    def _poll(self) -> None:
        if self._state in ("starting", "writing") and self._recv.poll():
            self._take()

    def _take(self) -> None:
        """Read the answer the child has sent: to its set-up, or to the write in flight."""
        try:
            reply = self._recv.recv_bytes()
        except (EOFError, OSError):
            if self._state == "writing":
                self._error = ("RecordWriterDied", f"the record writer process stopped during a write "
                               f"({self._exit()}); that write landed whole or not at all", "")
            self._fail(f"the writer process stopped ({self._exit()})")
            return
        if self._state == "starting":
            if reply == _READY:
                self._state = "idle"
            else:
                kind, message, _ = pickle.loads(reply)
                self._fail(f"the writer process could not open the record: {kind}: {message}")
            return
        self._state = "idle"
        if reply != _OK:
            self._error = pickle.loads(reply)

    def _fail(self, why: str) -> None:
        self._state, self.failed = "failed", why

    def _exit(self) -> str:
        if self._proc is None:
            return "never started"
        try:
            code = self._proc.wait(1.0)
        except subprocess.TimeoutExpired:
            return "still running"
        return f"exit status {code}"


_OPEN: weakref.WeakSet[RecordWriter] = weakref.WeakSet()


@atexit.register
def _close_open() -> None:
    """A script that exits with a write in flight lets it land (as a writer thread's exit would)."""
    for writer in list(_OPEN):
        try:
            writer.close()
        except Exception:
            pass


def _memfd(size: int) -> int:
    """An anonymous shared file of ``size`` bytes to pass to the child (-1 where there is none)."""
    if size <= 0:
        return -1
    try:
        fd = os.memfd_create("qd-record-stage")
    except (AttributeError, OSError):
        return -1
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        return -1
    return fd


def _places(sizes: Sequence[int], room: int) -> list[tuple[int, int]] | None:
    """(offset, size) of each buffer in a staging area of ``room`` bytes, aligned; None: they do not fit."""
    places, at = [], 0
    for n in sizes:
        places.append((at, n))
        at += -(-n // _ALIGN) * _ALIGN
    return places if at <= room else None


def _encode_places(places: Sequence[tuple[int, int]]) -> bytes:
    return b"".join(at.to_bytes(8, "little") + n.to_bytes(8, "little") for at, n in places)


def _decode_places(data: bytes, k: int) -> list[tuple[int, int]]:
    return [(int.from_bytes(data[16 * i:16 * i + 8], "little"), int.from_bytes(data[16 * i + 8:16 * i + 16], "little"))
            for i in range(k)]


def _widen(fd: int) -> None:
    try:
        import fcntl

        fcntl.fcntl(fd, 1031, PIPE_BYTES)  # F_SETPIPE_SZ (Linux)
    except (ImportError, OSError):
        pass


def _die_with(parent: int) -> None:
    """Be killed when the driver dies (Linux), and stop now if it already has."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(0)


def _error(e: BaseException) -> bytes:
    import traceback

    return pickle.dumps((type(e).__name__, str(e), "".join(traceback.format_exception(e))[-4000:]))


def main(argv: list[str]) -> int:
    """The child: open the record, then write each transaction handed over until the pipe ends."""
    read_fd, write_fd, parent, *rest = (int(a) for a in argv)
    _die_with(parent)
    stage_fd = rest[0] if rest else -1
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    recv, send = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    try:
        url, run_id, dims, checkpoint_bytes = pickle.loads(recv.recv_bytes())
        stage = None if stage_fd < 0 else memoryview(mmap.mmap(stage_fd, os.fstat(stage_fd).st_size))  # the driver's size
        from qd import record

        record.WAL_AUTOCHECKPOINT_BYTES = checkpoint_bytes
        rec = record.Record(record.engine_for(url), run_id, dims)
    except EOFError:
        return 0
    except Exception as e:
        send.send_bytes(_error(e))
        return 1
    try:
        send.send_bytes(_READY)
    except OSError:  # the driver closed before the writer was ready: nothing to write
        return 0
    while True:
        try:
            message = recv.recv_bytes()
            k = int.from_bytes(message[1:5], "little")
            if message[:1] == b"S":  # the arrays wait in the staging area, untouched until this write is answered
                buffers = [stage[at:at + n] for at, n in _decode_places(message[5:5 + 16 * k], k)]
                head = message[5 + 16 * k:]
            else:
                buffers = [recv.recv_bytes() for _ in range(k)]
                head = message[5:]
        except EOFError:
            break
        try:
            blocks, started, ended, heartbeat_of = pickle.loads(head, buffers=buffers)
            rec.write(blocks, started, ended, heartbeat_of)  # one record batch per block: no concatenated copy
            del blocks  # the staging area is the driver's again once this write is answered
            reply = _OK
        except Exception as e:
            reply = _error(e)
        try:
            send.send_bytes(reply)
        except OSError:
            break
    if rec._checkpointer is not None:
        rec._checkpointer.join()
    rec.engine.dispose()
    return 0


def _child(argv: list[str]) -> None:
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is committed and closed: skip the interpreter's teardown of the modules qd
    # imports (a third of a second, which the driver's close would wait for).
    os._exit(code)


#: The child's start: the ``qd`` package as a bare namespace over its folder, so that importing
#: ``qd.record`` does not run ``qd/__init__`` (which imports Optuna and the whole public API:
#: half a second of CPU at each run's start, taken from the run loop on a busy machine).
_BOOT = ("import sys, types; qd = types.ModuleType('qd'); qd.__path__ = [sys.argv[1]]; sys.modules['qd'] = qd; "
         "from qd.record_writer import _child; _child(sys.argv[2:])")

if __name__ == "__main__":
    _child(sys.argv[1:])
