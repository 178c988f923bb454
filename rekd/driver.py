"""The search driver: one Tuner with OptunaSearch behind a ConcurrencyLimiter and ASHA over epochs.

Called by rekd.search once the plan is checked. The MLflow parent run is created here, before any trial
starts (two trials opening a new SQLite store at once race), and closed with the search's summary.
"""
from __future__ import annotations

import json
import sys

from mlflow.entities import Param, RunTag
from mlflow.tracking import MlflowClient

from rekd.datasets import DataSplits
from rekd.provenance import provenance
from rekd.scheduler import ResumableASHA
from rekd.search import PROG as PROG_NAME, STATE_FILE, SearchPlan, start_ray, teacher_weights_for
from rekd.search_report import summarize
from rekd.tracking import OUTCOME_TAG, ROLE_TAG, SEARCH_TAG, MlflowTrialTracker, describe_unsent, first_line


UNSENT_GRACE_S = 120  # how long the end of a search waits for an unreachable tracking server


def describe_space(plan: SearchPlan) -> dict[str, str]:
    out = {}
    for p in plan.study.params:
        out[f"space.{p.name}"] = f"{p.kind}{list(p.choices)}" if p.kind == "categorical" else f"{p.kind}[{p.low:g}, {p.high:g}]"
    return out


def parent_params(plan: SearchPlan) -> list[Param]:
    s = plan.study
    values = {
        "study": s.name, "metric": s.metric, "mode": s.mode, "sampler": s.sampler, "sampler_seed": s.sampler_seed,
        "asha.grace_period": s.grace_period, "asha.reduction_factor": s.reduction_factor, "asha.max_t": s.epochs,
        "num_samples": s.num_samples, "max_concurrency": s.max_concurrency,
        "resources.cpu": s.cpus, "resources.gpu": s.gpus, "optuna": "stock" if plan.stock_optuna else "pruned_fix",
        **{f"fixed.{k}": v for k, v in plan.base.to_dict().items() if k not in {p.name for p in s.params}},
        **describe_space(plan),
    }
    return [Param(k, "none" if v is None else str(v)) for k, v in sorted(values.items())]


def trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


def progress_table(study):
    """The table of running trials Tune prints while it works: the searched values and the metric."""
    from ray.tune import CLIReporter

    return CLIReporter(
        parameter_columns=[p.name for p in study.params],
        metric_columns={"epoch": "epoch", study.metric: study.metric, "train_loss": "loss",
                        "epoch_time_s": "s/epoch"},
        max_report_frequency=10, sort_by_metric=True, metric=study.metric, mode=study.mode,
    )


def run_search(plan: SearchPlan, data: DataSplits, client: MlflowClient, experiment_id: str) -> int:
    import ray
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback
    from ray.tune.search import ConcurrencyLimiter

    from rekd.searcher import make_searcher
    from rekd.trainable import run_trial

    study = plan.study
    start_ray()
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    resources = {"cpu": study.cpus, "gpu": study.gpus if has_gpus else 0}
    print(f"search {plan.name}: study {study.name}, {study.num_samples} trials x {study.epochs} epochs, "
          f"{study.max_concurrency} at once, {resources} each; searching {', '.join(p.name for p in study.params)}",
          flush=True)
    teacher = None
    if plan.base.mode == "sparse_kd":
        teacher = teacher_weights_for(plan.base, data, study.cpus, resources["gpu"])

    experiment_dir = plan.storage_path / plan.name
    if plan.resume:  # the parent run of the interrupted driver goes on
        parent_id = plan.resume["parent_run_id"]
        client.set_tag(parent_id, "rekd.resumed", "true")
        print(f"resuming search {plan.name}: MLflow parent run {parent_id}", flush=True)
    else:
        parent = client.create_run(experiment_id, run_name=plan.name,
                                   tags={ROLE_TAG: "search", SEARCH_TAG: plan.name, "rekd.study": study.name})
        parent_id = parent.info.run_id
        client.log_batch(parent_id, params=parent_params(plan),
                         tags=[RunTag(f"rekd.{k}", str(v)) for k, v in provenance().items()])
        client.log_artifact(parent_id, str(study.path), artifact_path="study")
        experiment_dir.mkdir(parents=True, exist_ok=True)
        (experiment_dir / STATE_FILE).write_text(json.dumps(
            {"argv": list(plan.argv), "parent_run_id": parent_id, "experiment_id": experiment_id,
             "tracking_uri": plan.tracking_uri}, indent=2))
    optuna_url = f"sqlite:///{experiment_dir / 'optuna.db'}"
    tracker = MlflowTrialTracker(plan.tracking_uri, experiment_id, parent_id, plan.name, study.epochs)
    searched = {p.name for p in study.params}
    fixed = {k: v for k, v in plan.base.to_dict().items() if k not in searched}
    trainable = tune.with_resources(tune.with_parameters(run_trial, data=data, teacher_weights=teacher), resources)
    if plan.resume:
        # Trials, searcher (and its Optuna study), callbacks' state come back from the experiment folder.
        tuner = tune.Tuner.restore(str(experiment_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, param_space=fixed)
    else:
        searcher = ConcurrencyLimiter(make_searcher(study, optuna_url, plan.name, stock=plan.stock_optuna),
                                      max_concurrent=study.max_concurrency)
        scheduler = ResumableASHA(time_attr="training_iteration", metric=study.metric, mode=study.mode,
                                  max_t=study.epochs, grace_period=study.grace_period,
                                  reduction_factor=study.reduction_factor)
        tuner = tune.Tuner(
            trainable,
            param_space=fixed,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=study.num_samples,
                                        trial_name_creator=trial_name, trial_dirname_creator=trial_name,
                                        reuse_actors=True),  # no new worker process per trial
            run_config=tune.RunConfig(
                name=plan.name, storage_path=str(plan.storage_path), callbacks=[tracker, JsonLoggerCallback()],
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=2),
                progress_reporter=progress_table(study), verbose=1,
            ),
        )
    try:
        results = tuner.fit()
    except BaseException as e:
        tracker.log_parent(tags=[RunTag("rekd.error", first_line(e)[:500])])
        tracker.end_parent("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        report_unsent(tracker.close(timeout=30), experiment_dir)
        raise
    if plan.resume:  # Tune ran the tracker it unpickled from the experiment, not the one made here
        restored = [t for t in MlflowTrialTracker.active() if t is not tracker and t.parent_run_id == parent_id]
        if restored:
            tracker = restored[-1]
    if plan.resume:
        close_lost_runs(client, experiment_id, parent_id, results)
    summary = summarize(plan, results, optuna_url, experiment_dir)
    summary.log_to(tracker)
    tracker.end_parent("FINISHED")
    unsent = tracker.close(timeout=UNSENT_GRACE_S)
    summary.print(plan, parent_id)
    report_unsent(unsent, experiment_dir)
    sys.stdout.flush()
    if summary.best is None:
        print(f"{PROG_NAME}: no trial produced a result; see the outcomes above and in MLflow", file=sys.stderr)
        return 1
    return 0


def close_lost_runs(client: MlflowClient, experiment_id: str, parent_id: str, results) -> None:
    """Runs of trials that started after the dead driver's last experiment snapshot: Tune does not know
    them after a resume (their work is lost and their slot re-run), so they are closed and tagged."""
    known = {str((r.metrics or {}).get("trial_id")) for r in results}
    children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                                  max_results=10000)
    for run in children:
        if run.data.tags.get("rekd.trial_id") not in known and run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, OUTCOME_TAG, "lost_with_driver")
            client.set_terminated(run.info.run_id, "KILLED")


def report_unsent(unsent: list, experiment_dir) -> None:
    """Say clearly what never reached MLflow, and keep it in a file next to the results."""
    if not unsent:
        return
    path = experiment_dir / "mlflow-unsent.json"
    path.write_text(json.dumps(unsent, indent=1, default=lambda o: getattr(o, "__dict__", str(o))))
    print(f"warning: the MLflow server stayed unreachable; {len(unsent)} logging calls were not made "
          f"({describe_unsent(unsent)}); they are saved in {path}", file=sys.stderr)
