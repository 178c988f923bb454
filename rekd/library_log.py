"""What the libraries say (Ray, Tune, MLflow, Optuna, alembic, Python warnings) goes to a log file in the
results folder, not the console: a user reads rekd's own progress, summary and next steps there, and the
libraries' notices (token authentication on, tables created, a study created, Tune's own result folder)
contradict or bury them. Errors still reach the console; `--verbose` keeps everything there as well.

Each of these libraries logs through its own top logger with its own stderr handler (propagation off), set up
when it is imported: `LibraryLog.apply()` runs after those imports, lowers those handlers to errors and adds
one that keeps the records until the results folder exists, then writes them to its log file.
"""
from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from typing import Optional

LIBRARIES = ("ray", "mlflow", "optuna", "alembic", "py.warnings")
LOG_FILE = "driver.log"
FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
HELD_MAX = 10_000  # records kept before the file is known; more would be a runaway loop, not chatter


class LibraryLog(logging.Handler):
    def __init__(self, verbose: bool):
        super().__init__(logging.DEBUG)
        self.verbose = verbose
        self.held: list[logging.LogRecord] = []
        self.file: Optional[logging.FileHandler] = None
        self.levels: dict[logging.Handler, int] = {}  # the console handlers' own levels, put back by close()

    def apply(self) -> "LibraryLog":
        """Route the libraries' loggers here (idempotent: call again after anything that may reconfigure them)."""
        for module in ("mlflow", "optuna", "ray"):  # each sets up its logger on import: route it after that
            importlib.import_module(module)
        logging.captureWarnings(True)
        for name in LIBRARIES:
            logger = logging.getLogger(name)
            if name == "py.warnings" and not logger.handlers:  # else Python's last-resort handler prints them
                logger.addHandler(logging.StreamHandler(sys.stderr))
            for handler in logger.handlers:
                if handler is not self and not self.verbose:
                    self.levels.setdefault(handler, handler.level)
                    handler.setLevel(max(handler.level, logging.ERROR))
            if self not in logger.handlers:
                logger.addHandler(self)
        return self

    def write_to(self, folder: Path) -> Path:
        """From now on records go to `folder/driver.log` (appended: a resumed search adds to it)."""
        path = Path(folder) / LOG_FILE
        self.acquire()
        try:
            if self.file is None:
                self.file = logging.FileHandler(path, encoding="utf-8")
                self.file.setFormatter(FORMAT)
                for record in self.held:
                    self.file.emit(record)
                self.held.clear()
        finally:
            self.release()
        return path

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is not None:
            self.file.emit(record)
        elif len(self.held) < HELD_MAX:
            self.held.append(record)

    def close(self) -> None:
        """Stop routing: the libraries' loggers get their console handlers back as they were."""
        for name in LIBRARIES:
            logger = logging.getLogger(name)
            if self in logger.handlers:
                logger.removeHandler(self)
        for handler, level in self.levels.items():
            handler.setLevel(level)
        self.levels.clear()
        logging.captureWarnings(False)
        if self.file is not None:
            self.file.close()
            self.file = None
        super().close()
