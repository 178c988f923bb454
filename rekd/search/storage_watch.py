"""A Tune callback that ends a search whose results folder can no longer be written.

When the folder becomes unwritable mid-search (permissions changed, a read-only remount, a full disk),
Tune logs its failed experiment snapshots and goes on, trials fail one by one writing their checkpoints,
and the search would end much later with nothing saved. Here the driver tries a small write into the
folder every few seconds and stops the search at the first refusal, with the OSError that says why
(rekd.search.driver turns it into one line and closes the runs).
"""
from __future__ import annotations

import errno
import os
import sqlite3
import time
from pathlib import Path

from ray.tune import Callback

STORAGE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}
SQLITE_STORAGE_ERRORS = ("readonly database", "unable to open database file", "disk is full", "disk I/O error")
EVERY_S = 2.0


class ResultsUnwritable(RuntimeError):
    """The results folder refused a write; `__cause__` is the OSError."""


class StorageWatch(Callback):
    """Probes the experiment folder, found from the trials' folders (so a resumed search, whose callbacks
    Tune unpickles with the paths of where it started, probes where it is now)."""

    def __init__(self):
        self._last = 0.0

    def on_step(self, iteration: int, trials: list, **info) -> None:
        if not trials or time.monotonic() - self._last < EVERY_S:
            return
        self._last = time.monotonic()
        folder = Path(trials[0].path).parent
        if not folder.is_dir():  # remote storage (s3://...): not this machine's to probe
            return
        probe = folder / f".rekd-write-probe-{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            if e.errno in STORAGE_ERRNOS:
                raise ResultsUnwritable(f"{folder} cannot be written: {e.strerror}") from e
            raise


def storage_error(error: BaseException) -> str | None:
    """What made the results unwritable, in a few words, if that is what `error` (or its cause) is: an
    OSError of writing, or SQLite's word for it (the Optuna study lives in the results folder)."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in STORAGE_ERRNOS:
            return f"{seen.strerror} ({seen.filename})" if seen.filename else (seen.strerror or str(seen))
        if isinstance(seen, sqlite3.OperationalError) and any(m in str(seen) for m in SQLITE_STORAGE_ERRORS):
            return f"{seen} (the Optuna study)"
        seen = seen.__cause__ or seen.__context__
    return None
