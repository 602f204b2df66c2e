"""Running luna in a child process for fault tests: killed with SIGKILL at a chosen
moment or at a chosen file write, or without root's licence to write anywhere.

Children are forked, not started afresh: a new interpreter would spend seconds
importing torch before doing anything. A forked child must not use the parent's
OpenMP thread pool (it does not survive the fork and the child hangs), so it runs
torch on one thread. Each child leads its own process group, and a kill goes to the
whole group (the command and its worker processes), as a shell's kill of a job does.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

SKIP_STATUS = 77
"""Exit status of a child whose ``prepare`` found that it cannot set the test up."""


def run_forked(target: Callable[..., int | None], *args, log: Path, kill_after: float | None = None,
               prepare: Callable[[], None] | None = None, timeout: float = 600.0) -> int:
    """``target(*args)`` in a forked child; returns its exit status (-9 when it was killed).

    ``prepare()`` runs in the child first (to install a kill point, drop privileges).
    The child's stdout and stderr are appended to ``log``. ``kill_after``: seconds
    after which the parent kills the child's process group with SIGKILL if the child
    is still running.
    """
    pid = _fork(target, args, log, prepare)
    started = time.monotonic()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        elapsed = time.monotonic() - started
        if (kill_after is not None and elapsed >= kill_after) or elapsed >= timeout:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:  # not yet its own group leader
                os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            if kill_after is None or elapsed < kill_after:
                raise TimeoutError(f"child {pid} ran for more than {timeout} s; its output is in {log}")
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)


def _fork(target, args, log: Path, prepare) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    status = 1  # the child: never returns
    try:
        os.setpgid(0, 0)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)
        import torch

        torch.set_num_threads(1)
        if prepare is not None:
            prepare()
        status = int(target(*args) or 0)
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:
        traceback.print_exc()
        status = 1
    finally:
        try:
            sys.stdout.flush()
        finally:
            os._exit(status)


def kill_group() -> None:
    """SIGKILL this process and its process group (its worker processes)."""
    os.killpg(os.getpgid(0), signal.SIGKILL)


def kill_at_replace(name: str, occurrence: int, when: str) -> Callable[[], None]:
    """A ``prepare`` that makes the child SIGKILL itself at its ``occurrence``-th
    ``os.replace`` onto a file called ``name``, just ``"before"`` or ``"after"`` it.

    Every luna output and checkpoint is written to a temporary file that then
    replaces the target, so these are the moments where a kill can leave a
    temporary file (before) or one of two related files without the other (after).
    """
    assert when in ("before", "after")

    def prepare() -> None:
        real = os.replace
        seen = 0

        def replace(src, dst, *args, **kwargs):
            nonlocal seen
            if Path(dst).name != name:
                return real(src, dst, *args, **kwargs)
            seen += 1
            if seen == occurrence and when == "before":
                kill_group()
            real(src, dst, *args, **kwargs)
            if seen == occurrence and when == "after":
                kill_group()

        os.replace = replace

    return prepare


def without_root_file_access(probe_dir: Path) -> Callable[[], None]:
    """A ``prepare`` that makes permission bits apply to the child even as root.

    Root ignores them through two capabilities, CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH, which the child drops (Linux ``capset``). The child then
    checks that it can no longer write into ``probe_dir`` (a directory made
    read-only) and exits with `SKIP_STATUS` if it still can.
    """

    def prepare() -> None:
        if os.geteuid() == 0:
            _drop_capabilities(1, 2)
        try:
            (probe_dir / "probe").touch(exist_ok=False)
        except OSError:
            return
        os._exit(SKIP_STATUS)

    return prepare


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_capabilities(*caps: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3: two data words
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        os._exit(SKIP_STATUS)
    mask = 0xFFFFFFFF
    for cap in caps:
        mask &= ~(1 << cap)
    data[0].effective &= mask
    data[0].permitted &= mask
    data[0].inheritable &= mask
    if libc.capset(ctypes.byref(header), data) != 0:
        os._exit(SKIP_STATUS)


def leftovers(directory: Path) -> list[Path]:
    """Temporary files of interrupted writes under ``directory`` (luna.fileio's names, older ``.tmp``)."""
    return sorted(p for p in Path(directory).rglob(".*") if p.is_file() and (".partial" in p.name or p.name.endswith(".tmp")))
