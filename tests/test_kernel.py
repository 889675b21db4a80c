"""BoTorch's fused qLogNEHVI kernel (``qd.strategies._kernel``): built in qd's cache by a child that
can be killed at any moment, never waited on for ever, pure Python when it is not there."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from qd.strategies import _kernel
from qd.strategies._kernel import READY, FusedKernel, lock_holder, start_build

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _kernel_on(monkeypatch):
    monkeypatch.delenv("QD_FUSED_KERNEL", raising=False)  # other test modules switch it off


def _kill_mid_compile(build_dir: Path, within_s: float = 120.0) -> None:
    """Start a build and SIGKILL it (with its compiler) once torch's build lock is there."""
    child = start_build(build_dir)
    t0 = time.monotonic()
    while not (build_dir / "lock").exists():
        assert child.poll() is None, "the build ended before it could be killed"
        assert time.monotonic() - t0 < within_s, "the build never took torch's lock"
        time.sleep(0.05)
    time.sleep(0.5)  # inside the compile
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()


def _stop_background_build(kernel: FusedKernel) -> None:
    if kernel._child is not None and kernel._child.poll() is None:
        os.killpg(kernel._child.pid, signal.SIGKILL)
        kernel._child.wait()


def test_a_build_killed_mid_compile_leaves_no_lock_the_next_run_waits_on(tmp_path):
    build_dir = tmp_path / "kernels" / "logei"
    _kill_mid_compile(build_dir)
    assert (build_dir / "lock").exists()  # torch's FileBaton: BoTorch's own loader would wait on it for ever
    assert not (build_dir / READY).exists()
    assert lock_holder(build_dir) is None  # qd's lock went with the killed process

    kernel = FusedKernel(build_dir, timeout_s=3.0)
    t0 = time.monotonic()
    try:
        status = kernel.ensure()
        # Its own timeout (plus imports on a loaded machine), not a wait on the dead build's lock.
        assert status.waited_s < 3.0 + 1.0 and time.monotonic() - t0 < 3.0 + 30.0
        assert status.path == "python" and status.pending
        assert "background" in status.reason
        # The new builder holds the lock, took the dead one's baton away and compiles anew.
        t1 = time.monotonic()
        while "removed the stale build lock" not in build_dir.with_name("logei.log").read_text():
            assert time.monotonic() - t1 < 60, build_dir.with_name("logei.log").read_text()
            time.sleep(0.1)
        holder = lock_holder(build_dir)
        assert holder is not None and holder["pid"] == kernel._child.pid
    finally:
        _stop_background_build(kernel)


def test_botorch_ask_goes_on_past_stale_locks_of_botorchs_own_loader(tmp_path, monkeypatch):
    """A stale torch lock in BoTorch's default extension cache (a run killed mid-compile by BoTorch's
    own loader) and one in qd's cache: the first qLogNEHVI ask still answers, on the Python path."""
    from qd.strategies.botorch_mobo import BoTorch
    from test_botorch import LIGHT, TwoObjective, _loop

    monkeypatch.delenv("QD_FUSED_KERNEL", raising=False)  # test_botorch's import turns the kernel off
    torch_cache = tmp_path / "torch_extensions" / "logei_fused_ext"
    torch_cache.mkdir(parents=True)
    (torch_cache / "lock").touch()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    build_dir = tmp_path / "qd" / "logei"
    build_dir.mkdir(parents=True)
    (build_dir / "lock").touch()  # what a build killed mid-compile leaves (see the test above)
    kernel = FusedKernel(build_dir, timeout_s=1.0)
    monkeypatch.setattr(_kernel, "_DEFAULT", kernel)
    try:
        problem = TwoObjective()
        s = BoTorch(problem, seed=0, n_init=4, **LIGHT)
        t0 = time.monotonic()
        asked = _loop(s, problem, 6)
        assert time.monotonic() - t0 < 120
        assert len(asked) == 6 and s.state()["kernel"] == "python"
        assert s.kernel is not None and s.kernel.pending
    finally:
        _stop_background_build(kernel)


def test_kernel_off_by_environment_uses_python(monkeypatch, tmp_path):
    monkeypatch.setenv("QD_FUSED_KERNEL", "0")
    status = FusedKernel(tmp_path / "k").ensure()
    assert status.path == "python" and "QD_FUSED_KERNEL" in status.reason
    from botorch.acquisition.multi_objective import logei

    assert logei._load_attempted and logei._C is None


@pytest.mark.slow
def test_after_a_killed_build_the_next_one_compiles_and_is_used(tmp_path):
    """The full compile (minutes on 2 loaded cores): the kernel is built, loaded, and reused at once."""
    build_dir = tmp_path / "logei"
    _kill_mid_compile(build_dir)
    status = FusedKernel(build_dir, timeout_s=900).ensure()
    assert status.path == "fused", status
    assert (build_dir / READY).exists() and not (build_dir / "lock").exists()
    t0 = time.monotonic()
    again = FusedKernel(build_dir, timeout_s=900).ensure()
    assert again.path == "fused" and time.monotonic() - t0 < 30
    from botorch.acquisition.multi_objective import logei

    assert logei._C is not None
