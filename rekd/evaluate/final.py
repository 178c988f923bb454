"""`python -m rekd.final best.yaml --seeds 3`: the chosen configs and the baseline at full length, same seeds,
scored on the test split (tuning only ever saw the validation split).

For every seed the baseline is trained first; it is also the teacher sparse_kd configs of that seed
distil from (the paper's protocol: the baseline student is its own teacher). Reports test accuracy
mean +- std per config and the improvement over the baseline paired by seed, and tracks every run in
MLflow under one parent run, through the queued writer (rekd.tracking.writer): an unreachable tracking
server never stops the runs; what it never received is named in a warning at the end, and the results
are in the --out files all the same.

A file with several objectives (a Pareto front from `rekd.best --pareto`) also gets each objective's final
counterpart per config, mean +- std over seeds, and whether the config stays non-dominated among the file's
configs once its seeds are averaged: a front picked on one seed's validation values may not hold.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional, Sequence

from mlflow.entities import Metric

from rekd.cli import Parser, run
from rekd.config import TrainConfig, read_settings_file
from rekd.errors import UsageError
from rekd.evaluate.structure_table import COSTS
from rekd.search import pareto
from rekd.search.ranking import MODES
from rekd.search.study import METRICS
from rekd.stats import mean_std, paired
from rekd.snn.teachers import cpu_weights, dense_baseline, store_teacher
from rekd.tracking.outcomes import run_status
from rekd.tracking.runs import create_parent_run, numeric_metrics
from rekd.tracking.tags import ROLE_TAG
from rekd.tracking.store import check_tracking_uri, open_store, pick_tracking_uri
from rekd.tracking.writer import FAILED_GRACE_S, GRACE_S, RunWriter, warn_unlogged
from rekd.train.loop import resolve, train
from rekd.tracking.links import ui_hint

PROG = "python -m rekd.final"
CHILD_ROLE = "final_run"
# An objective's value in a final run: accuracy is scored on the test split (tuning only saw validation);
# every other objective is the run's last-epoch value as train() reports it.
FINAL_COUNTERPART = {"val_acc": "test_acc"}
PERCENT = ("test_acc", "train_acc", "density")  # fractions, shown in percent as the costs table does
COUNTS = ("sops", "macs", "connections")


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Train the best configs and the baseline under the same seeds; score on test.")
    p.add_argument("best", help="the YAML file written by rekd.best")
    p.add_argument("--seeds", type=int, default=3, help="seeds per config (default 3)")
    p.add_argument("--epochs", type=int, help="epochs of every run (default: the search's)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the one in the best file)")
    p.add_argument("--experiment", help="MLflow experiment (default: the search's)")
    p.add_argument("--out", default="final-results", help="folder for the table (default ./final-results)")
    return p


def load_configs(path: str, epochs: Optional[int]) -> tuple[dict, list[TrainConfig]]:
    document = read_settings_file(path)
    configs = document.get("configs")
    if not isinstance(configs, list) or not configs:
        raise UsageError(f"{path}: configs: expected a non-empty list, as rekd.best writes it")
    out = []
    for i, entry in enumerate(configs):
        if not isinstance(entry, dict) or not isinstance(entry.get("settings"), dict):
            raise UsageError(f"{path}: configs[{i}]: expected a mapping with 'settings'")
        cfg = TrainConfig.from_dict(entry["settings"], source=f"{path}: configs[{i}].settings")
        out.append(resolve(dataclasses.replace(cfg, epochs=epochs or cfg.epochs, teacher_epochs=None,
                                               eval_test=True)))
    return document, out


def load_objectives(path: str, document: dict) -> list[tuple[str, str]]:
    """The file's `objectives` as (metric, mode) pairs; empty unless there are two or more (one objective is
    the single-objective report, unchanged)."""
    items = document.get("objectives")
    if items is None:
        return []
    if not isinstance(items, list):
        raise UsageError(f"{path}: objectives: expected a list of {{metric, mode}}, as rekd.best writes it")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or item.get("metric") not in METRICS or item.get("mode") not in MODES:
            raise UsageError(f"{path}: objectives[{i}]: {item!r} is not allowed; allowed: {{metric: one of "
                             f"{', '.join(METRICS)}, mode: {' or '.join(MODES)}}}")
        out.append((item["metric"], item["mode"]))
    return out if len(out) > 1 else []


def counterpart(metric: str) -> str:
    return FINAL_COUNTERPART.get(metric, metric)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(_main, PROG, argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    if args.seeds < 1:
        raise UsageError(f"--seeds {args.seeds} is not allowed; allowed: an integer >= 1")
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs {args.epochs} is not allowed; allowed: an integer >= 1")
    document, configs = load_configs(args.best, args.epochs)
    objectives = load_objectives(args.best, document)
    # The dense baseline (also the teacher of sparse_kd configs), whatever students the configs train.
    baseline = dense_baseline(configs[0])
    uri = check_tracking_uri(*tracking_uri_of(args, document))
    experiment_name = args.experiment or document.get("experiment") or "rekd-final"
    client, experiment_id = open_store(uri, experiment_name)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    name = f"final-{time.strftime('%Y%m%d-%H%M%S')}"
    parent_id = create_parent_run(client, experiment_id, name, tags={ROLE_TAG: "final", "rekd.best_file": args.best})
    writer = RunWriter(uri, experiment_id, parent_id, child_run=final_run)
    labels = ["baseline"] + [f"#{i + 1} {c.mode}" for i, c in enumerate(configs)]
    scores: dict[str, list[float]] = {label: [] for label in labels}
    costs: dict[str, list[dict]] = {label: [] for label in labels}  # what each student costs, per seed
    finals: dict[str, list[dict]] = {label: [] for label in labels}  # the objectives' counterparts, per seed
    seeds = list(range(args.seeds))

    def record(label: str, result) -> None:
        scores[label].append(result.final["test_acc"])
        costs[label].append({k: result.final[k] for k in COSTS})
        finals[label].append({counterpart(m): result.final[counterpart(m)] for m, _ in objectives})

    try:
        for seed in seeds:
            base_cfg = dataclasses.replace(baseline, seed=seed)
            result = tracked_run(writer, "baseline", base_cfg)
            record("baseline", result)
            teacher_cfg = dataclasses.replace(base_cfg, teacher_epochs=base_cfg.epochs)
            store_teacher(teacher_cfg, cpu_weights(result.model), result.final["val_acc"])
            for label, cfg in zip(labels[1:], configs):
                cfg = dataclasses.replace(cfg, seed=seed, teacher_epochs=cfg.epochs)
                record(label, tracked_run(writer, label, cfg))
    except BaseException as e:
        writer.end(None, run_status(e))
        warn_unlogged(writer, writer.close(timeout=FAILED_GRACE_S))
        raise
    table = report(labels, configs, scores, costs, seeds, document)
    results = {"seeds": seeds, "test_acc": scores, "costs": costs}
    points = front_points(labels[1:], objectives, finals, document)
    if objectives:
        table += "\n\n" + objectives_report(points, objectives, seeds)
        results["objectives"] = [{"metric": m, "mode": mode, "final": counterpart(m)} for m, mode in objectives]
        results["points"] = points
    files = [out_dir / f"{name}.md", out_dir / f"{name}.json"]
    files[0].write_text(table + "\n")
    files[1].write_text(json.dumps(results, indent=2))
    summary = summary_metrics(labels, scores, costs, points, objectives)
    writer.log(None, metrics=[Metric(k, v, 0, 0) for k, v in summary.items()])
    for path in files:
        writer.log_artifact(None, str(path), artifact_path="final")
    writer.end(None, "FINISHED")
    unsent = writer.close(timeout=GRACE_S)
    print(table)
    print(f"\nsaved {out_dir / (name + '.md')}")
    print("\n".join(ui_hint(uri, experiment_name, experiment_id, parent_id)))
    warn_unlogged(writer, unsent, " and ".join(map(str, files)))
    writer.raise_if_crashed()
    return 0


def summary_metrics(labels: list[str], scores: dict, costs: dict, points: dict,
                    objectives: list[tuple[str, str]]) -> dict[str, float]:
    """The tables as metrics of the final parent run, under `<config>/`: test accuracy, costs, improvement,
    and with several objectives each one's mean and std and whether the config is non-dominated."""
    summary = {}
    for label in labels:
        mean, std = mean_std(scores[label])
        key = label.replace("#", "config").replace(" ", "_")
        summary[f"{key}/test_acc_mean"], summary[f"{key}/test_acc_std"] = mean, std
        for cost in COSTS:
            summary[f"{key}/{cost}_mean"] = mean_std([c[cost] for c in costs[label]])[0]
        if label != "baseline":
            summary[f"{key}/improvement_mean"] = paired(scores[label], scores["baseline"])[0]
        if label in points:
            for metric in (counterpart(m) for m, _ in objectives):
                stats = points[label][metric]
                summary[f"{key}/{metric}_mean"], summary[f"{key}/{metric}_std"] = stats["mean"], stats["std"]
            summary[f"{key}/non_dominated"] = float(points[label]["non_dominated"])
    return summary


def tracking_uri_of(args, document: dict) -> tuple[str, str]:
    """(the store, where it came from): --tracking-uri, else the best file's, else $MLFLOW_TRACKING_URI."""
    return pick_tracking_uri([(args.tracking_uri, "--tracking-uri"),
                              (document.get("tracking_uri") or None, f"{args.best}: tracking_uri")])


def final_run(key: str) -> tuple[str, dict[str, str]]:
    """The child run of one training run, keyed by its run name `<label> seed <seed>`: (name, tags)."""
    return key, {ROLE_TAG: CHILD_ROLE, "rekd.label": key.rsplit(" seed ", 1)[0]}


def tracked_run(writer: RunWriter, label: str, cfg: TrainConfig):
    """Train one config, mirroring each epoch's metrics into a child run of the final parent run (queued:
    training never waits for the tracking server)."""
    key = f"{label} seed {cfg.seed}"
    writer.start(key, cfg.to_dict())
    print(f"{label}, seed {cfg.seed}: training {cfg.epochs} epochs", flush=True)

    def on_epoch(metrics: dict) -> None:
        writer.log(key, numeric_metrics(metrics, metrics["epoch"], int(time.time() * 1000)))

    try:
        result = train(cfg, on_epoch=on_epoch)
    except BaseException as e:
        writer.end(key, run_status(e))
        raise
    writer.end(key, "FINISHED")
    print(f"{label}, seed {cfg.seed}: test_acc={result.final['test_acc']:.4f}", flush=True)
    return result


def report(labels: list[str], configs: list[TrainConfig], scores: dict, costs: dict, seeds: list[int],
           document: dict) -> str:
    searched = document.get("searched") or []
    lines = [f"Test accuracy over seeds {seeds} (mean ± std); improvement over the baseline paired by seed; what "
             "each student costs at its last epoch: conv density, and SOPs and energy per sample over the validation "
             "split (live synapses only).",
             "", "| config | settings | test acc | improvement | density | SOPs | energy (µJ) |",
             "|---|---|---|---|---|---|---|"]
    for label, cfg in zip(labels, [None] + configs):
        mean, std = mean_std(scores[label])
        settings = "" if cfg is None else ", ".join(f"{k}={getattr(cfg, k):.4g}" if isinstance(getattr(cfg, k), float)
                                                   else f"{k}={getattr(cfg, k)}" for k in searched)
        if label == "baseline":
            gain = "—"
        else:
            d_mean, d_std = paired(scores[label], scores["baseline"])
            gain = f"{100 * d_mean:+.2f} ± {100 * d_std:.2f} pts"
        cost = {k: mean_std([c[k] for c in costs[label]])[0] for k in COSTS}
        lines.append(f"| {label} | {settings} | {100 * mean:.2f} ± {100 * std:.2f} % | {gain} | "
                     f"{100 * cost['density']:.1f} % | {cost['sops']:,.0f} | {cost['energy_uj']:.3f} |")
    return "\n".join(lines)


def front_points(labels: list[str], objectives: list[tuple[str, str]], finals: dict, document: dict) -> dict:
    """Per config: its trial, each objective's counterpart over seeds ({mean, std, values}) and whether its
    means are non-dominated among the configs' means. Empty without objectives."""
    if not objectives:
        return {}
    entries = document.get("configs") or []
    points = {}
    for i, label in enumerate(labels):
        points[label] = {"trial_id": entries[i].get("trial_id") if i < len(entries) else None}
        for metric, _ in objectives:
            values = [seed[counterpart(metric)] for seed in finals[label]]
            mean, std = mean_std(values)
            points[label][counterpart(metric)] = {"mean": mean, "std": std, "values": values}
    means = [pareto.minimised([points[label][counterpart(m)]["mean"] for m, _ in objectives],
                              [mode for _, mode in objectives]) for label in labels]
    front = set(pareto.pareto_front(means))  # a NaN mean is never on it
    for i, label in enumerate(labels):
        points[label]["non_dominated"] = i in front
    return points


def _pm(metric: str, mean: float, std: float) -> str:
    if metric in PERCENT:
        return f"{100 * mean:.2f} ± {100 * std:.2f} %"
    if metric in COUNTS:
        return f"{mean:,.0f} ± {std:,.0f}"
    return f"{mean:.4g} ± {std:.2g}"


def objectives_report(points: dict, objectives: list[tuple[str, str]], seeds: list[int]) -> str:
    """The second table of a file with several objectives: one row per config."""
    finals = [counterpart(m) for m, _ in objectives]
    renamed = [f"{m} as {counterpart(m)}" for m, _ in objectives if counterpart(m) != m]
    lines = [f"The search's objectives in the final runs, mean ± std over seeds {seeds}: "
             + (f"{', '.join(renamed)}, scored on the test split; the others as " if renamed else "")
             + "each run's last-epoch value (SOPs, MACs, energy and firing rate over the validation split). "
             "Non-dominated: the config stays on the Pareto front of the file's configs by these means.",
             "", "| config | trial | " + " | ".join(f"{f} ({mode})" for f, (_, mode) in zip(finals, objectives))
             + " | non-dominated |", "|---|---|" + "---|" * len(finals) + "---|"]
    for label, point in points.items():
        cells = [_pm(f, point[f]["mean"], point[f]["std"]) for f in finals]
        lines.append(f"| {label} | {point['trial_id'] or ''} | " + " | ".join(cells)
                     + f" | {'yes' if point['non_dominated'] else 'no'} |")
    return "\n".join(lines)
