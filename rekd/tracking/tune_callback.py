"""MLflow tracking of a search: one parent run per search, one nested child run per trial.

Metrics take one road: trial -> tune.report -> this Tune callback in the driver -> the writer
(rekd.tracking.writer) -> MLflow. Trials never talk to MLflow themselves, so a trial cannot block on the
tracking server and the runs stay consistent. Ray's stock MLflowLoggerCallback makes flat runs; these carry
`mlflow.parentRunId`, the trial's settings as params by their own names, its metrics per epoch (step =
epoch) and a `rekd.outcome` tag (rekd.tracking.outcomes): completed, stopped_early (ASHA, with
`rekd.stopped_at_epoch`), non_finite_loss, cuda_oom or cuda_unusable (the trial stopped itself, with
`rekd.stop_detail`), or errored.
"""
from __future__ import annotations

import functools
import os
import weakref
from pathlib import Path
from typing import Optional

from mlflow.entities import Metric, Param, RunTag
from ray.tune import Callback

from rekd.tracking import outcomes
from rekd.tracking.runs import error_summary, numeric_metrics, trial_run
from rekd.tracking.tags import ERROR_TAG, NODES_TAG, OUTCOME_TAG, PLACEMENT_TAGS, TRIAL_TAG
from rekd.tracking.writer import RunWriter


_ACTIVE: "weakref.WeakSet[MlflowTrialTracker]" = weakref.WeakSet()


class MlflowTrialTracker(Callback, RunWriter):
    """A Tune callback (runs in the driver) that mirrors every trial into a nested MLflow run.

    The callbacks only queue what is to be logged (it is a RunWriter whose keys are trial ids); one
    background thread sends it, in order. When the tracking server is down the thread waits and retries,
    so neither the trials nor Tune's event loop wait on MLflow; what is still unsent when the search ends
    is flushed within `close(timeout)` or written to a file and reported.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, search_name: str, epochs: int):
        self.search_name = search_name
        self.epochs = epochs
        self.unfinished: set[str] = set()  # trials started and not yet ended (kept across driver restarts)
        self.nodes: dict[str, list[str]] = {}  # trial id -> the Ray nodes it ran on, in order
        RunWriter.__init__(self, tracking_uri, experiment_id, parent_run_id,
                           child_run=functools.partial(trial_run, search_name), key_tag=TRIAL_TAG)

    @classmethod
    def active(cls) -> list["MlflowTrialTracker"]:
        """The trackers of this process, including those Tune unpickled when it restored an experiment."""
        return list(_ACTIVE)

    def get_state(self) -> dict:  # saved by Tune with its experiment state, given back on restore
        with self._wake:
            return {"runs": dict(self.runs), "unfinished": sorted(self.unfinished), "pending": self.pending(),
                    "nodes": {k: list(v) for k, v in self.nodes.items()}}

    def set_state(self, state: dict) -> None:
        with self._wake:
            self.runs.update(state.get("runs", {}))
            self.unfinished = set(state.get("unfinished", [])) | self.unfinished
            for trial_id, nodes in state.get("nodes", {}).items():
                self.nodes.setdefault(trial_id, list(nodes))
        self.requeue(state.get("pending", []))

    def _init_runtime(self) -> None:
        RunWriter._init_runtime(self)
        self._placed: dict[str, dict] = {}  # trial id -> the placement tags last sent
        _ACTIVE.add(self)

    # -- Tune's callbacks: queue only ------------------------------------------------------------------
    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self.unfinished.add(trial.trial_id)
        self.start(trial.trial_id, trial.config)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        step = int(result.get(outcomes.EPOCH, result.get("training_iteration", 0)))
        metrics = numeric_metrics(result, step, int(result.get("timestamp", 0) * 1000))
        tags = self.placement_tags(trial.trial_id, result)
        if metrics or tags:
            self.log(trial.trial_id, metrics, [], tags)

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
        epoch = str(int(last.get(outcomes.EPOCH, 0)))
        outcome = outcomes.ended(last, self.epochs)
        if outcomes.stop_reason(last):  # NaN loss or out of memory: said by the trainable
            self.end_trial(trial.trial_id, outcome, "FAILED",
                           {"rekd.stopped_at_epoch": epoch,
                            "rekd.stop_detail": str(last.get(outcomes.STOP_DETAIL, ""))[:500]})
        elif outcome == outcomes.COMPLETED:
            self.end_trial(trial.trial_id, outcome, "FINISHED")
        else:
            self.end_trial(trial.trial_id, outcome, "FINISHED", {"rekd.stopped_at_epoch": epoch})

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        error = trial.get_error()
        if error is None and trial.error_file and os.path.isfile(trial.error_file):
            # get_error() reads the copy in the storage path, which the driver writes there a little later
            error = Path(trial.error_file).read_text()
        reason = error_summary(error) if error is not None else "error"
        self.end_trial(trial.trial_id, outcomes.ended(trial.last_result, self.epochs, errored=True), "FAILED",
                       {ERROR_TAG: reason[:500]})

    def end_trial(self, trial_id: str, outcome: str, status: str, extra: Optional[dict] = None) -> None:
        self.unfinished.discard(trial_id)
        self.log(trial_id, tags=[RunTag(OUTCOME_TAG, outcome)] + [RunTag(k, v) for k, v in (extra or {}).items()])
        self.end(trial_id, status)

    def end_unfinished(self, outcome: str, status: str, extra: Optional[dict] = None) -> list[str]:
        """End the runs of trials that started and have not ended (the search stops without them)."""
        ended = sorted(self.unfinished)
        for trial_id in ended:
            self.end_trial(trial_id, outcome, status, extra)
        return ended

    def log_trial(self, trial_id: str, metrics: list[Metric] = (), tags: list[RunTag] = ()) -> None:
        """More for a trial's run after it ended (the search's summary), in order with the rest."""
        self.log(trial_id, metrics, [], tags)

    # -- the parent run, through the same ordered queue ------------------------------------------------
    def log_parent(self, metrics: list[Metric] = (), params: list[Param] = (), tags: list[RunTag] = ()) -> None:
        self.log(None, metrics, params, tags)

    def log_parent_artifact(self, path: str, artifact_path: str) -> None:
        self.log_artifact(None, path, artifact_path)

    def end_parent(self, status: str) -> None:
        self.end(None, status)
