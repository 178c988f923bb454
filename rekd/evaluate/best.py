"""`python -m rekd.best EXPERIMENT --top K --out best.yaml`: the best trials of a search, read back from MLflow.

Takes the newest search in the experiment (or `--search NAME`), ranks its trials that ran the full budget
by the search's metric, and writes their complete settings to a YAML file that rekd.final takes. A search
with several objectives is ranked by Pareto front (rekd.search.ranking.pareto_ranked); `--pareto` writes
its whole front instead of the top K.
"""
from __future__ import annotations

import math
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import yaml

from rekd.cli import Parser, python_command, run
from rekd.config import FIELD_TYPES, TrainConfig, parse_value
from rekd.errors import UsageError
from rekd.search.ranking import MODES, PARETO_RULE, RULE, pareto_ranked, rank_key
from rekd.search.study import parse_objectives_text
from rekd.tracking.tags import OUTCOME_TAG, SEARCH_TAG, TRIAL_TAG
from rekd.tracking import outcomes

PROG = "python -m rekd.best"
DEFAULT_TOP = 3
FRONT_RULE = ("the Pareto front of the full-budget trials by the objectives at the last epoch (a NaN never on it), "
              "in the order: " + PARETO_RULE)


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Write the top configurations of a search to a YAML file for rekd.final.")
    p.add_argument("experiment", help="the MLflow experiment of the search (rekd-<study> by default)")
    # None, not 3: --pareto must tell an explicit --top from the default to refuse it.
    p.add_argument("--top", type=int, default=None, help=f"how many configurations (default {DEFAULT_TOP})")
    p.add_argument("--pareto", action="store_true",
                   help="write every configuration on the Pareto front of a search with several objectives")
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
    outcome = tags.get(OUTCOME_TAG, parent.info.status.lower())
    trials = parent.data.params.get("num_samples", "?")
    line = (f"search {tags.get(SEARCH_TAG, parent.info.run_name)} ({'the newest ' if newest else ''}in experiment "
            f"{experiment!r}, started {started}, {trials} trials, {outcome}; parent run {parent.info.run_id})")
    return line


def objectives_of(parent) -> list[tuple[str, str]]:
    """The search's (metric, mode) pairs from its `objectives` param (`val_acc:max,energy_uj:min`); a search
    made before there could be several has only `metric` and `mode`."""
    params = parent.data.params
    text = params.get("objectives") or f"{params.get('metric', 'val_acc')}:{params.get('mode', 'max')}"
    pairs = parse_objectives_text(text)
    if pairs is None:
        raise UsageError(f"search run {parent.info.run_id}: param objectives={text!r} is not a list of metric:mode "
                         f"pairs (mode {' or '.join(MODES)}), as rekd.search writes it")
    return pairs


def _outcome(run) -> str:
    return run.data.tags.get(OUTCOME_TAG, "")


def _trial_id(run) -> str:
    return run.data.tags.get(TRIAL_TAG, run.info.run_id)


def ranked_trials(client, experiment_id: str, parent, objectives: list[tuple[str, str]],
                  include_stopped: bool) -> list[tuple[object, Optional[int]]]:
    """The search's rankable trials best first, each with its front number (None with one objective): by RULE
    with one objective, by PARETO_RULE with several."""
    children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  max_results=10000)
    allowed = {outcomes.COMPLETED, outcomes.STOPPED_EARLY} if include_stopped else {outcomes.COMPLETED}
    metrics = [m for m, _ in objectives]
    scored = [r for r in children if _outcome(r) in allowed and all(m in r.data.metrics for m in metrics)]
    if len(objectives) == 1:
        metric, mode = objectives[0]
        scored.sort(key=lambda r: rank_key(_outcome(r), r.data.metrics[metric], _trial_id(r), mode))
        return [(r, None) for r in scored]
    return pareto_ranked(scored, _outcome, lambda r: [r.data.metrics[m] for m in metrics], _trial_id,
                         [mode for _, mode in objectives])


def on_front(ranked: list[tuple[object, Optional[int]]], objectives: list[tuple[str, str]]) -> list:
    """The full-budget trials of the first front, in ranked order. With no finite point at all the NaN points
    make the first front, so finiteness is checked here too."""
    return [(r, front) for r, front in ranked if front == 1 and _outcome(r) == outcomes.COMPLETED
            and all(math.isfinite(r.data.metrics[m]) for m, _ in objectives)]


def config_entry(rank: int, run, objectives: list[tuple[str, str]], front: Optional[int]) -> dict:
    """One configuration of the file: the first objective under its own key as before (readers of a
    single-objective file keep working), every objective and the front when there are several."""
    metric = objectives[0][0]
    entry = {"rank": rank, "run_id": run.info.run_id, "trial_id": run.data.tags.get(TRIAL_TAG, ""),
             metric: run.data.metrics[metric]}
    if len(objectives) > 1:
        entry["objectives"] = {m: run.data.metrics[m] for m, _ in objectives}
        entry["front"] = front
    entry["outcome"] = run.data.tags.get(OUTCOME_TAG)
    entry["settings"] = settings_from_params(run.data.params, f"run {run.info.run_id}")
    return entry


def check_flags(args) -> None:
    """What the flags alone rule out, before any store is read."""
    if args.top is not None and args.top < 1:
        raise UsageError(f"--top {args.top} is not allowed; allowed: an integer >= 1")
    if args.pareto and args.include_stopped:
        raise UsageError("--pareto takes full-budget trials only: ASHA-stopped trials' values come from a shorter "
                         "budget and do not compare with theirs; drop --include-stopped")
    if args.pareto and args.top is not None:
        raise UsageError(f"--pareto writes the whole Pareto front, however many points it has; drop --top {args.top} "
                         "(or drop --pareto to rank the top K by front and crowding distance)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(_main, PROG, argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    check_flags(args)
    client, experiment_id, uri = open_experiment(args)
    parent = find_search(client, experiment_id, args.search)
    print(describe_search(parent, args.experiment, args.search is None), flush=True)
    name = parent.data.tags.get(SEARCH_TAG, parent.info.run_name)
    objectives = objectives_of(parent)
    several = len(objectives) > 1
    if args.pareto and not several:
        metric, mode = objectives[0]
        raise UsageError(f"search {name!r} has one objective, {metric} ({mode}): it has no Pareto front; "
                         f"--top ranks its trials by {metric}")
    if parent.data.tags.get(OUTCOME_TAG, outcomes.FINISHED) != outcomes.FINISHED:
        print(f"warning: search {parent.info.run_name} is {parent.data.tags[OUTCOME_TAG]}, not finished: "
              "its ranking covers only the trials it has so far", file=sys.stderr)
    ranked = ranked_trials(client, experiment_id, parent, objectives, args.include_stopped)
    chosen = on_front(ranked, objectives) if args.pareto else ranked[:args.top or DEFAULT_TOP]
    if not chosen and args.pareto:
        raise UsageError(f"search {name!r} has no completed trial with every objective finite: its Pareto front is empty")
    if not chosen:
        raise UsageError(f"search {parent.info.run_name!r} has no {'finished' if args.include_stopped else 'completed'} "
                         "trials to rank" + ("" if args.include_stopped else "; --include-stopped also ranks ASHA-stopped ones"))
    document = {
        "experiment": args.experiment, "search": name,
        "parent_run_id": parent.info.run_id, "tracking_uri": uri,
        "metric": objectives[0][0], "mode": objectives[0][1],
        "searched": sorted(k.removeprefix("space.") for k in parent.data.params if k.startswith("space.")),
        "ranked_by": FRONT_RULE if args.pareto else PARETO_RULE if several else RULE,
    }
    if several:  # a single-objective file stays as it was
        document["objectives"] = [{"metric": m, "mode": mode} for m, mode in objectives]
        document["pareto"] = args.pareto
    document["configs"] = [config_entry(rank, r, objectives, front) for rank, (r, front) in enumerate(chosen, start=1)]
    out = Path(args.out)
    write_yaml(out, document)
    if several and not args.pareto:
        print(f"note: search {name} has {len(objectives)} objectives: --top ranks its trials by Pareto front, then "
              "crowding distance; --pareto writes the whole front")
    for c in document["configs"]:
        print(config_line(c, document, args.pareto))
    what = f"the Pareto front of search {name}" if args.pareto else f"search {name}"
    print(f"wrote {len(document['configs'])} configuration(s) of {what} to {out}; "
          f"next: {python_command()} -m rekd.final {shlex.quote(str(out.resolve()))} --seeds 3")  # from any folder
    return 0


def open_experiment(args) -> tuple[object, str, str]:
    """(client, experiment id, tracking URI) of the experiment named on the command line; nothing is created."""
    from rekd.tracking.runs import client_for, first_line
    from rekd.search.state import default_store_uri
    from rekd.tracking.store import RESULTS_FOLDER, check_tracking_uri, pick_tracking_uri, sqlite_path

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
    return client, experiment.experiment_id, uri


def write_yaml(out: Path, document: dict) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(yaml.safe_dump(document, sort_keys=False))
        tmp.replace(out)  # whole or not at all
    except OSError as e:
        raise UsageError(f"--out {out} cannot be written ({e.strerror or e})") from None


def config_line(c: dict, document: dict, pareto: bool) -> str:
    """One configuration as printed: its place, its objective values (its front too when ranked by front),
    its trial and its searched settings."""
    searched = {k: c["settings"][k] for k in document["searched"]}
    if "objectives" in c:
        scores = " ".join(f"{m}={v:.4g}" for m, v in c["objectives"].items())
        head = f"#{c['rank']} {scores}" if pareto else f"#{c['rank']} front {c['front']} {scores}"
    else:
        head = f"#{c['rank']} {document['metric']}={c[document['metric']]:.4f}"
    return f"{head} trial {c['trial_id']}: " + ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in searched.items())
