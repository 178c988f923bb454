"""Links into the MLflow UI, and the lines every command prints at its end to say how to open its runs."""
from __future__ import annotations

import shlex
from typing import Optional
from urllib.parse import quote, urlencode, urlsplit

from rekd.cli import python_command
from rekd.tracking.store import STORE_FILE, sqlite_path

HOST = "127.0.0.1"  # rekd's servers (the MLflow UI, rekd.service) bind to loopback only
DEFAULT_PORT = 5000  # rekd.ui's
# MLflow 3.17's UI opens an experiment in its GenAI view unless the URL (or an earlier choice stored in the
# browser) asks for this one, the classic runs table.
TRAINING_VIEW = {"workflowType": "machine_learning"}


def experiment_url(base: str, experiment_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}?{urlencode(TRAINING_VIEW)}"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{urlencode(TRAINING_VIEW)}"


def children_url(base: str, experiment_id: str, parent_run_id: str, order_by: Optional[str] = None) -> str:
    """The experiment's runs table listing the child runs of `parent_run_id`, flat, by `order_by` (a metric
    every child has, ascending, e.g. a search's `rank`), else by run name.

    The UI takes `searchFilter` as the text of its search box: an MLflow search expression (other text
    becomes a run-name match). Filtered alone, the table shows the children's parent, collapsed, with the
    children one click away: it fetches the parents of what it found, and whether a parent is expanded lives
    in the browser's storage, not in the URL. A sort other than by date (`orderByKey`) lists runs flat."""
    query = {**TRAINING_VIEW, "searchFilter": f"tags.mlflow.parentRunId = '{parent_run_id}'",
             "orderByKey": f"metrics.`{order_by}`" if order_by else "tags.`mlflow.runName`", "orderByAsc": "true"}
    return f"{base}/#/experiments/{experiment_id}/runs?{urlencode(query, quote_via=quote)}"


def ui_hint(tracking_uri: str, experiment: str, experiment_id: str, parent_run_id: str,
            order_by: Optional[str] = None) -> list[str]:
    """The lines a command prints at its end to say how to open its runs in the MLflow UI: the links for a
    tracking server; for a SQLite store, the command that serves it and the links it will serve."""
    head = f"MLflow: experiment {experiment!r}, parent run {parent_run_id}"
    if tracking_uri.startswith(("http://", "https://")):
        base = browser_base(tracking_uri)
        return [f"{head}; open", f"  its child runs: {children_url(base, experiment_id, parent_run_id, order_by)}",
                f"  the parent run: {run_url(base, experiment_id, parent_run_id)}"]
    db = sqlite_path(tracking_uri)
    if db is None:  # databricks: its own workspace UI
        return [f"{head} in {tracking_uri}"]
    store = str(db.parent) if db.name == STORE_FILE else tracking_uri
    command = shlex.join([python_command(), "-m", "rekd.ui", store, "--experiment", experiment])
    base = f"http://{HOST}:{DEFAULT_PORT}"
    return [f"{head}; serve the MLflow UI with", f"  {command}",
            f"  then open its child runs: {children_url(base, experiment_id, parent_run_id, order_by)}",
            f"  or the parent run: {run_url(base, experiment_id, parent_run_id)}"]


def browser_base(tracking_uri: str) -> str:
    """The server's address as a browser link: without credentials (a browser asks for them), query or slash."""
    parts = urlsplit(tracking_uri)
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1], query="", fragment="").geturl().rstrip("/")
