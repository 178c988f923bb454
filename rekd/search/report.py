"""The end of a search: the top trials, the best config (or, with several objectives, the Pareto front:
rekd.search.front), the epochs early stopping saved, Optuna's plots.

The same summary is printed for the user and logged to the search's MLflow parent run.
"""
from __future__ import annotations

import json
import shlex
import warnings as warnings_module
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mlflow.entities import Metric, Param, RunTag

from rekd.search import trial_storage
from rekd.cli import python_command
from rekd.search.front import Front, make_front, plot as plot_front, write_csv
from rekd.search.ranking import rank_key
from rekd.tracking.tags import OUTCOME_TAG
from rekd.tracking import outcomes
from rekd.tracking.links import ui_hint

TOP = 5
RANK_METRIC = "rank"  # on each trial's run at the end: its place by rekd.search.ranking, 1 = best
FRONT_METRIC = "pareto_front"  # several objectives: a full-budget trial's front number, 1 = on the Pareto front
HYPERVOLUME_METRIC = "hypervolume"  # the parent's, per step = epochs trained (rekd.search.front)
EDGE = 0.05  # a best value within 5% of a bound suggests the range is too narrow (tuning playbook)


@dataclass
class TrialRow:
    trial_id: str
    params: dict
    value: float  # the metric at the trial's last epoch
    epochs: int
    outcome: str  # rekd.tracking.outcomes.SUMMARY_OUTCOMES
    values: dict = field(default_factory=dict)  # every objective at the last epoch
    settings: dict = field(default_factory=dict)  # the trial's whole config


@dataclass
class Summary:
    metric: str
    mode: str
    rows: list[TrialRow]
    best: TrialRow | None
    counts: dict[str, int]
    epochs_spent: int  # every trial's epochs, the interrupted ones' included
    epochs_budget: int  # full length for every trial that ended (not interrupted, not yet started)
    epochs_saved: int  # of that budget, what trials that ended early (ASHA, failures) did not run
    not_started: int  # trials of num_samples that never started (an interrupted search)
    artifacts: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    front: Optional[Front] = None  # several objectives only

    def ranked(self) -> list[TrialRow]:
        """Every row, best first by rekd's rule (rekd.search.ranking): by the metric, or by Pareto front."""
        if self.front is not None:
            return [row for row, _ in self.front.ranked]
        return sorted(self.rows, key=sort_key(self.mode))

    def metrics(self) -> dict[str, float]:
        # Every outcome, zeros included: a resumed search's summary replaces the interrupted one's counts.
        out = {f"trials_{k}": float(self.counts.get(k, 0)) for k in sorted({*outcomes.SUMMARY_OUTCOMES, *self.counts})}
        out.update(epochs_spent=float(self.epochs_spent), epochs_budget=float(self.epochs_budget),
                   epochs_saved_fraction=self.epochs_saved / max(self.epochs_budget, 1),
                   trials_not_started=float(self.not_started))
        if self.front is not None:
            out["pareto_size"] = float(len(self.front.points))
        elif self.best is not None:
            out[f"best_{self.metric}"] = self.best.value
        return out

    def log_to(self, tracker, final: bool) -> None:
        """The summary onto the search's parent run, through the tracker's queue. An interrupted search's
        summary is provisional: metrics and tags, which a resume overwrites (a later timestamp wins), but
        not the best config as params, which MLflow never lets change: those are logged once, at the end."""
        front = self.front
        params = [Param(f"best.{k}", str(v)) for k, v in sorted(self.best.params.items())] \
            if self.best and final and front is None else []
        tags = [RunTag("rekd.best_trial", self.best.trial_id)] if self.best and front is None else []
        if front is not None:  # tags, not params: a resumed search's front replaces the interrupted one's
            tags.append(RunTag("rekd.pareto_trials", ",".join(r.trial_id for r in front.points)[:5000]))
            tags += [RunTag(k, v) for k, v in front.box().items()]
        if final:  # an interruption tags the parent itself (rekd.search.driver), summary or not
            tags.append(RunTag(OUTCOME_TAG, outcomes.FINISHED))
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in self.metrics().items()]
        if front is not None:
            metrics += [Metric(HYPERVOLUME_METRIC, hv, now, spent) for spent, hv in front.curve]
        tracker.log_parent(metrics=metrics, params=params, tags=tags)
        # Each trial's place by rekd's ranking (1 = best), so that MLflow's runs table, sorted by it, shows the
        # order rekd.best uses: sorted by the metric, it would break ties its own way.
        numbers = {row.trial_id: number for row, number in front.ranked} if front is not None else {}
        for place, row in enumerate(self.ranked(), start=1):
            extra = [Metric(FRONT_METRIC, float(numbers[row.trial_id]), now, 0)] \
                if row.outcome == outcomes.COMPLETED and row.trial_id in numbers else []
            tracker.log_trial(row.trial_id, metrics=[Metric(RANK_METRIC, float(place), now, 0), *extra])
        for path in self.artifacts:
            tracker.log_parent_artifact(str(path), "summary")

    def print(self, plan, experiment_id: str, parent_run_id: str) -> None:
        metric, study = self.metric, plan.study
        ranked = self.ranked()
        how = "interrupted" if "interrupted" in self.counts or self.not_started else "finished"
        counts = [f"{v} {k}" for k, v in sorted(self.counts.items())]
        counts += [f"{self.not_started} not started"] if self.not_started else []
        print(f"\nsearch {plan.name} {how}: " + ", ".join(counts))
        names = [p.name for p in study.params]
        if self.front is not None:
            self.print_front(names)
        else:
            print(f"top {min(TOP, len(ranked))} trials by {metric} at their last epoch:")
            print_rows(ranked[:TOP], [metric], names)
        if self.best is not None and self.front is None:
            settings = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.best.params.items())
            print(f"best config ({self.best.outcome}, {metric}={self.best.value:.4f}): {settings}")
        ended = sum(v for k, v in self.counts.items() if k != "interrupted")
        if ended:
            saved = f"early stopping saved {self.epochs_saved} ({self.epochs_saved / max(self.epochs_budget, 1):.0%})" \
                if study.early_stopping else f"no early stopping (failures saved {self.epochs_saved})"
            print(f"{ended} trials ended after {self.epochs_budget - self.epochs_saved} of the {self.epochs_budget} "
                  f"epochs they would have run at full length: {saved}")
        for warning in self.warnings:
            print(f"warning: {warning}")
        print(f"results: {plan.folder} (what Ray, MLflow and Optuna logged: driver.log)")
        if plan.storage_path != str(plan.local_path):
            print(f"trials and checkpoints: {trial_storage.join(plan.storage_path, plan.name)}")
        print("\n".join(ui_hint(plan.tracking_uri, plan.experiment, experiment_id, parent_run_id, RANK_METRIC)))
        if how == "finished":
            print(f"next: {best_command(plan)}")


    def print_front(self, names: list[str]) -> None:
        front = self.front
        said = ", ".join(f"{m} {mode}" for m, mode in front.objectives)
        full = sum(1 for r in self.rows if r.outcome == outcomes.COMPLETED)
        if not front.points:
            print(f"no Pareto front ({said}): no trial ran the full budget with finite values")
            return
        print(f"Pareto front ({said}) of the {full} trials that ran the full budget: {len(front.points)} "
              f"non-dominated; hypervolume {front.hypervolume:.4f} (share of the box from the best value seen to "
              f"10 % past the worst, per objective)")
        print_rows(front.points, [m for m, _ in front.objectives], names)


def print_rows(rows: list[TrialRow], metrics: list[str], names: list[str]) -> None:
    """Trials as a table: id, the metrics, epochs, outcome, the searched settings."""
    print("  " + "  ".join([f"{'trial':<14}", *(f"{m:>9}" for m in metrics), "epochs", f"{'outcome':<13}"] + names))
    for row in rows:
        settings = [(f"{row.params.get(n, float('nan')):.4g}" if isinstance(row.params.get(n), float)
                     else str(row.params.get(n))).rjust(len(n)) for n in names]
        shown = [row.values.get(m, row.value if m == metrics[0] else math.nan) for m in metrics]
        print("  " + "  ".join([f"{row.trial_id:<14}", *(f"{number(v):>9}" for v in shown), f"{row.epochs:>6}",
                                f"{row.outcome:<13}"] + settings))


def number(value: float) -> str:
    """Accuracies to 4 decimals; SOPs, connections and small energies to 4 significant digits."""
    return f"{value:.4f}" if value == 0 or 0.01 <= abs(value) < 10 else f"{value:.4g}"


def best_command(plan) -> str:
    """The rekd.best command for this search, runnable as printed from any folder: this interpreter, and
    the store named (the default one is relative to the current folder; MLFLOW_TRACKING_URI may differ)."""
    pick = ["--pareto", "--out", "front.yaml"] if plan.study.multi_objective else ["--top", "3", "--out", "best.yaml"]
    return shlex.join([python_command(), "-m", "rekd.best", plan.experiment, *pick, "--tracking-uri", plan.tracking_uri])


def sort_key(mode: str):
    """rekd's one ranking rule (rekd.search.ranking) over summary rows."""
    return lambda r: rank_key(r.outcome, r.value, r.trial_id, mode)


def summarize(plan, results, optuna_url: str, experiment_dir: Path, interrupted: set[str] = frozenset()) -> Summary:
    """The summary of the trials Tune returned; `interrupted`: ids of the trials an interruption stopped."""
    study = plan.study
    searched = [p.name for p in study.params]
    rows, events = [], []
    for result in results:
        last = result.metrics or {}
        epochs = int(last.get("epoch", 0))
        trial_id = str(last.get("trial_id") or trial_name_of(result.path))
        outcome = outcomes.INTERRUPTED if trial_id in interrupted else \
            outcomes.ended(last, study.epochs, errored=bool(result.error))
        value = last.get(study.metric)
        rows.append(TrialRow(
            trial_id=trial_id,
            params={k: result.config.get(k) for k in searched},
            value=float(value) if isinstance(value, (int, float)) else math.nan,
            epochs=epochs, outcome=outcome,
            values={m: float(last[m]) if isinstance(last.get(m), (int, float)) else math.nan
                    for m, _ in study.objectives},
            settings=dict(result.config or {}),
        ))
        events += reported_epochs(result, trial_id)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.outcome] = counts.get(row.outcome, 0) + 1
    front = make_front(study.objectives, rows, events) if study.multi_objective else None
    if front is not None:  # the first point of the front by the rule; a stopped trial only when none completed
        usable = [r for r, _ in front.ranked if r.outcome in (outcomes.COMPLETED, outcomes.STOPPED_EARLY)
                  and all(math.isfinite(v) for v in r.values.values())]
        best = usable[0] if usable else None
    else:
        candidates = [r for r in rows if r.outcome == outcomes.COMPLETED and math.isfinite(r.value)] or \
                     [r for r in rows if r.outcome == outcomes.STOPPED_EARLY and math.isfinite(r.value)]
        best = sorted(candidates, key=sort_key(study.mode))[0] if candidates else None
    ended = [r for r in rows if r.outcome != outcomes.INTERRUPTED]
    summary = Summary(study.metric, study.mode, rows, best, counts, sum(r.epochs for r in rows),
                      epochs_budget=len(ended) * study.epochs,
                      epochs_saved=sum(max(study.epochs - r.epochs, 0) for r in ended),
                      not_started=max(study.num_samples - len(rows), 0), front=front)
    if best is not None and front is None:
        summary.warnings += edge_warnings(study, best.params)
    table = experiment_dir / "summary.json"
    extra = {} if front is None else {
        "objectives": [{"metric": m, "mode": mode} for m, mode in front.objectives],
        "pareto_front": [r.trial_id for r in front.points], "hypervolume_curve": front.curve,
        "hypervolume_ideal": front.ideal, "hypervolume_reference": front.reference}
    table.write_text(json.dumps({"rows": [r.__dict__ for r in rows], "counts": counts,
                                 "best": best.__dict__ if best else None,
                                 "epochs_spent": summary.epochs_spent, "epochs_budget": summary.epochs_budget,
                                 "epochs_saved": summary.epochs_saved, "not_started": summary.not_started, **extra},
                                indent=2, default=str))
    summary.artifacts = [table]
    if front is not None and front.points:
        summary.artifacts += [write_csv(front, searched, experiment_dir / "pareto_front.csv"),
                              plot_front(front, plan.name, experiment_dir / "pareto_front.png")]
    summary.artifacts += optuna_plots(optuna_url, plan.name, experiment_dir, summary.warnings,
                                      list(study.objectives) if front is not None else None)
    return summary


def reported_epochs(result, trial_id: str) -> list[tuple[float, str, int]]:
    """(timestamp, trial id, epoch) of every epoch the trial reported, from Tune's record of its results;
    its last result alone when that record cannot be read."""
    frame = getattr(result, "metrics_dataframe", None)
    if frame is not None and not frame.empty and {"timestamp", "epoch"} <= set(frame.columns):
        rows = frame[["timestamp", "epoch"]].dropna()
        return [(float(t), trial_id, int(e)) for t, e in zip(rows["timestamp"], rows["epoch"])]
    last = result.metrics or {}
    epochs = int(last.get("epoch", 0))
    return [(float(last.get("timestamp", 0)), trial_id, e) for e in range(1, epochs + 1)]


def trial_name_of(path: str) -> str:
    """The trial id in a trial folder's name (`trial_<id>`, rekd.search.driver.trial_name)."""
    return path.rstrip("/").rsplit("/", 1)[-1].removeprefix("trial_")


def edge_warnings(study, best_params: dict) -> list[str]:
    warnings = []
    for p in study.params:
        value = best_params.get(p.name)
        if p.kind == "categorical" or not isinstance(value, (int, float)):
            continue
        lo, hi = (math.log(p.low), math.log(p.high)) if p.kind == "loguniform" else (p.low, p.high)
        x = math.log(value) if p.kind == "loguniform" else value
        for bound, name in ((lo, "low"), (hi, "high")):
            if abs(x - bound) <= EDGE * (hi - lo):
                warnings.append(f"the best {p.name}={value:.4g} sits at the {name} edge of its range "
                                f"[{p.low:g}, {p.high:g}]; consider widening it")
    return warnings


def optuna_plots(optuna_url: str, study_name: str, out_dir: Path, warnings: list[str],
                 objectives: Optional[list[tuple[str, str]]] = None) -> list[Path]:
    """Optimization history, parallel coordinates and parameter importances as PNG files; with several
    objectives, one of each per objective (`<plot>_<metric>.png`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings_module.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    ot_study = optuna.load_study(study_name=study_name, storage=optuna_url)
    paths = []
    targets = [("", {})] if not objectives else [
        (f"_{metric}", {"target": lambda t, i=i: t.values[i], "target_name": metric})
        for i, (metric, _) in enumerate(objectives)]
    for name, plot, (suffix, target) in ((n, p, t) for n, p in (
            ("optimization_history", ovm.plot_optimization_history),
            ("parallel_coordinate", ovm.plot_parallel_coordinate),
            ("param_importances", ovm.plot_param_importances)) for t in targets):
        name += suffix
        try:
            plot(ot_study, **target)
        except Exception as e:  # e.g. importances need two or more completed trials
            warnings.append(f"no {name} plot: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            plt.close("all")
            continue
        path = out_dir / f"{name}.png"
        plt.gcf().set_size_inches(9, 6)
        plt.tight_layout()
        plt.savefig(path, dpi=100)
        plt.close("all")
        paths.append(path)
    return paths
