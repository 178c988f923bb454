"""The names of the tags rekd puts on its MLflow runs, in one place: every command that writes or reads a run
uses these. Names only: importing this loads nothing else (rekd.ui reads runs without loading MLflow)."""
from __future__ import annotations

PARENT_TAG = "mlflow.parentRunId"
ROLE_TAG = "rekd.role"  # search | trial | final | final_run | reproduce | reproduce_run
SEARCH_TAG = "rekd.search"  # the search's name, on the parent and on every child
OUTCOME_TAG = "rekd.outcome"
INTERRUPTED_TAG = "rekd.interrupted_by"  # SIGINT | SIGTERM, on runs an interruption stopped
TRIAL_TAG = "rekd.trial_id"  # on a trial's run: how a resumed driver finds it again
RERUN_TAG = "rekd.rerun_epochs"  # "first-last": epochs a continued trial ran again (their checkpoint was lost)
# Where a trial runs (and what it continued from), as its results say (rekd.search.trainable) -> its run's tags.
# rekd.node_ids lists every node it ran on, in order: a trial restored on another node after a node failure shows both.
PLACEMENT_TAGS = {"node_id": "rekd.node_id", "device": "rekd.device", "gpu_ids": "rekd.gpu_ids",
                  "restored_from": "rekd.restored_from"}  # the checkpoint a continued trial started from
NODES_TAG = "rekd.node_ids"
ERROR_TAG = "rekd.error"  # the exception's first line, on a failed run
