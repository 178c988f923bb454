"""`python -m rekd.best EXPERIMENT --top K --out best.yaml`: the best trials of a search, read back from MLflow.

Takes the newest search in the experiment (or `--search NAME`), ranks its trials that ran the full budget
by the search's metric, and writes their complete settings to a YAML file that rekd.final takes.
"""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import yaml

from rekd.cli import Parser, python_command, run
from rekd.config import FIELD_TYPES, TrainConfig, parse_value
from rekd.errors import UsageError
from rekd.search.ranking import RULE, rank_key
from rekd.tracking import outcomes

PROG = "python -m rekd.best"


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Write the top configurations of a search to a YAML file for rekd.final.")
    p.add_argument("experiment", help="the MLflow experiment of the search (rekd-<study> by default)")
    p.add_argument("--top", type=int, default=3, help="how many configurations (default 3)")
    p.add_argument("--out", default="best.yaml", help="the YAML file to write (default best.yaml)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else the store "
                                          "./rekd-results/mlflow.db that searches run in this folder use)")
    p.add_argument("--search", help="the search's name (default: the newest search in the experiment)")
    p.add_argument("--include-stopped", action="store_true",
                   help="also rank trials ASHA stopped early (their metric is from a shorter budget)")
    return p


def settings_from_params(params: dict[str, str], source: str) -> dict:
    """A trial's logged params back into typed TrainConfig settings (validated)."""
    settings = {k: parse_value(k, v, FIELD_TYPES[k]) for k, v in params.items() if k in FIELD_TYPES}
    return TrainConfig.from_dict(settings, source=source).to_dict()


def find_search(client, experiment_id: str, name: Optional[str]):
    query = "tags.`rekd.role` = 'search'"
    if name:
        query += f" and tags.`rekd.search` = '{name}'"
    runs = client.search_runs([experiment_id], filter_string=query, order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise UsageError(f"no search {'named ' + repr(name) + ' ' if name else ''}in this experiment")
    return runs[0]


def describe_search(parent, experiment: str, newest: bool) -> str:
    """The line that says which search the ranking comes from, and whether it ended."""
    tags = parent.data.tags
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(parent.info.start_time / 1000))
    outcome = tags.get("rekd.outcome", parent.info.status.lower())
    trials = parent.data.params.get("num_samples", "?")
    line = (f"search {tags.get('rekd.search', parent.info.run_name)} ({'the newest ' if newest else ''}in experiment "
            f"{experiment!r}, started {started}, {trials} trials, {outcome}; parent run {parent.info.run_id})")
    return line


def best_trials(client, experiment_id: str, parent, top: int, include_stopped: bool) -> list[dict]:
    metric, mode = parent.data.params.get("metric", "val_acc"), parent.data.params.get("mode", "max")
    children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  max_results=10000)
    allowed = {outcomes.COMPLETED, outcomes.STOPPED_EARLY} if include_stopped else {outcomes.COMPLETED}
    scored = [r for r in children if r.data.tags.get("rekd.outcome") in allowed and metric in r.data.metrics]
    scored.sort(key=lambda r: rank_key(r.data.tags["rekd.outcome"], r.data.metrics[metric],
                                       r.data.tags.get("rekd.trial_id", r.info.run_id), mode))
    return [{
        "rank": rank,
        "run_id": r.info.run_id,
        "trial_id": r.data.tags.get("rekd.trial_id", ""),
        metric: r.data.metrics[metric],
        "outcome": r.data.tags.get("rekd.outcome"),
        "settings": settings_from_params(r.data.params, f"run {r.info.run_id}"),
    } for rank, r in enumerate(scored[:top], start=1)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(_main, PROG, argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    from rekd.tracking.runs import client_for, first_line
    from rekd.search.state import default_store_uri
    from rekd.tracking.store import RESULTS_FOLDER, check_tracking_uri, pick_tracking_uri, sqlite_path

    args = build_parser().parse_args(argv)
    if args.top < 1:
        raise UsageError(f"--top {args.top} is not allowed; allowed: an integer >= 1")
    uri, source = pick_tracking_uri([(args.tracking_uri, "--tracking-uri")], (
        default_store_uri(Path(RESULTS_FOLDER)), "the default store (no --tracking-uri or MLFLOW_TRACKING_URI)"))
    store = sqlite_path(uri)
    if store is not None and not store.exists():
        # MLflow would create an empty store there; a typo must not leave a new database behind.
        raise UsageError(f"no MLflow store at {store}; check {source}")
    check_tracking_uri(uri, source)  # only reads: nothing may be created, whatever the form
    try:
        client = client_for(uri)  # opening a broken store fails here already
        experiment = client.get_experiment_by_name(args.experiment)
        names = [e.name for e in client.search_experiments()] if experiment is None else []
    except Exception as e:  # unreachable server, unreadable store
        raise UsageError(f"MLflow tracking store {uri!r} cannot be read: {first_line(e)}") from None
    if experiment is None:
        raise UsageError(f"unknown experiment {args.experiment!r} in {uri}; allowed: {', '.join(sorted(names)) or 'none yet'}")
    parent = find_search(client, experiment.experiment_id, args.search)
    print(describe_search(parent, args.experiment, args.search is None), flush=True)
    if parent.data.tags.get("rekd.outcome", "finished") != "finished":
        print(f"warning: search {parent.info.run_name} is {parent.data.tags['rekd.outcome']}, not finished: "
              "its ranking covers only the trials it has so far", file=sys.stderr)
    configs = best_trials(client, experiment.experiment_id, parent, args.top, args.include_stopped)
    if not configs:
        raise UsageError(f"search {parent.info.run_name!r} has no {'finished' if args.include_stopped else 'completed'} "
                         "trials to rank" + ("" if args.include_stopped else "; --include-stopped also ranks ASHA-stopped ones"))
    document = {
        "experiment": args.experiment, "search": parent.data.tags.get("rekd.search", parent.info.run_name),
        "parent_run_id": parent.info.run_id, "tracking_uri": uri,
        "metric": parent.data.params.get("metric", "val_acc"), "mode": parent.data.params.get("mode", "max"),
        "searched": sorted(k.removeprefix("space.") for k in parent.data.params if k.startswith("space.")),
        "ranked_by": RULE,
        "configs": configs,
    }
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(yaml.safe_dump(document, sort_keys=False))
        tmp.replace(out)
    except OSError as e:
        raise UsageError(f"--out {out} cannot be written ({e.strerror or e})") from None
    metric = document["metric"]
    for c in configs:
        searched = {k: c["settings"][k] for k in document["searched"]}
        print(f"#{c['rank']} {metric}={c[metric]:.4f} trial {c['trial_id']}: "
              + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in searched.items()))
    print(f"wrote {len(configs)} configuration(s) of search {document['search']} to {out}; "
          f"next: {python_command()} -m rekd.final {shlex.quote(str(out))} --seeds 3")
    return 0
