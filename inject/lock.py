"""Folder locks: one writer at a time for a build's output, a run folder, a results folder.

An advisory `flock` on a small lock file that names its holders (pid, host, command, one line each). The
kernel drops the lock when the last process holding the file open ends, however it ends, so a killed
holder leaves nothing to clean up: the next process simply gets the lock. Processes that should share
the work (the tasks of a SLURM build array, the launchers of a multi-node run) take it `shared`; one
exclusive holder excludes everyone else. A second process is refused at once, with the holders named.

A holder may hand its lock file to child processes (`pass_fds`): the lock then lasts until the last of
them ends. When every recorded holder is dead but the lock is still held, those children are still
exiting (a killed launcher's trainer): we wait for them a little before refusing. Children that should
not outlive their parent (trainers, tokenizer workers) call `die_with_parent`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import InjectError

CHILDREN_GRACE_SECONDS = 30.0
"""How long to wait for the lock when its recorded holders are all dead (their children still exit)."""


class FolderBusy(InjectError):
    """Another process holds the lock."""


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    command: str

    def alive(self) -> bool | None:
        """True/False on this host; None (unknown) for a process on another host."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def __str__(self) -> str:
        return f"pid {self.pid} on host {self.host} ({self.command})"


@contextmanager
def folder_lock(lock_file: Path, what: str, shared: bool = False,
                grace: float = CHILDREN_GRACE_SECONDS) -> Iterator[int | None]:
    """Hold the lock on `lock_file` for the `with` block; yields its file descriptor (None where the file
    system has no locks: a warning is printed and the work proceeds unlocked). Raises FolderBusy naming
    the holders when another process holds it. `what` names the thing locked, for messages."""
    fd = _acquire(Path(lock_file), what, shared, grace)
    try:
        yield fd
    finally:
        if fd is not None:
            _release(Path(lock_file), fd)


def _acquire(path: Path, what: str, shared: bool, grace: float) -> int | None:
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise InjectError(f"{path}: cannot create the lock file of {what} ({e.strerror})") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holders = _read_holders(fd)
            current = _same_inode(fd, path)
            os.close(fd)
            if not current:
                continue  # its holder released and removed it meanwhile: try again
            if holders and all(h.alive() is False for h in holders):
                # The recorded processes are gone; what holds the lock are children they handed it to, which
                # are exiting (killed with their parent). Wait for them, briefly.
                if deadline is None:
                    deadline = time.monotonic() + grace
                    print(f"olmo-inject: waiting for the processes of {holders[0]} (ended) to release {what}",
                          file=sys.stderr)
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                raise FolderBusy(f"{what} is still locked {grace:g} s after its holder {_names(holders)} ended: "
                                 f"processes it started hold the lock (`fuser -v {path}` lists them); "
                                 f"stop them, then rerun") from None
            raise FolderBusy(f"{what} is in use by {_names(holders)} (lock file {path}); wait for it to "
                             f"finish or stop it, then rerun") from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                print(f"olmo-inject: warning: the file system of {path} has no file locks ({e.strerror}); "
                      f"{what} is not protected against a second process", file=sys.stderr)
                return None
            raise
        if _same_inode(fd, path):
            break
        os.close(fd)  # a releasing holder removed the file after we opened it: lock the new one
    _record_holder(fd, path, shared)
    return fd


def _release(path: Path, fd: int) -> None:
    """Unlock; the last holder removes the lock file (after locking it exclusively: nobody else holds it)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _same_inode(fd, path):
            path.unlink()
    except OSError:
        pass  # other shared holders remain (they remove it), or it is gone already
    finally:
        os.close(fd)


def _same_inode(fd: int, path: Path) -> bool:
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)


def _record_holder(fd: int, path: Path, shared: bool) -> None:
    line = f"{os.getpid()}\t{socket.gethostname()}\t{_command()}\n".encode()
    if shared:
        with open(path, "ab") as f:  # several shared holders: one line each (appends of one line are atomic)
            f.write(line)
    else:
        os.ftruncate(fd, 0)
        os.pwrite(fd, line, 0)


def _read_holders(fd: int) -> list[Holder]:
    try:
        text = os.pread(fd, 1 << 16, 0).decode(errors="replace")
    except OSError:
        return []
    holders = []
    for line in text.splitlines():
        pid, _, rest = line.partition("\t")
        host, _, command = rest.partition("\t")
        if pid.isdigit():
            holders.append(Holder(int(pid), host, command))
    live = [h for h in holders if h.alive() is not False]
    return live or holders  # SIGKILLed shared holders leave lines behind; name the live ones


def _names(holders: list[Holder]) -> str:
    if not holders:
        return "another process (it has not written its name yet)"
    more = f" and {len(holders) - 1} more" if len(holders) > 1 else ""
    return f"{holders[0]}{more}"


def _command() -> str:
    args = [Path(sys.argv[0]).name, *sys.argv[1:3]] if sys.argv and sys.argv[0] else ["python"]
    return " ".join(args)[:120].replace("\t", " ").replace("\n", " ")


def die_with_parent(parent: int | None = None) -> None:
    """Have Linux SIGKILL this process when its parent ends (prctl PR_SET_PDEATHSIG), so that a worker never
    outlives the process that a user or SLURM killed; exit at once if `parent` (default: the current parent)
    is already gone. One system call: safe in a `preexec_fn`."""
    parent = os.getppid() if parent is None else parent
    if _LIBC is not None:
        _LIBC.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(0)


def _load_libc():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True)  # loaded here, not after a fork (dlopen there may deadlock)


_LIBC = _load_libc()
