"""MLflow calls a search could not make: kept in `<local-path>/<name>/mlflow-unsent.json`, sent later.

`python -m rekd.unsent FOLDER [--tracking-uri URI]` sends them once, in order. Some may have reached the store
before the outage was noticed (a request can succeed while its response is lost), so nothing is sent twice: a
trial's run is looked up by its tags before one is made, metrics, params and tags already there and ends
already made are skipped, and a param there with another value is a conflict (MLflow never changes one).
Exit 0: all is in the store, the file is gone; 1: the store is unreachable (the file keeps what is left) or
calls were refused for good (named, dropped); 2: bad input.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from mlflow.entities import Metric, Param, RunTag

from rekd.cli import Parser, python_command, run
from rekd.errors import UsageError
from rekd.locks import FileLock, Held
from rekd.search.state import LOCK_FILE
from rekd.tracking.runs import BATCH_LIMITS, client_for, first_line, flat_params, trial_run
from rekd.tracking.tags import INTERRUPTED_TAG, OUTCOME_TAG, PARENT_TAG, TRIAL_TAG
from rekd.tracking.writer import refused_for_good
from rekd.tracking.store import check_tracking_uri, redacted, sqlite_path

PROG = "python -m rekd.unsent"
FILE_NAME = "mlflow-unsent.json"
FORMAT, VERSION = "rekd-mlflow-unsent", 1
HEADER = ("tracking_uri", "experiment_id", "parent_run_id", "search")  # and "runs": trial id -> run id
CLAMP = sys.float_info.max  # MLflow's SQL stores give an infinite metric back as +-CLAMP


# -- the file: the tracker's ops as JSON, with what sending them needs without the driver -----------------------
def encode(op: tuple) -> dict:
    """One op as exactly what MLflow is to receive (a start: the trial's settings as the params it logs)."""
    call, pairs = {"call": op[0], "trial": op[1]}, lambda items: [{"key": i.key, "value": i.value} for i in items]
    if op[0] == "start":
        return call | {"params": pairs(flat_params(op[2]))}
    if op[0] == "log":
        return call | {"params": pairs(op[3]), "tags": pairs(op[4]), "metrics": [
            {"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step} for m in op[2]]}
    return call | ({"path": str(op[2]), "artifact_path": op[3]} if op[0] == "artifact" else {"status": op[2]})


def decode(call: dict) -> tuple:
    kind, trial = call["call"], call["trial"]
    if trial is not None:
        text(trial)
    if kind == "start":
        return kind, trial, {text(p["key"]): text(p["value"]) for p in call["params"]}
    if kind == "log":
        return (kind, trial, [Metric(text(m["key"]), float(m["value"]), int(m["timestamp"]), int(m["step"]))
                              for m in call["metrics"]],
                [Param(text(p["key"]), text(p["value"])) for p in call["params"]],
                [RunTag(text(t["key"]), text(t["value"])) for t in call["tags"]])
    if kind == "artifact":
        return kind, trial, text(call["path"]), call["artifact_path"]
    if kind == "end":
        return kind, trial, text(call["status"])
    raise ValueError(f"unknown call {kind!r}")


def text(value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a string")
    return value


def keep_unsent(ops: list, folder: Path, tracker) -> str:
    """Save the tracker's unsent ops in the search's folder, after those an earlier driver of the same search
    kept there; says where, and the command that sends them."""
    path, earlier = Path(folder) / FILE_NAME, ({"runs": {}}, [])
    header = {"tracking_uri": tracker.tracking_uri, "experiment_id": tracker.experiment_id,
              "parent_run_id": tracker.parent_run_id, "search": tracker.search_name}
    try:
        saved = load(path) if path.exists() else earlier
    except UsageError:  # unreadable: it could not be sent anyway
        saved = earlier
    if saved[0].get("parent_run_id") == tracker.parent_run_id:  # the search was resumed, and the store went down again
        earlier = saved
    try:
        write(path, header | {"runs": earlier[0]["runs"] | tracker.runs}, earlier[1] + list(ops))
    except OSError as e:  # the results folder itself may be what failed
        return f"they could not be saved ({e.strerror}: {path})"
    command = f"{python_command()} -m rekd.unsent {shlex.quote(str(Path(folder).resolve()))}"
    return f"they are saved in {path}; send them when the store is back with: {command}"


def write(path: Path, header: dict, ops: list) -> None:
    """Atomically: a crash mid-write leaves the previous file, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "version": VERSION} | header | {"calls": [encode(op) for op in ops]}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path) -> tuple[dict, list]:
    """The saved header (HEADER and runs) and ops; a UsageError for anything but a file this version writes."""
    try:
        saved = json.loads(path.read_text())
    except OSError as e:
        raise UsageError(f"{path} cannot be read ({e.strerror})") from None
    except ValueError as e:
        raise UsageError(f"{path} is corrupt: not JSON ({e})") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise UsageError(f"{path} is not a file of unsent MLflow calls in rekd's format {FORMAT!r}")
    if saved.get("version") != VERSION:
        raise UsageError(f"{path} has version {saved.get('version')!r}; allowed: version {VERSION}")
    try:
        header = {key: text(saved[key]) for key in HEADER}
        header["runs"] = {text(trial): text(run_id) for trial, run_id in saved["runs"].items()}
        return header, [decode(call) for call in saved["calls"]]
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{path} is corrupt: {type(e).__name__} {e}") from None


# -- sending: each op once, checked against what the store has ------------------------------------------------
class Refused(Exception):
    """A call that can never be made: a param conflict, a file gone, a trial without a run."""


class Replay:
    def __init__(self, client, header: dict, experiment_id: str):
        self.client, self.experiment_id, self.header, self.runs = client, experiment_id, header, dict(header["runs"])
        self.known: dict[str, dict] = {}  # run id -> its status, params, tags: read once, kept up to date
        self.histories: dict[tuple[str, str], set] = {}  # (run id, metric key) -> points() there

    def send(self, op: tuple) -> bool:
        """Make the call unless the store has it all; True if anything was sent."""
        kind, trial = op[0], op[1]
        if kind == "start":
            reopened = self.start(trial)
            return self.log(self.runs[trial], [], flat_params(op[2]), []) or reopened
        run_id = self.header["parent_run_id"] if trial is None else self.runs.get(trial) or self.find(trial)
        if run_id is None:
            raise Refused(f"trial {trial} has no MLflow run")
        if kind == "log":
            return self.log(run_id, *op[2:])
        if kind == "artifact":
            if not os.path.isfile(op[2]):
                raise Refused(f"artifact {op[2]} is gone")
            self.client.log_artifact(run_id, op[2], artifact_path=op[3])  # the same path: replaced, not doubled
            return True
        return self.set_status(run_id, op[2])

    def start(self, trial: str) -> bool:
        """The trial's run: the one there (reopened, as the tracker does for a continued trial) or a new one."""
        run_id = self.runs.get(trial) or self.find(trial)
        if run_id is None:
            name, tags = trial_run(self.header["search"], trial)  # as the driver's tracker makes it
            run = self.client.create_run(self.experiment_id, run_name=name,
                                         tags={PARENT_TAG: self.header["parent_run_id"], **tags})
            self.runs[trial] = run.info.run_id
            return True
        self.runs[trial], run = run_id, self.run(run_id)
        reopened = [key for key in (OUTCOME_TAG, INTERRUPTED_TAG) if key in run["tags"]]
        for key in reopened:
            self.client.delete_tag(run_id, key)
            del run["tags"][key]
        return self.set_status(run_id, "RUNNING") or bool(reopened)

    def set_status(self, run_id: str, status: str) -> bool:
        run = self.run(run_id)
        if run["status"] == status:  # an end made again would move its end time
            return False
        if status == "RUNNING":
            self.client.update_run(run_id, status=status)
        else:
            self.client.set_terminated(run_id, status)
        run["status"] = status
        return True

    def log(self, run_id: str, metrics: list, params: list, tags: list) -> bool:
        run, history = self.run(run_id), lambda key: self.history(run_id, key)
        metrics = [m for m in metrics if point(m) not in history(m.key)]
        conflicts = [p for p in params if run["params"].get(p.key, p.value) != p.value]
        params = [p for p in params if p.key not in run["params"]]
        tags = [t for t in tags if run["tags"].get(t.key) != t.value]
        size = min(BATCH_LIMITS)  # at a time: MLflow refuses a bigger batch
        for start in range(0, max(len(metrics), len(params), len(tags)), size):
            self.client.log_batch(run_id, *(items[start:start + size] for items in (metrics, params, tags)))
        for m in metrics:
            history(m.key).add(point(m))
        run["params"].update({p.key: p.value for p in params})
        run["tags"].update({t.key: t.value for t in tags})
        if conflicts:
            p = conflicts[0]
            raise Refused(f"param {p.key!r} is {run['params'][p.key]!r} in the store, not {p.value!r}")
        return bool(metrics or params or tags)

    def find(self, trial: str) -> Optional[str]:
        found = self.client.search_runs([self.experiment_id], max_results=1, filter_string=(
            f"tags.`{PARENT_TAG}` = '{self.header['parent_run_id']}' and tags.`{TRIAL_TAG}` = '{trial}'"))
        return found[0].info.run_id if found else None

    def run(self, run_id: str) -> dict:
        if run_id not in self.known:
            run = self.client.get_run(run_id)
            self.known[run_id] = {"status": run.info.status, "params": dict(run.data.params),
                                  "tags": dict(run.data.tags)}
        return self.known[run_id]

    def history(self, run_id: str, key: str) -> set:
        if (run_id, key) not in self.histories:
            self.histories[run_id, key] = {point(m) for m in self.client.get_metric_history(run_id, key)}
        return self.histories[run_id, key]


def point(metric: Metric) -> tuple:
    """A metric as the store gives it back: NaN equal to NaN, infinities clamped."""
    value = metric.value
    return metric.step, metric.timestamp, "nan" if value != value else max(-CLAMP, min(CLAMP, value))


# -- the command ----------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(_main, PROG, argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    p = Parser(prog=PROG, description="Send the MLflow calls a search kept while its tracking store was unreachable.")
    p.add_argument("folder", help=f"the search's folder (<local-path>/<name>) or its {FILE_NAME}")
    p.add_argument("--tracking-uri", help="the store to send them to (default: the one the search used)")
    args = p.parse_args(argv)
    path = Path(args.folder).expanduser().resolve()
    if path.is_dir():
        path = path / FILE_NAME
        if not path.is_file():
            raise UsageError(f"{path.parent} has no {FILE_NAME}: no MLflow calls are waiting there")
    elif not path.is_file():
        raise UsageError(f"{args.folder}: no such folder or file; give a search's results folder")
    try:
        lock = FileLock(path.parent / LOCK_FILE).acquire()  # not while a driver may still add to the file
    except Held as held:
        raise UsageError(f"{path.parent} is in use by {held.holder}; send the calls when it has ended") from None
    except OSError as e:
        raise UsageError(f"{path.parent} cannot be written ({e.strerror}), so what is sent cannot be removed") from None
    with lock:
        header, ops = load(path)
        uri = check_tracking_uri(args.tracking_uri or header["tracking_uri"],
                                 "--tracking-uri" if args.tracking_uri else f"the tracking URI saved in {path}")
        return send(path, header, ops, uri)


def send(path: Path, header: dict, ops: list, uri: str) -> int:
    store, where, parent = sqlite_path(uri), redacted(uri), header["parent_run_id"]
    if store is not None and not store.exists():  # MLflow would create an empty store there
        raise UsageError(f"no MLflow store at {store}; give the search's store with --tracking-uri")
    try:
        client = client_for(uri)
        replay = Replay(client, header, client.get_run(parent).info.experiment_id)
    except Exception as e:
        if refused_for_good(e):
            raise UsageError(f"the search's parent run {parent} is not in {where}; "
                             "give the store the search used with --tracking-uri") from None
        print(f"{PROG}: the MLflow store {where} cannot be reached ({first_line(e)}); "
              f"the {len(ops)} calls stay in {path}; run this again when it is back", file=sys.stderr)
        return 1
    sent, there, refused = 0, 0, []
    for done, op in enumerate(ops):
        try:
            sent, there = (sent + 1, there) if replay.send(op) else (sent, there + 1)
        except Exception as e:
            if isinstance(e, Refused) or refused_for_good(e):  # the call itself is wrong: it never will go through
                refused.append(f"{op[0]}: {first_line(e)}")
                continue
            if done or replay.runs != header["runs"]:
                write(path, header | {"runs": replay.runs}, ops[done:])
            print(f"{PROG}: the MLflow store {where} stopped answering ({first_line(e)}) after {sent} calls sent, "
                  f"{there} already there, {len(refused)} refused; the other {len(ops) - done} stay in {path}; "
                  "run this again when it is back", file=sys.stderr)
            return 1
    path.unlink()
    print(f"{PROG}: {sent} calls of search {header['search']} sent to {where}, {there} already there, "
          f"{len(refused)} refused{' (the first: ' + refused[0] + ')' if refused else ''}; {path.name} removed",
          file=sys.stderr if refused else sys.stdout)
    return 1 if refused else 0
