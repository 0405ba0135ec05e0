"""Who may work in a run or study directory, and how long its ranks live.

A directory is owned by the one process that holds `DIR/.lock`: an flock(2) lock held for the life of the
process and released by the kernel when it ends, however it ends (SIGKILL included), so a lock left by a dead
process never blocks. The file holds the owner's pid, host and start time only so that a refused process can
name it. A rank dies with the process that started it (prctl PR_SET_PDEATHSIG): killing the launcher, or the
study that runs it, ends its ranks too, even though torchrun starts each rank in a session of its own.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import select
import signal
import threading
import time
from pathlib import Path

from distcnn.errors import UsageError
from distcnn.record import host_name
from distcnn.units import human_bytes

LOCK_FILE = ".lock"
PARENT_ENV = "DISTCNN_PARENT_PID"  # the pid a rank (or a node agent) must die with
PR_SET_PDEATHSIG = 1


def filesystem_problem(error: OSError, what: str) -> UsageError:
    """An OSError about a path as one line: what could not be done, where, and why."""
    where = error.filename if error.filename is not None else ""
    reasons = {errno.EROFS: "the file system is read-only", errno.ENOSPC: "no space left on the device",
               errno.EACCES: "permission denied", errno.EPERM: "not permitted",
               errno.ENOTDIR: "a part of the path is a file, not a folder",
               errno.EDQUOT: "the disk quota is exceeded"}
    reason = reasons.get(error.errno, error.strerror or str(error))
    needed = getattr(error, "needed", None)  # record.NoSpace: what the file needed, and what was free
    if needed is not None:
        free = getattr(error, "free", None)
        reason += f" (it needs {human_bytes(needed)}" + (f", {human_bytes(free)} free" if free is not None else "") + ")"
    return UsageError(f"{what} {where}: {reason}" if where else f"{what}: {reason}")


class DirectoryLock:
    """The exclusive right to work in `directory` (`what` names it in messages: 'run', 'study')."""

    def __init__(self, directory: str | Path, what: str, name: str = LOCK_FILE):
        self.directory, self.what, self.path = Path(directory), what, Path(directory) / name
        self.fd: int | None = None

    def acquire(self) -> DirectoryLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise filesystem_problem(error, f"cannot work in {self.what} directory") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise UsageError(f"{self.what} directory {self.directory} is in use by {holder}; wait for it to end "
                             f"or stop it (a second process never works in the same {self.what})") from None
        except OSError as error:  # a file system without locks
            os.close(fd)
            raise filesystem_problem(error, f"cannot lock {self.what} directory") from None
        try:
            owner = {"pid": os.getpid(), "host": host_name(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(owner).encode(), 0)
        except OSError:
            pass  # the lock holds without the note (a full disk): only the name of the holder is lost
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the lock
            self.fd = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {owner['pid']} on host {owner['host']} (since {owner['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its pid yet)"


def lock_name(nnodes: int, cluster: str, node_rank: int | None) -> str:
    """The machines of a multi-node job may share one run directory: each locks its own part of it (by node
    rank, or by host name under c10d), and a second launcher for the same machine is refused."""
    if nnodes == 1 or cluster == "emulated":
        return LOCK_FILE
    return f"{LOCK_FILE}-node{node_rank}" if node_rank is not None else f"{LOCK_FILE}-{host_name()}"


def mark_parent() -> None:
    """Processes started from here (torchrun's ranks, node agents) must die with this process."""
    os.environ[PARENT_ENV] = str(os.getpid())


def die_with(pid: int) -> None:
    """End this process when process `pid` (not its parent: a fork server started it) ends, for any reason:
    a thread waits on the process's pidfd, which the kernel makes readable when it exits."""
    try:
        pidfd = os.pidfd_open(pid)
    except (OSError, AttributeError):  # gone already, or not Linux
        if not _alive(pid):
            os._exit(128 + signal.SIGKILL)
        return

    def watch() -> None:
        select.select([pidfd], [], [])
        os._exit(128 + signal.SIGKILL)

    threading.Thread(target=watch, name=f"die-with-{pid}", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when the process that started it ends; if that already happened
    (before the request took effect), end now rather than run on as an orphan."""
    expected = os.environ.get(PARENT_ENV)
    if expected is None:  # started by the user's own torchrun: its lifetime is theirs
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != int(expected):
        os._exit(128 + signal.SIGKILL)
