"""Child processes die with their parent: no rank, layout child or checkpoint writer computes on, holds files or
GPU memory, or keeps the multiprocessing resource tracker alive after the command that started it was killed.

Linux's parent-death signal (`prctl(PR_SET_PDEATHSIG)`, set in the child, here through ctypes) is sent by the
kernel when the parent dies, whatever killed it (SIGKILL included). It is set:
- by our own children on start (`die_with_parent`): spawned ranks (`runtime.spawn`), the layout child;
- in every child this process forks (`install`: an at-fork hook), which covers megatron-core's checkpoint-writer
  processes and data-loader workers. PR_SET_PDEATHSIG is cleared by fork, hence the hook.
Each checks afterwards that its parent is still the one it expects: one that died before the request was
registered sends no signal. The resource tracker needs nothing: it exits when the last process holding its pipe
is gone. The signal fires when the thread that created the child exits, so children are started from threads that
live as long as they need them (the main thread, in every use here).
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_libc: ctypes.CDLL | None = None
_forker = 0  # the pid that is forking, read by the child
_installed = False
PARENT_ENV = "MEGATRON_SLIM_PARENT_PID"


def _load_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _prctl_pdeathsig(sig: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    if _load_libc().prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def die_with_parent(parent: int, sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when `parent` dies; if it already has, act on it now."""
    _prctl_pdeathsig(sig)
    if os.getppid() != parent:  # the parent died before the request: no signal will come
        os.kill(os.getpid(), sig)


def child_env(env: dict[str, str]) -> dict[str, str]:
    """`env` for a `megatron-slim` child command: it dies with this process (`adopt_parent`)."""
    return env | {PARENT_ENV: str(os.getpid())}


def adopt_parent() -> None:
    """In a `megatron-slim` command started with `child_env`: die with the process that started it."""
    parent = os.environ.pop(PARENT_ENV, None)
    if parent and parent.isdigit():
        die_with_parent(int(parent))


def _before_fork() -> None:
    global _forker
    _forker = os.getpid()


def _after_fork_in_child() -> None:
    die_with_parent(_forker, signal.SIGKILL)


def install() -> None:
    """Every child this process forks from now on gets SIGKILL when this process dies (idempotent)."""
    global _installed
    if _installed or not sys.platform.startswith("linux"):
        return
    _load_libc()  # now, not in a child after fork
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    _installed = True
