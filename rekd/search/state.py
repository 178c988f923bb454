"""A search's folder, `<local-path>/<name>`: who owns it, what it records, and whether it can be resumed.

One driver at a time writes a search. A new search creates its folder with one atomic `mkdir` (so of two
searches started at once under one name exactly one gets it); a driver then holds the folder's lock
file for its whole life, so a second `--resume` of the same name is refused while the first runs. The
kernel drops the lock when the driver dies, however it dies.

Everything `--resume` needs is checked here before Tune starts: Tune retries a broken restore forever
(a missing Optuna study makes its restore fail, and it restarts the experiment in a loop).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from rekd.errors import UsageError
from rekd.locks import FileLock, Held, holder_of
from rekd.tracking.runs import first_line

STATE_FILE = "rekd-search.json"
STATE_FORMAT = 2  # 2: the searcher and tracker of rekd.search and rekd.tracking (the package layout)
LOCK_FILE = ".rekd-driver.lock"
CLAIM_WAIT_S = 2.0  # a refused second search probes the driver lock for an instant (name_taken): wait that out
OPTUNA_FILE = "optuna.db"
DEFAULT_STORE = "default"  # the state file's tracking URI when the search used <local-path>/mlflow.db


def default_store_uri(storage_path: Path) -> str:
    """The MLflow store of a search given no other: beside its results."""
    return f"sqlite:///{Path(storage_path).resolve() / 'mlflow.db'}"


def claim_new(folder: Path) -> Optional[FileLock]:
    """Create the folder of a new search and lock it; None if it exists (another search has the name)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir()
    except FileExistsError:
        return None
    return FileLock(folder / LOCK_FILE).acquire(timeout=CLAIM_WAIT_S)


def name_taken(folder: Path) -> UsageError:
    holder = holder_of(folder / LOCK_FILE)
    if holder:
        return UsageError(f"--name {folder.name!r}: a search of that name is being run by {holder}; "
                          f"choose another name, or wait for it to end and continue it with --resume {folder.name}")
    return UsageError(f"--name {folder.name!r}: {folder} already exists (another search has this name); "
                      f"choose another name or continue it with --resume {folder.name}")


def claim_existing(folder: Path) -> FileLock:
    """Lock the folder of a search to resume it; refused while another driver holds it."""
    try:
        return FileLock(folder / LOCK_FILE).acquire(timeout=CLAIM_WAIT_S)
    except Held as e:
        raise UsageError(f"search {folder.name!r} is being run by {e.holder}; wait for it to end "
                         f"(or stop that process) before resuming it") from None


def release_new(folder: Path, lock: FileLock) -> None:
    """Undo claim_new when the search stops before it recorded anything."""
    lock.release()
    shutil.rmtree(folder, ignore_errors=True)


def write_state(folder: Path, argv: list[str], parent_run_id: str, experiment_id: str, tracking_uri: str,
                default_store: bool) -> None:
    """What --resume needs. Paths are not stored: the folder may have moved, and the store with it."""
    folder.mkdir(parents=True, exist_ok=True)  # claimed already by the command line; not by callers of run_search
    (folder / STATE_FILE).write_text(json.dumps(
        {"format": STATE_FORMAT, "argv": argv, "parent_run_id": parent_run_id, "experiment_id": experiment_id,
         "tracking_uri": DEFAULT_STORE if default_store else tracking_uri}, indent=2))


def read_state(folder: Path, name: str) -> dict:
    path = folder / STATE_FILE
    if not path.is_file():
        raise UsageError(f"--resume {name}: no search state at {path}; allowed: a search name in {folder.parent}")
    try:
        state = json.loads(path.read_text())
        if not (isinstance(state, dict) and isinstance(state.get("argv"), list)
                and all(isinstance(state.get(k), str) for k in ("parent_run_id", "experiment_id", "tracking_uri"))):
            raise ValueError("expected argv, parent_run_id, experiment_id and tracking_uri")
    except (OSError, ValueError) as e:
        raise UsageError(f"--resume {name}: {path} is corrupt ({str(e).splitlines()[0][:120]}); "
                         "the search cannot be resumed") from None
    if state.get("format") != STATE_FORMAT:
        # Tune keeps the searcher and the MLflow callback pickled under their module paths, which moved in
        # format 2 (rekd.search, rekd.tracking): an older search's Tune state cannot be read back.
        raise UsageError(f"--resume {name}: the search was started by an earlier rekd (search state format "
                         f"{state.get('format', 1)}; this rekd reads {STATE_FORMAT}): the search cannot be resumed; "
                         "start it again (what it recorded stays in MLflow and its folder)")
    return state


def check_resumable(folder: Path, tune_folder: str, name: str) -> None:
    """The Optuna study (in the search's folder) and Tune's experiment state (in `tune_folder`, the same folder
    or under a storage URI) are there and readable; else one line, before Tune."""
    from ray import tune

    from rekd.search import trial_storage

    optuna_db = folder / OPTUNA_FILE
    if not optuna_db.is_file():
        raise UsageError(f"--resume {name}: its Optuna study {optuna_db} is missing; the search cannot be resumed "
                         "(its trials are in MLflow; start a new search)")
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(f"sqlite:///{optuna_db}")
        try:
            with engine.connect() as connection:  # read-only look: opening it as an Optuna storage would migrate it
                names = {row[0] for row in connection.execute(sqlalchemy.text("SELECT study_name FROM studies"))}
        finally:
            engine.dispose()
        if name not in names:
            raise ValueError(f"it holds no study named {name!r}")
    except Exception as e:
        raise UsageError(f"--resume {name}: its Optuna study {optuna_db} is unreadable "
                         f"({first_line(e)}); the search cannot be resumed") from None
    try:
        fs, path = trial_storage.filesystem(tune_folder)
        states = trial_storage.names(fs, path, "experiment_state-*.json")
        restorable = bool(states) and tune.Tuner.can_restore(tune_folder)  # can_restore looks for tuner.pkl only
    except OSError as e:
        raise UsageError(f"--resume {name}: Tune's experiment state in {tune_folder} cannot be read "
                         f"({first_line(e)}); the search cannot be resumed") from None
    if not restorable:
        raise UsageError(f"--resume {name}: Tune's experiment state is missing from {tune_folder}; "
                         "the search cannot be resumed")
    for state in states:
        try:
            json.loads(trial_storage.read_text(fs, f"{path}/{state}") or "")
        except (OSError, ValueError) as e:
            raise UsageError(f"--resume {name}: Tune's experiment state {tune_folder}/{state} is corrupt "
                             f"({first_line(e)}); the search cannot be resumed") from None


def check_parent_run(client, state: dict, name: str, tracking_uri: str) -> Optional[str]:
    """The search's MLflow parent run is in this store and not finished; returns its status."""
    try:
        run = client.get_run(state["parent_run_id"])
    except Exception:
        raise UsageError(f"--resume {name}: its MLflow parent run {state['parent_run_id']} is not in {tracking_uri}; "
                         "pass the --tracking-uri the search was tracked in") from None
    if run.info.status == "FINISHED":
        raise UsageError(f"--resume {name}: the search has finished (MLflow parent run {run.info.run_id}); "
                         "nothing is left to resume")
    return run.info.status
