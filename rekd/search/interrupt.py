"""SIGINT and SIGTERM to a search's driver: stop cleanly once, abort on the second.

Ray Tune ends a run cleanly on SIGINT by itself, but then returns from `Tuner.fit()` as if the search had
finished, and SIGTERM (what `ray job stop`, Kubernetes and Slurm send) hits Ray's own handler, which
exits at once. Here both signals are the driver's: the first asks Tune to stop through SIGUSR1, Tune's
documented equivalent of Ctrl-C (it saves the experiment state and stops the trials at their last
per-epoch checkpoint) and remembers that the search was interrupted; the second raises
KeyboardInterrupt, so the driver closes its records and exits within seconds.
"""
from __future__ import annotations

import signal
import sys
from typing import Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interruption:
    def __init__(self, prog: str):
        self.prog = prog
        self.signum: Optional[int] = None  # the first signal received
        self.tune_running = False  # whether Tune's loop is there to stop cleanly
        self.aborted = False  # a signal raised KeyboardInterrupt
        self._previous: dict = {}

    def __enter__(self) -> "Interruption":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

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
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{self.prog}: {self.name} received: stopping the trials at their last checkpoint "
              "(again to abort now)", file=sys.stderr, flush=True)
        signal.raise_signal(signal.SIGUSR1)
