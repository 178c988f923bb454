"""MLflow tracking of a search: one parent run per search, one nested child run per trial.

Metrics take one road: trial -> tune.report -> this Tune callback in the driver -> MLflow. Trials never
talk to MLflow themselves, so a trial cannot block on the tracking server and the runs stay consistent.
Ray's stock MLflowLoggerCallback makes flat runs; these carry `mlflow.parentRunId`, the trial's
settings as params by their own names, its metrics per epoch (step = epoch) and a `rekd.outcome` tag:
completed, stopped_early (ASHA, with `rekd.stopped_at_epoch`), non_finite_loss, cuda_oom or cuda_unusable (the trial
stopped itself, with `rekd.stop_detail`), or errored.
"""
from __future__ import annotations

import collections
import itertools
import logging
import math
import os
import re
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit
from urllib.request import url2pathname

import requests
import sqlalchemy.exc
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from rekd.errors import UsageError

log = logging.getLogger(__name__)

# MLflow's client retries a dead server for minutes by default (5 retries, backoff 2, 120 s timeout):
# a tracking call should fail in well under a minute instead. Users can still set their own values.
for _key, _value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                     ("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")):
    os.environ.setdefault(_key, _value)

# The writer sends what gathered over this long in one call per run: a metric reaches MLflow at most this
# late, and the driver makes one call a second per trial instead of one per epoch (each costs it ~6 ms of
# CPU with a local store, a round trip with a server; the CPU is taken from the trials on a small machine).
LINGER_S = 1.0
BATCH_LIMITS = (1000, 100, 100)  # metrics, params, tags: the most MLflow takes in one log_batch

PARENT_TAG = "mlflow.parentRunId"
ROLE_TAG = "rekd.role"  # search | trial | final
SEARCH_TAG = "rekd.search"  # the search's name, on the parent and on every child
OUTCOME_TAG = "rekd.outcome"
INTERRUPTED_TAG = "rekd.interrupted_by"  # SIGINT | SIGTERM, on runs an interruption stopped
RERUN_TAG = "rekd.rerun_epochs"  # "first-last": epochs a continued trial ran again (their checkpoint was lost)
# Where a trial runs (and what it continued from), as its results say (rekd.search.trainable) -> its run's tags. rekd.node_ids lists every node it
# ran on, in order: a trial restored on another node after a node failure shows both.
PLACEMENT_TAGS = {"node_id": "rekd.node_id", "device": "rekd.device", "gpu_ids": "rekd.gpu_ids",
                  "restored_from": "rekd.restored_from"}  # the checkpoint a continued trial started from
NODES_TAG = "rekd.node_ids"
# Bookkeeping Tune adds to every result; not metrics of the network.
TUNE_KEYS = {"done", "training_iteration", "trial_id", "date", "timestamp", "time_this_iter_s", "time_total_s",
             "pid", "hostname", "node_ip", "time_since_restore", "iterations_since_restore",
             "checkpoint_dir_name", "should_checkpoint", "experiment_tag"}


def client_for(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created if missing (in the driver, before any trial starts); in a SQLite
    store with its artifacts beside the store (rekd.tracking.store.artifact_location)."""
    from rekd.tracking.store import artifact_location

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


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def error_summary(error: BaseException) -> str:
    """What went wrong in a trial, in one line. Tune wraps a trial's exception in a text that starts with
    `Failure # 1 (occurred at ...)` and holds the traceback; the line that says something is its last
    `SomeError: message` line (the exception the trial raised)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Failure)\b[^\s]*: ", line):
            return line
    return lines[0] if lines else type(error).__name__


class ArtifactFolderGone(Exception):
    """A run's artifacts would go to a local folder that is gone: MLflow's client would make it again."""


def missing_artifact_folder(artifact_uri: str) -> Optional[Path]:
    """For a run whose artifacts are local (`file:///<experiment folder>/<run id>/artifacts`), its experiment's
    folder when that no longer exists: the store's folder was moved (an experiment's artifact location is
    fixed when it is created), and logging would make the old folder again where it used to be."""
    if not artifact_uri.startswith("file:"):
        return None
    folder = Path(url2pathname(urlsplit(artifact_uri).path)).parent.parent
    return None if folder.is_dir() else folder


def refused_for_good(error: Exception) -> bool:
    """An MLflow error that is the request's fault (HTTP 4xx: invalid value, unknown run, a param logged
    with another value), not the store's: retrying it cannot succeed. Too many requests is not one. An
    artifact whose folder is gone is not sent either."""
    if isinstance(error, ArtifactFolderGone):
        return True
    if not isinstance(error, MlflowException):
        return False
    status = error.get_http_status_code()
    return 400 <= status < 500 and status not in (408, 429)


def transient(error: Exception) -> bool:
    """The store's trouble, worth waiting for: the server down or slow (MLflow's client raises
    MlflowException for those), a locked or unreachable database, a network or file-system error.
    Anything else is a bug in rekd and is not retried as if it were an outage."""
    return isinstance(error, (MlflowException, OSError, requests.RequestException, sqlalchemy.exc.SQLAlchemyError))


def flat_params(settings: dict[str, Any]) -> list[Param]:
    return [Param(key, "none" if value is None else str(value)) for key, value in sorted(settings.items())]


def numeric_metrics(result: dict, step: int, timestamp_ms: int) -> list[Metric]:
    metrics = []
    for key, value in result.items():
        if key in TUNE_KEYS or key.startswith("config") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            metrics.append(Metric(key, float(value), timestamp_ms, step))
    return metrics


_ACTIVE: "weakref.WeakSet[MlflowTrialTracker]" = weakref.WeakSet()


class MlflowTrialTracker(Callback):
    """A Tune callback (runs in the driver) that mirrors every trial into a nested MLflow run.

    The callbacks only queue what is to be logged; one background thread sends it, in order. When the
    tracking server is down the thread waits and retries, so neither the trials nor Tune's event loop
    wait on MLflow; what is still unsent when the search ends is flushed within `close(timeout)` or
    written to a file and reported.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, search_name: str, epochs: int):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.search_name = search_name
        self.epochs = epochs
        self.runs: dict[str, str] = {}  # trial id -> MLflow run id (kept across driver restarts)
        self.unfinished: set[str] = set()  # trials started and not yet ended (kept across driver restarts)
        self.nodes: dict[str, list[str]] = {}  # trial id -> the Ray nodes it ran on, in order
        self._init_runtime()

    @classmethod
    def active(cls) -> list["MlflowTrialTracker"]:
        """The trackers of this process, including those Tune unpickled when it restored an experiment."""
        return list(_ACTIVE)

    def get_state(self) -> dict:  # saved by Tune with its experiment state, given back on restore
        with self._wake:
            return {"runs": dict(self.runs), "unfinished": sorted(self.unfinished), "pending": list(self._queue),
                    "nodes": {k: list(v) for k, v in self.nodes.items()}}

    def set_state(self, state: dict) -> None:
        with self._wake:
            self.runs.update(state.get("runs", {}))
            self.unfinished = set(state.get("unfinished", [])) | self.unfinished
            for trial_id, nodes in state.get("nodes", {}).items():
                self.nodes.setdefault(trial_id, list(nodes))
            self._queue.extendleft(reversed(state.get("pending", [])))

    def _init_runtime(self) -> None:
        self._client: Optional[MlflowClient] = None
        self._queue: collections.deque = collections.deque()
        self._wake = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._closing = False
        self._deadline = math.inf
        self.failures = 0  # calls that had to be retried
        self.last_error = ""
        self.refused: list[tuple[tuple, str]] = []  # (op, error) the store refused for good: never retried
        self._one_at_a_time = False  # after a refused batch: find the op it refuses
        self._logged_epoch: dict[str, int] = {}  # continued trials: the last epoch their run had logged
        self._placed: dict[str, dict] = {}  # trial id -> the placement tags last sent
        self._crashed: Optional[BaseException] = None  # a bug in this writer: raised by raise_if_crashed()
        if not hasattr(self, "nodes"):  # a tracker pickled before placements were recorded
            self.nodes = {}
        _ACTIVE.add(self)

    def __getstate__(self) -> dict:  # Tune snapshots its callbacks: the queue's content, not its thread
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        state["pending"] = list(self._queue)
        return state

    def __setstate__(self, state: dict) -> None:
        pending = state.pop("pending", [])
        self.__dict__.update(state)
        self._init_runtime()
        self._queue.extend(pending)

    # -- Tune's callbacks: queue only ------------------------------------------------------------------
    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self.unfinished.add(trial.trial_id)
        self._submit(("start", trial.trial_id, dict(trial.config)))

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        metrics = numeric_metrics(result, step, int(result.get("timestamp", 0) * 1000))
        tags = self.placement_tags(trial.trial_id, result)
        if metrics or tags:
            self._submit(("log", trial.trial_id, metrics, [], tags))

    def placement_tags(self, trial_id: str, result: dict) -> list[RunTag]:
        """The trial's node, device and GPU ids when they are new or changed (a trial restored elsewhere)."""
        placed = {tag: str(result[key]) for key, tag in PLACEMENT_TAGS.items() if key in result}
        if not placed or placed == self._placed.get(trial_id):
            return []
        self._placed[trial_id] = placed
        nodes = self.nodes.setdefault(trial_id, [])
        node = placed.get(PLACEMENT_TAGS["node_id"])
        if node and (not nodes or nodes[-1] != node):
            nodes.append(node)
        return [RunTag(k, v) for k, v in placed.items()] + [RunTag(NODES_TAG, ",".join(nodes))]

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        last = trial.last_result or {}
        epoch = int(last.get("epoch", 0))
        if last.get("stop_reason"):  # NaN loss or out of memory: said by the trainable
            self.end_trial(trial.trial_id, str(last["stop_reason"]), "FAILED",
                           {"rekd.stopped_at_epoch": str(epoch),
                            "rekd.stop_detail": str(last.get("stop_detail", ""))[:500]})
        elif epoch >= self.epochs:
            self.end_trial(trial.trial_id, "completed", "FINISHED")
        else:
            self.end_trial(trial.trial_id, "stopped_early", "FINISHED", {"rekd.stopped_at_epoch": str(epoch)})

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        error = trial.get_error()
        reason = error_summary(error) if error is not None else "error"
        self.end_trial(trial.trial_id, "errored", "FAILED", {"rekd.error": reason[:500]})

    def end_trial(self, trial_id: str, outcome: str, status: str, extra: Optional[dict] = None) -> None:
        self.unfinished.discard(trial_id)
        tags = [RunTag(OUTCOME_TAG, outcome)] + [RunTag(k, v) for k, v in (extra or {}).items()]
        self._submit(("log", trial_id, [], [], tags))
        self._submit(("end", trial_id, status))

    def end_unfinished(self, outcome: str, status: str, extra: Optional[dict] = None) -> list[str]:
        """End the runs of trials that started and have not ended (the search stops without them)."""
        ended = sorted(self.unfinished)
        for trial_id in ended:
            self.end_trial(trial_id, outcome, status, extra)
        return ended

    def log_trial(self, trial_id: str, metrics: list[Metric] = (), tags: list[RunTag] = ()) -> None:
        """More for a trial's run after it ended (the search's summary), in order with the rest."""
        self._submit(("log", trial_id, list(metrics), [], list(tags)))

    # -- the parent run, through the same ordered queue ------------------------------------------------
    def log_parent(self, metrics: list[Metric] = (), params: list[Param] = (), tags: list[RunTag] = ()) -> None:
        self._submit(("log", None, list(metrics), list(params), list(tags)))

    def log_parent_artifact(self, path: str, artifact_path: str) -> None:
        self._submit(("artifact", None, path, artifact_path))

    def end_parent(self, status: str) -> None:
        self._submit(("end", None, status))

    def close(self, timeout: float) -> list:
        """Send what is queued, waiting at most `timeout` seconds for the server; returns what is unsent."""
        with self._wake:
            self._closing = True
            self._deadline = time.monotonic() + timeout
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout + 5)
        return list(self._queue)

    # -- the writer thread -----------------------------------------------------------------------------
    def _submit(self, op: tuple) -> None:
        with self._wake:
            self._queue.append(op)
            if (self._thread is None or not self._thread.is_alive()) and self._crashed is None:
                self._thread = threading.Thread(target=self._drain, name="rekd-mlflow", daemon=True)
                self._thread.start()
            self._wake.notify_all()

    def _drain(self) -> None:
        delay = 1.0
        while True:
            with self._wake:
                if not self._queue:
                    while not self._queue and not self._closing:
                        self._wake.wait()
                    if not self._queue:
                        return
                    self._linger()
                ops = self._next_call()
            try:
                self._execute(merge(ops))
            except Exception as e:
                if refused_for_good(e):  # an invalid request: retrying cannot help, and would block the queue
                    self._refuse(ops, e)
                    continue
                if not transient(e):  # rekd's bug, not the store's outage: stop here, keep the queue, raise later
                    log.error("the MLflow writer failed on a %r call; what is queued stays unsent", ops[0][0],
                              exc_info=e)
                    self._crashed = e
                    return
                # server down, timeout, 5xx, a locked database: keep the ops, wait, retry
                self.failures += 1
                self.last_error = first_line(e)
                if delay == 1.0:
                    log.warning("MLflow unreachable (%s); logging continues when it is back", self.last_error)
                with self._wake:
                    if self._closing and time.monotonic() + delay > self._deadline:
                        return
                    self._wake.wait(delay)
                delay = min(delay * 2, 30.0)
                continue
            delay = 1.0
            self._one_at_a_time = False
            self._drop(ops)

    @property
    def crashed(self) -> bool:
        return self._crashed is not None

    def raise_if_crashed(self) -> None:
        """After close(): the writer's own error, if it had one (what it left is in close()'s return)."""
        if self._crashed is not None:
            raise self._crashed

    def _drop(self, ops: list[tuple]) -> None:
        with self._wake:
            sent = {id(op) for op in ops}
            self._queue = collections.deque(op for op in self._queue if id(op) not in sent)

    def _refuse(self, ops: list[tuple], error: Exception) -> None:
        """A call the store refused: when it merged several ops, they are tried one by one to find the one
        at fault (the others go through); a single refused op is dropped, kept in `refused` and reported."""
        if len(ops) > 1:
            self._one_at_a_time = True
            return
        self.refused.append((ops[0], first_line(error)))
        log.warning("MLflow refused a logging call (%s); it is dropped", first_line(error))
        self._drop(ops)

    def _linger(self) -> None:
        """Let the results of the next LINGER_S gather (lock held) so that they go out as one call per run."""
        until = time.monotonic() + LINGER_S
        while not self._closing and (left := until - time.monotonic()) > 0:
            self._wake.wait(left)

    def _next_call(self) -> list[tuple]:
        """The ops of the next MLflow call (lock held): the head op, and when it is a "log", every queued "log"
        of the same run before the queue's next other op, as far as one log_batch takes them."""
        head = self._queue[0]
        if head[0] != "log" or self._one_at_a_time:
            return [head]
        ops, params, tags = [head], {p.key for p in head[3]}, {t.key for t in head[4]}
        counts = [len(head[2]), len(head[3]), len(head[4])]
        for op in itertools.islice(self._queue, 1, None):
            if op[0] != "log":
                break  # a run's start or end keeps its place
            if op[1] != head[1]:
                continue
            sizes = [len(op[2]), len(op[3]), len(op[4])]
            if (any(c + n > limit for c, n, limit in zip(counts, sizes, BATCH_LIMITS))
                    or params & {p.key for p in op[3]} or tags & {t.key for t in op[4]}):
                break  # MLflow refuses a batch that names a param or tag twice
            ops.append(op)
            counts = [c + n for c, n in zip(counts, sizes)]
            params |= {p.key for p in op[3]}
            tags |= {t.key for t in op[4]}
        return ops

    def _execute(self, op: tuple) -> None:
        if self._client is None:
            self._client = client_for(self.tracking_uri)
        kind, trial_id = op[0], op[1]
        if kind == "start":
            if trial_id not in self.runs:  # a trial restarted from its checkpoint keeps its run
                self.runs.update(self._existing_run(trial_id))
            if trial_id in self.runs:  # continued after an interruption: running again, its outcome to come
                run = self._client.get_run(self.runs[trial_id])
                self._logged_epoch[trial_id] = int(run.data.metrics.get("epoch", 0))
                if run.info.status != "RUNNING":
                    self._client.update_run(run.info.run_id, status="RUNNING")
                for key in (OUTCOME_TAG, INTERRUPTED_TAG):
                    if key in run.data.tags:
                        self._client.delete_tag(run.info.run_id, key)
            else:
                run = self._client.create_run(
                    self.experiment_id, run_name=f"trial-{trial_id}",
                    tags={PARENT_TAG: self.parent_run_id, ROLE_TAG: "trial", SEARCH_TAG: self.search_name,
                          "rekd.trial_id": trial_id})
                self.runs[trial_id] = run.info.run_id
            self._client.log_batch(self.runs[trial_id], params=flat_params(op[2]))
            return
        run_id = self.parent_run_id if trial_id is None else self.runs.get(trial_id)
        if run_id is None:
            return
        if kind == "log":
            tags = op[4]
            logged = self._logged_epoch.get(trial_id)  # set for a continued trial only
            again = [m.step for m in op[2] if m.key == "epoch" and logged is not None and m.step <= logged]
            if again:  # (the summary's rank metric is not an epoch)
                # A continued trial runs an epoch MLflow already has again: its checkpoint was lost with the
                # interruption (it was written, but Tune had not registered it). Both runs of the epoch stay
                # in the history, and the run says so.
                tags = [*tags, RunTag(RERUN_TAG, f"{min(again)}-{logged}")]
                del self._logged_epoch[trial_id]
            self._client.log_batch(run_id, metrics=op[2], params=op[3], tags=tags)
        elif kind == "artifact":
            gone = missing_artifact_folder(self._client.get_run(run_id).info.artifact_uri)
            if gone is not None:
                raise ArtifactFolderGone(f"the experiment's artifact folder {gone} no longer exists (moved with its "
                                         f"results folder? MLflow keeps the location an experiment was created "
                                         f"with); {op[2]} stays where it is")
            self._client.log_artifact(run_id, op[2], artifact_path=op[3])
        elif kind == "end":
            self._client.set_terminated(run_id, op[2])


    def _existing_run(self, trial_id: str) -> dict[str, str]:
        """The trial's run if MLflow has one already: a resumed driver may not have recorded it."""
        found = self._client.search_runs(
            [self.experiment_id], max_results=1,
            filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and tags.`rekd.trial_id` = '{trial_id}'")
        return {trial_id: found[0].info.run_id} if found else {}


def merge(ops: list[tuple]) -> tuple:
    """One op from several "log" ops of one run, in order; a single op as it is."""
    if len(ops) == 1:
        return ops[0]
    return ("log", ops[0][1], [m for op in ops for m in op[2]], [p for op in ops for p in op[3]],
            [t for op in ops for t in op[4]])


def describe_unsent(ops: list) -> str:
    kinds = collections.Counter(op[0] for op in ops)
    return ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
