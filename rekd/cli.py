"""What every entry point shares: an argument parser whose errors are one line, and the edge where
UsageError becomes that one line and exit status 2."""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import threading
from typing import Callable, NoReturn, Optional, Sequence

from rekd.errors import EXIT_USAGE, Interrupted, UsageError


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse would print the whole usage block first; one line says what is wrong and `-h` the rest.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


_received: list[int] = []  # the signals rekd's handler got: Ray may re-raise its Interrupted as KeyboardInterrupt


def _interrupt(signum: int, frame) -> None:
    """Ctrl-C, and SIGTERM (`kill`, `ray job stop`, a batch scheduler's end of time) raised alike: a command
    closes what it recorded instead of dying with its runs left RUNNING."""
    _received.append(signum)
    raise Interrupted


def run(main: Callable[[Optional[Sequence[str]]], int], prog: str, argv: Optional[Sequence[str]] = None) -> int:
    """Call an entry point; a UsageError is printed as one line and gives exit status 2. Ctrl-C and SIGTERM
    end it through KeyboardInterrupt (rekd.errors.Interrupted), with a shell's status for the signal (130,
    143)."""
    signals = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    _received.clear()
    previous = {signum: signal.signal(signum, _interrupt) for signum in signals}
    try:
        return main(argv)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        signum = signal.Signals(_received[0]) if _received else signal.SIGINT
        print(f"{prog}: interrupted ({signum.name})", file=sys.stderr)
        return 128 + signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def format_metrics(metrics: dict, keys: Sequence[str]) -> str:
    """`name=value` pairs of the given keys that are present, numbers to 4 significant digits."""
    parts = []
    for key in keys:
        if key in metrics:
            value = metrics[key]
            parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


def python_command() -> str:
    """How to name this interpreter in a command printed for the user to run next, so that it works as
    printed, from any folder: `python` only where that is this very interpreter (a venv's python links to a
    base one without rekd's dependencies), else its absolute path."""
    if shutil.which("python") == sys.executable:
        return "python"
    return os.path.abspath(sys.executable)  # not resolved: a venv's python is a link to the base one
