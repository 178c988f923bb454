"""`python -m rekd.ui [STORE]`: the MLflow UI over a results folder, on 127.0.0.1, stopped cleanly.

    python -m rekd.ui                                   # ./rekd-results/mlflow.db on http://127.0.0.1:5000
    python -m rekd.ui /abs/rekd-results --experiment rekd-sparse_kd --port 5001

It runs `python -m mlflow server` from this interpreter (so it works where `mlflow` is not on PATH) in a
session of its own, prints a link per rekd experiment and waits. Ctrl-C or SIGTERM stops the server's
whole process group and waits until none of it is left: a stop that reaches only the `mlflow` command
(kill -9, or a signal before it forwards them) leaves its uvicorn process listening. Either signal is the
normal way to end the UI, not an interruption of unfinished work, so it exits 0 (a service manager's
SIGTERM is a clean stop too); a server that dies by itself gives 1.

Also `ui_hint()`: the lines a command prints at its end to say how to open its runs.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import urlencode

from rekd.cli import Parser, run
from rekd.errors import UsageError
from rekd.service import http_ok, port_free, wait_for
from rekd.tracking.links import DEFAULT_PORT, HOST, TRAINING_VIEW, experiment_url
from rekd.tracking.store import STORE_FILE, check_tracking_uri, hold, sqlite_path
from rekd.tracking.tags import ROLE_TAG  # names only: MLflow is not loaded

PROG = "python -m rekd.ui"
DEFAULT_FOLDER = "rekd-results"
ALLOWED_STORES = f"a results folder holding {STORE_FILE}, or sqlite:////ABSOLUTE/PATH/mlflow.db"
STOP_TIMEOUT_S = 15.0  # past this the server's group gets SIGKILL


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Serve the MLflow UI over a rekd results folder on 127.0.0.1 until Ctrl-C.")
    p.add_argument("store", nargs="?", default=DEFAULT_FOLDER,
                   help=f"{ALLOWED_STORES} (default ./{DEFAULT_FOLDER})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port on {HOST} (default {DEFAULT_PORT})")
    p.add_argument("--experiment", metavar="NAME", help="print the link of this experiment only")
    p.add_argument("--timeout", type=float, default=120, help="seconds to wait for the server to answer")
    return p


@dataclass(frozen=True)
class Experiment:
    experiment_id: str
    name: str
    active: bool
    has_rekd_runs: bool


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(_main, PROG, argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is not allowed; allowed: 1 to 65535")
    db = store_file(args.store)
    experiments = read_experiments(db)
    shown = [chosen(experiments, args.experiment, db)] if args.experiment else \
        [e for e in experiments if e.active and e.has_rekd_runs]
    if not port_free(args.port):
        raise UsageError(f"--port {args.port} is in use on {HOST}; choose another port")
    return serve(db, args.port, args.timeout, shown)


# -- the store, read before anything starts ----------------------------------------------------------------
def store_file(spec: str) -> Path:
    """The SQLite file STORE names; it must exist, as MLflow would create an empty store for a typo."""
    if spec.startswith("sqlite:") or "://" in spec:
        db = sqlite_path(check_tracking_uri(spec, "STORE"))
        if db is None:
            raise UsageError(f"STORE {spec!r} is a tracking server, which serves its own UI: open it in a browser; "
                             f"allowed: {ALLOWED_STORES}")
    else:
        path = Path(spec).expanduser().resolve()
        if not path.exists():
            raise UsageError(f"STORE {spec!r}: {path} does not exist (a search creates it); allowed: {ALLOWED_STORES}")
        db = path / STORE_FILE if path.is_dir() else path
        check_tracking_uri(f"sqlite:///{db}", "STORE")  # the server writes beside it: SQLite's journal
    if not db.is_file():
        raise UsageError(f"no MLflow store at {db} (a search writes one there); allowed: {ALLOWED_STORES}")
    return db


def read_experiments(db: Path) -> list[Experiment]:
    """The store's experiments, read with SQLite in read-only mode: nothing is created or migrated."""
    query = ("SELECT e.experiment_id, e.name, e.lifecycle_stage, EXISTS (SELECT 1 FROM runs r JOIN tags t "
             "ON t.run_uuid = r.run_uuid WHERE r.experiment_id = e.experiment_id AND r.lifecycle_stage = 'active' "
             "AND t.key = ?) FROM experiments e ORDER BY e.experiment_id")
    try:
        with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=10)) as connection:
            rows = connection.execute(query, (ROLE_TAG,)).fetchall()
    except sqlite3.Error as e:  # not SQLite, or SQLite without MLflow's tables
        raise UsageError(f"{db} is not an MLflow store ({e}); allowed: {ALLOWED_STORES}") from None
    return [Experiment(str(id_), name, stage == "active", bool(rekd)) for id_, name, stage, rekd in rows]


def chosen(experiments: list[Experiment], name: str, db: Path) -> Experiment:
    for experiment in experiments:
        if experiment.name == name:
            if not experiment.active:
                raise UsageError(f"experiment {name!r} in {db} is deleted; restore it or choose another")
            return experiment
    names = ", ".join(e.name for e in experiments if e.active) or "none"
    raise UsageError(f"unknown experiment {name!r} in {db}; allowed: {names}")


# -- the server ---------------------------------------------------------------------------------------------
class Stop(BaseException):
    """SIGINT or SIGTERM arrived: how a user ends the UI. A BaseException, so no `except Exception` eats it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def raise_stop(signum: int, frame) -> None:
    ignore_stops()  # a second Ctrl-C must not cut the clean-up short
    raise Stop(signum)


def ignore_stops() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def serve(db: Path, port: int, timeout: float, shown: list[Experiment]) -> int:
    """Start the server, print the links, wait for Ctrl-C or SIGTERM; 0 when stopped that way."""
    base = f"http://{HOST}:{port}"
    log_path = db.parent / f"mlflow-ui-{port}.log"
    # Before the start, so that a stop at any moment still ends the group.
    previous = {signum: signal.signal(signum, raise_stop) for signum in STOP_SIGNALS}
    server, stopped_by = None, None
    try:
        # MLflow migrates an old store's schema as it starts: under rekd's lock, as any other opener.
        with hold(Path(f"{db}.lock"), db):
            with open(log_path, "wb") as log:
                server = subprocess.Popen(server_command(db, port), stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, env=server_env(), cwd=db.parent,
                                          start_new_session=True)
            # An API that reads the store, not /health: ready means the UI can show the runs.
            wait_for(lambda: http_ok(f"{base}/ajax-api/2.0/mlflow/experiments/search?max_results=1"),
                     "the MLflow server", log_path, timeout, server)
        print(f"MLflow UI of {db} on {base} (server log {log_path})")
        for experiment in shown:
            print(f"  {experiment.name}: {experiment_url(base, experiment.experiment_id)}")
        if not shown:
            print(f"  no rekd runs in this store yet: {base}/#/experiments?{urlencode(TRAINING_VIEW)}")
        print("Ctrl-C stops it.", flush=True)
        status = server.wait()
    except Stop as stop:
        stopped_by = str(stop)
        print(f"{stopped_by}: stopping the MLflow server", flush=True)
    finally:
        end_group(server)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if stopped_by:
        print("stopped: no process of it is left", flush=True)
        return 0
    print(f"{PROG}: error: the MLflow server exited with status {status}; see {log_path}", file=sys.stderr)
    return 1


def server_command(db: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port),
            "--workers", "1",  # one user: a second worker would only double the memory
            "--backend-store-uri", f"sqlite:///{db}",
            # A run whose artifact URI is a local path (file:///...) is listed and fetched by the server from
            # that path with or without --serve-artifacts. --serve-artifacts (MLflow's default) would add an
            # upload API writing into ./mlartifacts of the current folder: off.
            "--no-serve-artifacts",
            # Experiments created in the UI keep their artifacts beside the store, not in ./mlruns.
            "--default-artifact-root", (db.parent / "artifacts").as_uri(),
            # Host headers other than these are refused: no DNS rebinding from a browser (MLflow's default
            # would also take private-network addresses).
            "--allowed-hosts", f"{HOST}:{port},localhost:{port},{HOST},localhost"]


def server_env() -> dict[str, str]:
    # MLflow's job runner (huey workers and a folder in /dev/shm) serves GenAI jobs rekd never submits.
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def end_group(server: Optional[subprocess.Popen]) -> None:
    """SIGTERM to the server's process group, then wait until none of it is left; SIGKILL past STOP_TIMEOUT_S."""
    if server is None:
        return
    ignore_stops()
    group = server.pid  # start_new_session: the server leads a group of its own
    kill_group(group, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while server.poll() is None or group_members(group):
        if time.monotonic() > deadline:
            kill_group(group, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.1)


def kill_group(group: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signum)


def group_members(group: int) -> list[int]:
    """Live processes of process group `group` (zombies excluded: they hold no port and wait for a reaper)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                state, _ppid, pgrp = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            except (OSError, ValueError):
                continue
            if int(pgrp) == group and state != "Z":
                members.append(int(entry.name))
    return members


# -- links ----------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    sys.exit(main())
