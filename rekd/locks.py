"""File locks that name their holder: one driver per search, one creator per MLflow store.

They are `flock` locks on a file: the kernel releases them when the holder's process ends in any way
(SIGKILL included), so a dead driver never leaves a stale lock behind. While held, the file says who
holds it (PID, host, command), which is what a refused second process tells its user.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional


class Held(Exception):
    """The lock is held by another process; `holder` describes it."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is held by {holder}")
        self.path, self.holder = path, holder


class FileLock:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: Optional[int] = None

    def acquire(self, timeout: float = 0.0) -> "FileLock":
        """Take the lock, waiting up to `timeout` seconds; raises Held with the holder if it stays taken."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise Held(self.path, describe_holder(self.path)) from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "command": " ".join(sys.argv)[:300], "since": time.time()}).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # a reader after this sees no holder
        except OSError:  # the folder may have become unwritable: the lock still goes with the fd
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "FileLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def holder_of(path: Path) -> Optional[str]:
    """Who holds the lock at `path` now (as describe_holder says it), or None if nobody does.

    It probes with a shared lock held for an instant, so it never writes the file; a process taking the
    lock at that instant waits it out (FileLock.acquire with a timeout)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return describe_holder(Path(path))
    finally:
        os.close(fd)  # closing releases the probe's shared lock
    return None


def describe_holder(path: Path) -> str:
    """`PID 123 on host h`, read from the lock file; the holder writes it just after locking."""
    for _ in range(20):
        try:
            info = json.loads(path.read_text() or "null")
        except (OSError, ValueError):
            info = None
        if info:
            return f"PID {info.get('pid')} on host {info.get('host')}"
        time.sleep(0.05)
    return "another process (it has not written its PID yet)"
