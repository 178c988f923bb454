"""SIGINT and SIGTERM to a search's driver: stop cleanly once, abort on the second.

Ray Tune ends a run cleanly on SIGINT by itself, but then returns from `Tuner.fit()` as if the search had
finished, and SIGTERM (what `ray job stop`, Kubernetes and Slurm send) hits Ray's own handler, which
exits at once. Here both signals are the driver's: the first asks Tune to stop through SIGUSR1, Tune's
documented equivalent of Ctrl-C (it saves the experiment state and stops the trials at their last
per-epoch checkpoint) and remembers that the search was interrupted; the second raises
KeyboardInterrupt, so the driver closes its records and exits within seconds.

A KeyboardInterrupt must not land inside a write to a store the driver closes afterwards: a SQLite
statement cut short keeps its lock for as long as the interrupted frames live (the exception's traceback
holds them), and closing the Optuna trials in the same file then fails as "database is locked", leaving
them RUNNING. So Optuna's calls run `deferred()` (a signal during one is raised when it returns), and
while the driver closes its records (`closing`) a further signal is only remembered.
"""
from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from typing import Iterator, Optional

from rekd.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interruption:
    def __init__(self, prog: str):
        self.prog = prog
        self.signum: Optional[int] = None  # the first signal received
        self.tune_running = False  # whether Tune's loop is there to stop cleanly
        self.aborted = False  # a signal raised (or would have raised) KeyboardInterrupt
        self.closing = False  # the driver is closing its records: a signal is remembered, never raised
        self._deferring = 0  # depth of deferred() blocks
        self._pending = False  # a KeyboardInterrupt for the end of the outermost deferred() block
        self._previous: dict = {}

    def __enter__(self) -> "Interruption":
        global _active
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        _active = self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        _active = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A signal that would raise Interrupted in the block raises it when the outermost block ends."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        if not self._deferring and self._pending and not self.closing:
            self._pending = False
            raise Interrupted

    @property
    def exit_status(self) -> int:
        """128 + the signal's number, as a shell reports a process ended by it: 130 SIGINT, 143 SIGTERM."""
        return 128 + (self.signum or signal.SIGINT)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGINT).name

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None or not self.tune_running or not callable(signal.getsignal(signal.SIGUSR1)):
            self.signum = self.signum or signum
            self.aborted = True  # KeyboardInterrupt may reach the driver wrapped (raised inside an import, say)
            if self.closing:
                return
            if self._deferring:
                self._pending = True
                return
            raise Interrupted
        self.signum = signum
        print(f"\n{self.prog}: {self.name} received: stopping the trials at their last checkpoint "
              "(again to abort now)", file=sys.stderr, flush=True)
        signal.raise_signal(signal.SIGUSR1)


_active: Optional[Interruption] = None  # the driver's, while its handlers are installed


@contextmanager
def deferred() -> Iterator[None]:
    """Run a store's write whole: a signal that would raise Interrupted inside the block raises it
    when the block ends (outside a driver's Interruption, nothing changes)."""
    if _active is None:
        yield
    else:
        with _active.deferred():
            yield
