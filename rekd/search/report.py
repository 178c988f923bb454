"""The end of a search: the top trials, the best config, the epochs ASHA saved, Optuna's plots.

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

from mlflow.entities import Metric, Param, RunTag

from rekd.search import trial_storage
from rekd.cli import python_command
from rekd.search.ranking import rank_key
from rekd.tracking.runs import OUTCOME_TAG
from rekd.tracking import outcomes
from rekd.tracking.links import ui_hint

TOP = 5
RANK_METRIC = "rank"  # on each trial's run at the end: its place by rekd.search.ranking, 1 = best
EDGE = 0.05  # a best value within 5% of a bound suggests the range is too narrow (tuning playbook)


@dataclass
class TrialRow:
    trial_id: str
    params: dict
    value: float  # the metric at the trial's last epoch
    epochs: int
    outcome: str  # rekd.tracking.outcomes.SUMMARY_OUTCOMES


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

    def metrics(self) -> dict[str, float]:
        # Every outcome, zeros included: a resumed search's summary replaces the interrupted one's counts.
        out = {f"trials_{k}": float(self.counts.get(k, 0)) for k in sorted({*outcomes.SUMMARY_OUTCOMES, *self.counts})}
        out.update(epochs_spent=float(self.epochs_spent), epochs_budget=float(self.epochs_budget),
                   epochs_saved_fraction=self.epochs_saved / max(self.epochs_budget, 1),
                   trials_not_started=float(self.not_started))
        if self.best is not None:
            out[f"best_{self.metric}"] = self.best.value
        return out

    def log_to(self, tracker, final: bool) -> None:
        """The summary onto the search's parent run, through the tracker's queue. An interrupted search's
        summary is provisional: metrics and tags, which a resume overwrites (a later timestamp wins), but
        not the best config as params, which MLflow never lets change: those are logged once, at the end."""
        params = [Param(f"best.{k}", str(v)) for k, v in sorted(self.best.params.items())] \
            if self.best and final else []
        tags = [RunTag("rekd.best_trial", self.best.trial_id)] if self.best else []
        if final:  # an interruption tags the parent itself (rekd.search.driver), summary or not
            tags.append(RunTag(OUTCOME_TAG, "finished"))
        now = int(time.time() * 1000)
        tracker.log_parent(metrics=[Metric(k, v, now, 0) for k, v in self.metrics().items()], params=params, tags=tags)
        # Each trial's place by rekd's ranking (1 = best), so that MLflow's runs table, sorted by it, shows the
        # order rekd.best uses: sorted by the metric, it would break ties its own way.
        for place, row in enumerate(sorted(self.rows, key=sort_key(self.mode)), start=1):
            tracker.log_trial(row.trial_id, metrics=[Metric(RANK_METRIC, float(place), now, 0)])
        for path in self.artifacts:
            tracker.log_parent_artifact(str(path), "summary")

    def print(self, plan, experiment_id: str, parent_run_id: str) -> None:
        metric, study = self.metric, plan.study
        ranked = sorted(self.rows, key=sort_key(self.mode))
        how = "interrupted" if "interrupted" in self.counts or self.not_started else "finished"
        counts = [f"{v} {k}" for k, v in sorted(self.counts.items())]
        counts += [f"{self.not_started} not started"] if self.not_started else []
        print(f"\nsearch {plan.name} {how}: " + ", ".join(counts))
        names = [p.name for p in study.params]
        print(f"top {min(TOP, len(ranked))} trials by {metric} at their last epoch:")
        print("  " + "  ".join([f"{'trial':<14}", f"{metric:>9}", "epochs", f"{'outcome':<13}"] + names))
        for row in ranked[:TOP]:
            values = [f"{row.params.get(n, float('nan')):.4g}" if isinstance(row.params.get(n), float)
                      else str(row.params.get(n)) for n in names]
            print("  " + "  ".join([f"{row.trial_id:<14}", f"{row.value:>9.4f}", f"{row.epochs:>6}",
                                    f"{row.outcome:<13}"] + values))
        if self.best is not None:
            settings = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.best.params.items())
            print(f"best config ({self.best.outcome}, {metric}={self.best.value:.4f}): {settings}")
        ended = sum(v for k, v in self.counts.items() if k != "interrupted")
        if ended:
            print(f"{ended} trials ended after {self.epochs_budget - self.epochs_saved} of the {self.epochs_budget} "
                  f"epochs they would have run at full length: early stopping saved {self.epochs_saved} "
                  f"({self.epochs_saved / max(self.epochs_budget, 1):.0%})")
        for warning in self.warnings:
            print(f"warning: {warning}")
        print(f"results: {plan.folder} (what Ray, MLflow and Optuna logged: driver.log)")
        if plan.storage_path != str(plan.local_path):
            print(f"trials and checkpoints: {trial_storage.join(plan.storage_path, plan.name)}")
        print("\n".join(ui_hint(plan.tracking_uri, plan.experiment, experiment_id, parent_run_id, RANK_METRIC)))
        if how == "finished":
            print(f"next: {best_command(plan)}")


def best_command(plan) -> str:
    """The rekd.best command for this search, runnable as printed from any folder: this interpreter, and
    the store named (the default one is relative to the current folder; MLFLOW_TRACKING_URI may differ)."""
    return shlex.join([python_command(), "-m", "rekd.best", plan.experiment, "--top", "3", "--out", "best.yaml",
                       "--tracking-uri", plan.tracking_uri])


def sort_key(mode: str):
    """rekd's one ranking rule (rekd.search.ranking) over summary rows."""
    return lambda r: rank_key(r.outcome, r.value, r.trial_id, mode)


def summarize(plan, results, optuna_url: str, experiment_dir: Path, interrupted: set[str] = frozenset()) -> Summary:
    """The summary of the trials Tune returned; `interrupted`: ids of the trials an interruption stopped."""
    study = plan.study
    searched = [p.name for p in study.params]
    rows = []
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
        ))
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.outcome] = counts.get(row.outcome, 0) + 1
    candidates = [r for r in rows if r.outcome == outcomes.COMPLETED and math.isfinite(r.value)] or \
                 [r for r in rows if r.outcome == outcomes.STOPPED_EARLY and math.isfinite(r.value)]
    best = sorted(candidates, key=sort_key(study.mode))[0] if candidates else None
    ended = [r for r in rows if r.outcome != outcomes.INTERRUPTED]
    summary = Summary(study.metric, study.mode, rows, best, counts, sum(r.epochs for r in rows),
                      epochs_budget=len(ended) * study.epochs,
                      epochs_saved=sum(max(study.epochs - r.epochs, 0) for r in ended),
                      not_started=max(study.num_samples - len(rows), 0))
    if best is not None:
        summary.warnings += edge_warnings(study, best.params)
    table = experiment_dir / "summary.json"
    table.write_text(json.dumps({"rows": [r.__dict__ for r in rows], "counts": counts,
                                 "best": best.__dict__ if best else None,
                                 "epochs_spent": summary.epochs_spent, "epochs_budget": summary.epochs_budget,
                                 "epochs_saved": summary.epochs_saved, "not_started": summary.not_started},
                                indent=2, default=str))
    summary.artifacts = [table, *optuna_plots(optuna_url, plan.name, experiment_dir, summary.warnings)]
    return summary


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


def optuna_plots(optuna_url: str, study_name: str, out_dir: Path, warnings: list[str]) -> list[Path]:
    """Optimization history, parallel coordinates and parameter importances as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings_module.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    ot_study = optuna.load_study(study_name=study_name, storage=optuna_url)
    paths = []
    for name, plot in (("optimization_history", ovm.plot_optimization_history),
                       ("parallel_coordinate", ovm.plot_parallel_coordinate),
                       ("param_importances", ovm.plot_param_importances)):
        try:
            plot(ot_study)
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
