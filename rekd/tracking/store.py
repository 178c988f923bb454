"""Where a command's MLflow store is: checked at the edge, and opened by one creator at a time.

A tracking URI is checked before anything is written, so a typo costs one line and leaves nothing behind:
MLflow itself would make the folders of a SQLite path, keep an in-memory store that vanishes with the
process, or refuse `file:` stores with a 40-line traceback. Opening a SQLite store is serialized by a lock
file beside it: MLflow creates and migrates the schema the first time a client opens a store, and two
processes doing that at once break the store for good (alembic's "Online migration expected to match one
row", then "table _alembic_tmp_experiments already exists" on every later open).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence
from urllib.parse import urlsplit
from urllib.request import url2pathname

from rekd.errors import UsageError
from rekd.locks import FileLock, Held

if TYPE_CHECKING:  # importing MLflow takes seconds: the checks run without it
    from mlflow.tracking import MlflowClient

ALLOWED = "sqlite:////ABSOLUTE/PATH/mlflow.db, http(s)://HOST[:PORT], databricks or databricks://PROFILE"
ENV_VAR = "MLFLOW_TRACKING_URI"
SQLITE_PREFIX = "sqlite:///"
STORE_FILE = "mlflow.db"
# Every command run in a folder keeps its default store in ./rekd-results/mlflow.db: searches, their final
# runs and reproductions are all seen in one UI.
RESULTS_FOLDER = "rekd-results"
ARTIFACTS_FOLDER = "artifacts"  # beside the store: <folder>/artifacts/<experiment>/<run id>/...
# Creating a fresh store takes a few seconds; a longer wait is worth a word about who is in the way.
QUIET_WAIT_S = 2.0
# Beyond this the holder is stuck rather than busy: better to say so than to wait forever.
LOCK_WAIT_S = 300.0


def pick_tracking_uri(choices: Sequence[tuple[Optional[str], str]],
                      default: Optional[tuple[str, str]] = None) -> tuple[str, str]:
    """Which store a command uses, and where that came from: the first given of `choices` ((value, source),
    flags first), else $MLFLOW_TRACKING_URI, else `default`; with no default, one line that says how to
    name one. Every command picks its store by this one rule."""
    for uri, source in [*choices, (os.environ.get(ENV_VAR) or None, ENV_VAR)]:
        if uri is not None:
            return str(uri), source
    if default is None:
        raise UsageError(f"no tracking store: pass --tracking-uri URI or set {ENV_VAR}")
    return default


def resolve_tracking_uri(flag: Optional[str], default_folder: Path, flag_name: str = "--tracking-uri") -> str:
    """The flag, else $MLFLOW_TRACKING_URI, else a SQLite store in `default_folder` (the results folder the
    command creates itself); checked, so a bad value is one line before anything is written."""
    default_folder = Path(default_folder).expanduser().resolve()
    uri, source = pick_tracking_uri([(flag, flag_name)],
                                    (f"{SQLITE_PREFIX}{default_folder / STORE_FILE}", "the default tracking URI"))
    return check_tracking_uri(uri, source, creatable=default_folder)


def check_tracking_uri(uri: str, source: str, creatable: Optional[Path] = None) -> str:
    """`uri` if it is a store rekd can use, else a UsageError naming it, `source` and what is allowed.

    A SQLite file's folder must exist and be writable (SQLite writes its journal beside the file), unless it
    lies inside `creatable`, a folder the command makes itself. Nothing is created here."""
    if uri.startswith(("http://", "https://")):
        try:
            host = urlsplit(uri).hostname
        except ValueError:
            host = None
        if not host:
            raise refused(uri, source, "it is not a URL with a host")
        return uri
    if uri == "databricks" or (uri.startswith("databricks://") and len(uri) > len("databricks://")):
        return uri
    path = sqlite_path(uri)
    if path is None:
        raise refused(uri, source, unsupported_reason(uri))
    check_sqlite_location(uri, source, path, creatable)
    return uri


def sqlite_path(uri: str) -> Optional[Path]:
    """The file of a `sqlite:////absolute/path` URI; None for any other form (relative, in-memory, query)."""
    if not uri.startswith(SQLITE_PREFIX + "/") or "?" in uri or "#" in uri:
        return None
    return Path(uri[len(SQLITE_PREFIX):])


def unsupported_reason(uri: str) -> str:
    if not uri.strip():
        return "it is empty"
    if uri.startswith("sqlite:"):
        if uri in ("sqlite://", "sqlite:///", "sqlite:///:memory:"):
            return "an in-memory store is lost when the command ends"
        if "?" in uri or "#" in uri:
            return "rekd takes a plain file path, without a query"
        return "the path is not absolute, so the store would depend on the current folder"
    if uri.startswith(("file:", "/", ".", "~")):
        return "MLflow 3 refuses the file store (a plain path or file: URI)"
    if uri == "databricks://":
        return "it names no profile"
    if ":" not in uri:
        return "it is not a URI"
    return f"rekd does not use {uri.split(':', 1)[0]!r} stores"


def check_sqlite_location(uri: str, source: str, path: Path, creatable: Optional[Path]) -> None:
    """The SQLite file can be opened, or created, without rekd creating any folder the user did not ask for."""
    if path.is_dir():
        raise refused(uri, source, f"{path} is a folder", f"a file path such as {path / STORE_FILE}")
    if path.exists() and not path.is_file():
        raise refused(uri, source, f"{path} is not a regular file", "a SQLite database file")
    existing = path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise refused(uri, source, f"{existing} is not a folder", "a SQLite file in a writable folder")
    if not os.access(existing, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.R_OK | os.W_OK)):
        raise refused(uri, source, f"{path if path.exists() else existing} is not writable",
                      "a SQLite file in a writable folder")
    if existing != path.parent and (creatable is None or not inside(path.parent, creatable)):
        where = "" if creatable is None else f" or inside the results folder {Path(creatable).resolve()}"
        raise refused(uri, source, f"folder {path.parent} does not exist",
                      f"a SQLite file in an existing writable folder{where}")


def inside(folder: Path, parent: Path) -> bool:
    folder, parent = folder.resolve(), Path(parent).resolve()
    return folder == parent or parent in folder.parents


def refused(uri: str, source: str, reason: str, allowed: str = ALLOWED) -> UsageError:
    return UsageError(f"{source} {redacted(uri)!r} is not allowed: {reason}; allowed: {allowed}")


def redacted(uri: str) -> str:
    """The URI as it may be printed: a password in it is masked."""
    try:
        password = urlsplit(uri).password
    except ValueError:
        return uri
    return uri.replace(f":{password}@", ":***@", 1) if password else uri


def open_store(uri: str, experiment: str) -> tuple[MlflowClient, str]:
    """A client of the (checked) store `uri` and the id of `experiment`, created if missing.

    A SQLite store is opened under an exclusive lock on `<store>.lock`, so that only one process at a time
    creates or migrates its schema; a tracking server serializes that itself."""
    path = sqlite_path(uri)
    if path is None:
        return connect(uri, experiment)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"MLflow store {path}: {path.parent} cannot be created ({e.strerror or e})") from None
    with hold(Path(f"{path}.lock"), path):
        return connect(uri, experiment)


def connect(uri: str, experiment: str) -> tuple[MlflowClient, str]:
    from rekd.tracking.runs import client_for, first_line  # MLflow: imported when needed

    try:
        client = client_for(uri)  # MLflow opens the store here: a new SQLite store gets its schema now
    except Exception as e:  # a broken store, an unusable URI
        raise UsageError(f"MLflow tracking store {redacted(uri)!r} cannot be used: {first_line(e)}") from None
    return client, ensure_experiment(client, experiment)


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created if missing (before any run of it starts); in a SQLite store with
    its artifacts beside the store (artifact_location)."""
    from mlflow.exceptions import MlflowException  # MLflow: imported when needed

    from rekd.tracking.runs import first_line

    location = artifact_location(client.tracking_uri, name)
    try:
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                raise UsageError(f"MLflow experiment {name!r} is deleted; restore it or choose another --experiment")
            experiment_id, where = experiment.experiment_id, experiment.artifact_location
        else:
            try:
                experiment_id, where = client.create_experiment(name, artifact_location=location), location
            except MlflowException as e:
                # Two searches started at once: the other one created it between our look and our create.
                experiment = client.get_experiment_by_name(name) if e.error_code == "RESOURCE_ALREADY_EXISTS" else None
                if experiment is None:
                    raise
                experiment_id, where = experiment.experiment_id, experiment.artifact_location
        if location is not None and where == location:
            # Made now, not by the first artifact, so that a run whose experiment folder is missing has been
            # moved (missing_artifact_folder), never merely not written to yet.
            Path(url2pathname(urlsplit(location).path)).mkdir(parents=True, exist_ok=True)
        return experiment_id
    except UsageError:
        raise
    except Exception as e:  # any failure to reach or use the store
        raise UsageError(f"MLflow tracking store {client.tracking_uri!r} cannot be used: {first_line(e)}") from None


def artifact_location(uri: str, experiment: str) -> Optional[str]:
    """Where a new experiment of a SQLite store keeps its artifacts: beside the store, in
    `<store folder>/artifacts/<experiment>`. Without one MLflow's client writes them to `./mlruns` of
    whatever folder the command runs in, mixing every store's experiments that share an id. A tracking
    server decides for itself (`rekd.service` serves them from its own folder)."""
    path = sqlite_path(uri)
    if path is None:
        return None
    folder = re.sub(r"[^A-Za-z0-9._-]", "_", experiment).lstrip(".") or "experiment"
    return (path.parent.resolve() / ARTIFACTS_FOLDER / folder).as_uri()


def hold(lock_path: Path, store: Path) -> FileLock:
    """The store's lock, taken; after QUIET_WAIT_S says once who holds it, after LOCK_WAIT_S gives up."""
    lock = FileLock(lock_path)
    try:
        try:
            return lock.acquire(QUIET_WAIT_S)
        except Held as held:
            # progress, not an error: stdout, so that a refusal that follows stays the one line on stderr
            print(f"waiting for {held.holder} to finish opening the MLflow store {store} (lock {lock_path})",
                  flush=True)
        return lock.acquire(LOCK_WAIT_S)
    except Held as held:
        raise UsageError(f"MLflow store {store}: {held.holder} has held {lock_path} for over {LOCK_WAIT_S:.0f} s; "
                         "end that process or try again when it has finished") from None
    except OSError as e:
        raise UsageError(f"MLflow store {store}: {lock_path} cannot be written ({e.strerror or e})") from None
