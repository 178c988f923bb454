"""The MLflow runs rekd makes: their tags, how a store is reached, and what is logged into them.

Every command tracks its work as one parent run with nested child runs: a search and its trials
(rekd.search), final runs (rekd.evaluate.final) and reproductions (rekd.evaluate.reproduce_run). The parent
is created here, with the versions that made the result (`rekd.<key>` tags, rekd.provenance); what follows
goes through the ordered writer (rekd.tracking.writer). Nothing here imports Ray: the commands that do not
search do not pay for it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence
from urllib.parse import urlsplit
from urllib.request import url2pathname

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from rekd.tracking.tags import ROLE_TAG, SEARCH_TAG, TRIAL_TAG


# MLflow's client retries a dead server for minutes by default (5 retries, backoff 2, 120 s timeout):
# a tracking call should fail in well under a minute instead. Users can still set their own values.
for _key, _value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                     ("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")):
    os.environ.setdefault(_key, _value)

BATCH_LIMITS = (1000, 100, 100)  # metrics, params, tags: the most MLflow takes in one log_batch

# Bookkeeping Tune adds to every result; not metrics of the network.
TUNE_KEYS = {"done", "training_iteration", "trial_id", "date", "timestamp", "time_this_iter_s", "time_total_s",
             "pid", "hostname", "node_ip", "time_since_restore", "iterations_since_restore",
             "checkpoint_dir_name", "should_checkpoint", "experiment_tag"}


def trial_run(search_name: str, trial_id: str) -> tuple[str, dict[str, str]]:
    """A trial's run: its name and tags (the writer, or rekd.unsent's replay, adds the parent's id)."""
    return f"trial-{trial_id}", {ROLE_TAG: "trial", SEARCH_TAG: search_name, TRIAL_TAG: trial_id}


def client_for(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri)


def create_parent_run(client: MlflowClient, experiment_id: str, run_name: str, tags: Mapping[str, str],
                      params: Sequence[Param] = ()) -> str:
    """A command's parent run, made now (its children need its id): `tags`, `params`, and the code and
    library versions that made the result as `rekd.<key>` tags. Returns its run id."""
    from rekd.provenance import provenance  # imports torch: only the commands that make a parent pay for it

    run_id = client.create_run(experiment_id, run_name=run_name, tags=dict(tags)).info.run_id
    client.log_batch(run_id, params=list(params), tags=[RunTag(f"rekd.{k}", str(v)) for k, v in provenance().items()])
    return run_id


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


def flat_params(settings: Mapping[str, Any]) -> list[Param]:
    """Settings as MLflow params by their own names, sorted; None as "none" (MLflow keeps only strings)."""
    return [Param(key, "none" if value is None else str(value)) for key, value in sorted(settings.items())]


def numeric_metrics(result: Mapping[str, Any], step: int, timestamp_ms: int) -> list[Metric]:
    """The numbers of a result (an epoch's metrics, a trial's report) as metrics at `step`; Tune's
    bookkeeping, the config and flags are left out."""
    metrics = []
    for key, value in result.items():
        if key in TUNE_KEYS or key.startswith("config") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            metrics.append(Metric(key, float(value), timestamp_ms, step))
    return metrics
