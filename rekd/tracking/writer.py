"""The one way rekd writes to MLflow: an ordered queue that one background thread sends, surviving outages.

A command's run is a parent run and its children, each child named by a key (a trial id, a final run's
name). The command queues ops; they are sent in order, and consecutive "log"s of one run go out as one
log_batch. When the tracking store is down the thread waits and retries, so training never waits on
MLflow and an outage never aborts it; what is still unsent when the command ends is flushed within
`close(timeout)` and returned, for the command to keep (rekd.search.unsent) or report.

The ops, exactly as rekd.search.unsent writes them to a file (that format must not change):
  ("start", key, settings)                 the child run of `key` (made, or continued), its settings as params
  ("log", key | None, metrics, params, tags)   None: the parent run
  ("artifact", key | None, path, artifact_path)
  ("end", key | None, status)
"""
from __future__ import annotations

import collections
import itertools
import logging
import math
import sys
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Optional

import requests
import sqlalchemy.exc
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from rekd.tracking.runs import (BATCH_LIMITS, ArtifactFolderGone, client_for, first_line, flat_params,
                                missing_artifact_folder)
from rekd.tracking.tags import INTERRUPTED_TAG, OUTCOME_TAG, PARENT_TAG, RERUN_TAG

log = logging.getLogger(__name__)

# The writer sends what gathered over this long in one call per run: a metric reaches MLflow at most this
# late, and the driver makes one call a second per trial instead of one per epoch (each costs it ~6 ms of
# CPU with a local store, a round trip with a server; the CPU is taken from the trials on a small machine).
LINGER_S = 1.0
# How long a command's end waits for an unreachable store to come back; shorter when it failed or was
# interrupted (the user is waiting).
GRACE_S = 120
FAILED_GRACE_S = 20

# A child run as the command names it: (run name, tags). The writer adds the parent's id (PARENT_TAG).
ChildRun = Callable[[str], tuple[str, dict[str, str]]]


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


class RunWriter:
    """Sends one parent run's and its children's ops to MLflow, in order, from a background thread.

    `child_run(key)` says what the run of a key that has none yet is called and tagged. With `key_tag` (a
    tag `child_run` puts on every child, holding its key) a start looks the key's run up under the parent
    first: a writer that lost its records (a restarted driver) continues that run instead of making another.
    A key started again continues its run: RUNNING again, its outcome tags removed, and an epoch it logs
    again marked with RERUN_TAG.

    The state that outlives the process (pickled, as Tune pickles the search's tracker) is the public
    attributes and the queue's content; never the thread or the client.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, child_run: ChildRun,
                 key_tag: Optional[str] = None):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.child_run = child_run
        self.key_tag = key_tag
        self.runs: dict[str, str] = {}  # key -> MLflow run id (kept across restarts)
        self._init_runtime()

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
        self._logged_epoch: dict[str, int] = {}  # continued runs: the last epoch their run had logged
        self._crashed: Optional[BaseException] = None  # a bug in this writer: raised by raise_if_crashed()

    def __getstate__(self) -> dict:  # the queue's content, not its thread
        with self._wake:
            state = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
            state["pending"] = list(self._queue)
        return state

    def __setstate__(self, state: dict) -> None:
        pending = state.pop("pending", [])
        self.__dict__.update(state)
        self._init_runtime()
        self._queue.extend(pending)

    # -- what a command queues ---------------------------------------------------------------------------
    def start(self, key: str, settings: Mapping[str, Any]) -> None:
        """The child run of `key`, made (or continued), with `settings` as its params."""
        self._submit(("start", key, dict(settings)))

    def log(self, key: Optional[str], metrics: Iterable[Metric] = (), params: Iterable[Param] = (),
            tags: Iterable[RunTag] = ()) -> None:
        """Metrics, params and tags of the run of `key` (None: the parent)."""
        self._submit(("log", key, list(metrics), list(params), list(tags)))

    def log_artifact(self, key: Optional[str], path: str, artifact_path: str) -> None:
        self._submit(("artifact", key, str(path), artifact_path))

    def end(self, key: Optional[str], status: str) -> None:
        self._submit(("end", key, status))

    def pending(self) -> list[tuple]:
        """What is queued and not yet sent, in order."""
        with self._wake:
            return list(self._queue)

    def requeue(self, ops: Iterable[tuple]) -> None:
        """Ops an earlier writer of the same runs left unsent: they go first, in their order."""
        with self._wake:
            self._queue.extendleft(reversed(list(ops)))

    def close(self, timeout: float) -> list:
        """Send what is queued, waiting at most `timeout` seconds for the server; returns what is unsent."""
        with self._wake:
            self._closing = True
            self._deadline = time.monotonic() + timeout
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout + 5)
        return self.pending()

    @property
    def crashed(self) -> bool:
        return self._crashed is not None

    def raise_if_crashed(self) -> None:
        """After close(): the writer's own error, if it had one (what it left is in close()'s return)."""
        if self._crashed is not None:
            raise self._crashed

    # -- the thread ----------------------------------------------------------------------------------------
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
        """Let the ops of the next LINGER_S gather (lock held) so that they go out as one call per run."""
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
        kind, key = op[0], op[1]
        if kind == "start":
            self._start(key, op[2])
            return
        run_id = self.parent_run_id if key is None else self.runs.get(key)
        if run_id is None:
            return
        if kind == "log":
            tags = op[4]
            logged = self._logged_epoch.get(key)  # set for a continued run only
            again = [m.step for m in op[2] if m.key == "epoch" and logged is not None and m.step <= logged]
            if again:  # (a summary's rank metric is not an epoch)
                # A continued trial runs an epoch MLflow already has again: its checkpoint was lost with the
                # interruption (it was written, but Tune had not registered it). Both runs of the epoch stay
                # in the history, and the run says so.
                tags = [*tags, RunTag(RERUN_TAG, f"{min(again)}-{logged}")]
                del self._logged_epoch[key]
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

    def _start(self, key: str, settings: dict) -> None:
        if key not in self.runs and self.key_tag is not None:  # a trial restarted from its checkpoint keeps its run
            self.runs.update(self._existing_run(key))
        if key in self.runs:  # continued after an interruption: running again, its outcome to come
            run = self._client.get_run(self.runs[key])
            self._logged_epoch[key] = int(run.data.metrics.get("epoch", 0))
            if run.info.status != "RUNNING":
                self._client.update_run(run.info.run_id, status="RUNNING")
            for tag in (OUTCOME_TAG, INTERRUPTED_TAG):
                if tag in run.data.tags:
                    self._client.delete_tag(run.info.run_id, tag)
        else:
            name, tags = self.child_run(key)
            run = self._client.create_run(self.experiment_id, run_name=name,
                                          tags={PARENT_TAG: self.parent_run_id, **tags})
            self.runs[key] = run.info.run_id
        self._client.log_batch(self.runs[key], params=flat_params(settings))

    def _existing_run(self, key: str) -> dict[str, str]:
        """The key's run if MLflow has one already: a resumed driver may not have recorded it."""
        found = self._client.search_runs(
            [self.experiment_id], max_results=1,
            filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and tags.`{self.key_tag}` = '{key}'")
        return {key: found[0].info.run_id} if found else {}


def merge(ops: list[tuple]) -> tuple:
    """One op from several "log" ops of one run, in order; a single op as it is."""
    if len(ops) == 1:
        return ops[0]
    return ("log", ops[0][1], [m for op in ops for m in op[2]], [p for op in ops for p in op[3]],
            [t for op in ops for t in op[4]])


def describe_unsent(ops: list) -> str:
    kinds = collections.Counter(op[0] for op in ops)
    return ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))


def unsent_reason(writer: RunWriter) -> str:
    """Why calls stayed unsent after close(): the writer's own failure, or the store's outage."""
    return "rekd's MLflow writer failed (the error follows)" if writer.crashed else "the MLflow store stayed unreachable"


def warn_refused(writer: RunWriter) -> None:
    """One warning line on stderr for the calls the store refused for good (dropped, never retried)."""
    if writer.refused:
        op, error = writer.refused[0]
        print(f"warning: MLflow refused {len(writer.refused)} logging calls, which were dropped "
              f"(the first: {op[0]} -> {error})", file=sys.stderr, flush=True)


def warn_unlogged(writer: RunWriter, unsent: list, results: Optional[str] = None) -> None:
    """After close(): one warning line on stderr for what never reached MLflow, and one for what it refused.
    For a command that keeps no file of unsent calls (rekd.search.unsent replays a search's trial runs, not
    other children): the warning names the files its results are in all the same (`results`, when it
    wrote them)."""
    if unsent:
        why = unsent_reason(writer) + ("" if writer.crashed else f" ({writer.last_error})")
        kept = f"; the results are in {results}" if results else ""
        print(f"warning: {why}; {len(unsent)} logging calls were not made ({describe_unsent(unsent)}), "
              f"so MLflow lacks them{kept}", file=sys.stderr, flush=True)
    warn_refused(writer)
