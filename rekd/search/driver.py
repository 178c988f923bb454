"""The search driver: one Tuner with an Optuna searcher behind a ConcurrencyLimiter and ASHA over epochs (MO-ASHA
with several objectives; none when the study turns early stopping off).

Called by `python -m rekd.search` (rekd/search/__main__.py) once the plan is checked, or with a plan from
rekd.search.plan.make_plan. The MLflow parent run is created here, before any trial
starts (two trials opening a new SQLite store at once race), and closed with the search's summary.
"""
from __future__ import annotations

import logging
import shlex
import sys
from typing import Optional

from mlflow.entities import Param, RunTag
from mlflow.tracking import MlflowClient

from rekd.cli import python_command
from rekd.datasets import DataSplits, load_dataset
from rekd.errors import Interrupted
from rekd.search.interrupt import Interruption, deferred
from rekd.search import trial_storage
from rekd.search.ray_session import fixed_cluster, gpu_request, start_ray, stop_ray
from rekd.config import TrainConfig
from rekd.search.plan import PROG as PROG_NAME, SearchPlan, build_parser
from rekd.search.report import summarize
from rekd.search.study import objectives_text
from rekd.tracking import outcomes
from rekd.search.storage_watch import StorageWatch, storage_error
from rekd.search.state import OPTUNA_FILE, default_store_uri, write_state
from rekd.search.optuna_searcher import ResumableOptunaSearch, close_unfinished, make_searcher
from rekd.search.asha import ResumableASHA
from rekd.search.moasha import MultiObjectiveASHA
from rekd.tracking.runs import create_parent_run, first_line, flat_params
from rekd.tracking.tags import ERROR_TAG, INTERRUPTED_TAG, OUTCOME_TAG, ROLE_TAG, SEARCH_TAG, TRIAL_TAG
from rekd.tracking.tune_callback import MlflowTrialTracker
from rekd.tracking.writer import FAILED_GRACE_S, GRACE_S, describe_unsent, transient, unsent_reason, warn_refused
from rekd.search.unsent import keep_unsent
from rekd.tracking.store import open_store


# How long the end of a search waits for an unreachable tracking server: rekd.tracking.writer's GRACE_S, its
# FAILED_GRACE_S after an interruption (the user, or `ray job stop`, is waiting), and this after an abort.
ABORT_GRACE_S = 5  # after a second signal: the user wants out


def describe_space(plan: SearchPlan) -> dict[str, str]:
    out = {}
    for p in plan.study.params:
        out[f"space.{p.name}"] = f"{p.kind}{list(p.choices)}" if p.kind == "categorical" else f"{p.kind}[{p.low:g}, {p.high:g}]"
    return out


def stopping_text(study) -> str:
    """How the search stops trials early, as the first line says it."""
    if not study.early_stopping or study.grace_period >= study.epochs:
        return "no early stopping"
    return f"early stopping at rungs from epoch {study.grace_period} (reduction factor {study.reduction_factor})"


def parent_params(plan: SearchPlan) -> list[Param]:
    s = plan.study
    values = {
        "study": s.name, "metric": s.metric, "mode": s.mode, "sampler": s.sampler, "sampler_seed": s.sampler_seed,
        "objectives": objectives_text(s.objectives),
        **({"sampler.population_size": s.population_size} if s.sampler == "nsga2" else {}),
        **({"sampler.multivariate": s.multivariate, "sampler.constant_liar": s.constant_liar} if s.sampler == "tpe" else {}),
        "scheduler": ("mo-asha" if s.multi_objective else "asha") if s.early_stopping else "none",
        "asha.grace_period": s.grace_period, "asha.reduction_factor": s.reduction_factor, "asha.max_t": s.epochs,
        "num_samples": s.num_samples, "max_concurrency": s.max_concurrency,
        "resources.cpu": s.cpus, "resources.gpu": s.gpus, "resources.cpu_fallback": s.cpu_fallback,
        "cpu_only": plan.cpu_only,
        "optuna": "stock" if plan.stock_optuna else "pruned_fix",
        **{f"fixed.{k}": v for k, v in plan.base.to_dict().items() if k not in {p.name for p in s.params}},
        **describe_space(plan),
    }
    return flat_params(values)


def trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


def progress_table(study):
    """The table of trials Tune prints while it works, in rekd's words (rekd.search.progress)."""
    from rekd.search.progress import RekdProgress

    return RekdProgress(study)


class WithoutTunesResumeHint(logging.Filter):
    """Tune ends an interrupted run with `Resume experiment with: Tuner.restore(...)`, a Python API call; the
    driver prints the rekd command that does it instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore(" not in record.getMessage()


def run_search(plan: SearchPlan, data: Optional[DataSplits] = None, store: Optional[tuple[MlflowClient, str]] = None,
               owns_ray: bool = False) -> int:
    """Run the search to its end, its interruption (exit status 130 or 143) or its failure: open the parent
    run, build the tuner (fresh or restored), run it, finish. `data` and `store` (client, experiment id) are
    loaded and opened from the plan when not given. With `owns_ray` (the command line's private or joined
    Ray, not a caller's), Ray is shut down before the last lines are printed: its workers' forwarded logs
    would otherwise come after them."""
    data = data if data is not None else load_dataset(plan.base)
    client, experiment_id = store if store is not None else open_store(plan.tracking_uri, plan.experiment)
    start_ray(worker_output=plan.verbose)
    hide_tunes_resume_hint()
    with Interruption(PROG_NAME) as interruption:
        try:
            resources, teacher = prepare(plan, data)
        except KeyboardInterrupt:  # before the search began: nothing recorded yet
            print(f"{PROG_NAME}: {interruption.name} received before the search began; nothing was recorded",
                  file=sys.stderr)
            return interruption.exit_status
        search = Search(plan, client, experiment_id, open_parent(plan, client, experiment_id), owns_ray)
        try:
            tuner = search.restored_tuner(data, teacher, resources) if plan.resume else \
                search.fresh_tuner(data, teacher, resources)
            results = search.fit(tuner, interruption)
            return search.finish(results, interruption)
        except BaseException as e:
            interruption.tune_running = False
            return search.abort(e, interruption)


def hide_tunes_resume_hint() -> None:
    tune_log = logging.getLogger("ray.tune.tune")
    if not any(isinstance(f, WithoutTunesResumeHint) for f in tune_log.filters):
        tune_log.addFilter(WithoutTunesResumeHint())


def prepare(plan: SearchPlan, data: DataSplits) -> tuple[dict, Optional[dict]]:
    """What each trial requests (said when it is not the study's), and the sparse_kd teacher's weights."""
    import ray

    study = plan.study
    resources, note = trial_resources(plan, ray.cluster_resources().get("GPU", 0), fixed_cluster())
    print(f"search {plan.name}: study {study.name}, {study.num_samples} trials x {study.epochs} epochs, "
          f"{study.max_concurrency} at once, {resources} each; searching "
          f"{', '.join(p.name for p in study.params)} for {' and '.join(f'{m} ({mode})' for m, mode in study.objectives)}; "
          f"{stopping_text(study)}", flush=True)
    if note:
        print(note, flush=True)
    teacher = teacher_weights_for(plan.base, data, study.cpus, resources["gpu"]) \
        if plan.base.mode == "sparse_kd" else None
    return resources, teacher


def teacher_weights_for(base: TrainConfig, data: DataSplits, cpus: float, gpus: float) -> dict:
    """The sparse_kd teacher: from the driver's cache, or trained once as a Ray task and then cached."""
    import ray

    from rekd.snn.teachers import load_cached_teacher, store_teacher
    from rekd.train.loop import train_teacher

    cached = load_cached_teacher(base)
    if cached is not None:
        print(f"teacher: cached baseline (val_acc={cached['val_acc']:.4f})", flush=True)
        return cached["weights"]
    print(f"teacher: training the baseline once ({base.teacher_epochs} epochs) as a Ray task", flush=True)
    task = ray.remote(train_teacher).options(num_cpus=cpus, num_gpus=gpus)
    weights, val_acc = ray.get(task.remote(base, data))
    store_teacher(base, weights, val_acc)
    print(f"teacher: trained, val_acc={val_acc:.4f}", flush=True)
    return weights


def trial_resources(plan: SearchPlan, cluster_gpus: float, fixed: bool) -> tuple[dict, str]:
    """What each trial (and the teacher task) requests, and a line that says why when it is not the study's."""
    gpus, note = gpu_request(plan.study.gpus, plan.cpu_only, cluster_gpus, fixed)
    return {"cpu": plan.study.cpus, "gpu": gpus}, note


def open_parent(plan: SearchPlan, client: MlflowClient, experiment_id: str) -> str:
    """The search's MLflow parent run: created with the study and versions, or the resumed search's, reopened."""
    experiment_dir = plan.folder
    if plan.resume:  # the parent run of the interrupted or dead driver goes on
        parent_id = plan.resume["parent_run_id"]
        client.update_run(parent_id, status="RUNNING")
        client.log_batch(parent_id, tags=[RunTag("rekd.resumed", "true"), RunTag(OUTCOME_TAG, outcomes.RUNNING)])
        if INTERRUPTED_TAG in client.get_run(parent_id).data.tags:
            client.delete_tag(parent_id, INTERRUPTED_TAG)
        print(f"resuming search {plan.name}: MLflow parent run {parent_id}", flush=True)
        return parent_id
    parent_id = create_parent_run(client, experiment_id, plan.name, params=parent_params(plan),
                                  tags={ROLE_TAG: "search", SEARCH_TAG: plan.name, "rekd.study": plan.study.name,
                                        OUTCOME_TAG: outcomes.RUNNING})
    client.log_artifact(parent_id, str(plan.study.path), artifact_path="study")
    write_state(experiment_dir, list(plan.argv), parent_id, experiment_id, plan.tracking_uri,
                default_store=plan.tracking_uri == default_store_uri(plan.local_path))
    return parent_id


class Search:
    """One run of the Tuner and how it ends: finished, interrupted, or failed."""

    def __init__(self, plan: SearchPlan, client: MlflowClient, experiment_id: str, parent_id: str, owns_ray: bool):
        self.plan, self.client, self.experiment_id, self.parent_id = plan, client, experiment_id, parent_id
        self.owns_ray = owns_ray
        self.experiment_dir = plan.folder
        self.optuna_url = f"sqlite:///{self.experiment_dir / OPTUNA_FILE}"
        self.tracker = MlflowTrialTracker(plan.tracking_uri, experiment_id, parent_id, plan.name, plan.study.epochs)

    def trainable(self, data: DataSplits, teacher, resources: dict):
        from ray import tune

        from rekd.search.trainable import run_trial

        return tune.with_resources(tune.with_parameters(run_trial, data=data, teacher_weights=teacher,
                                                        cpu_fallback=self.plan.study.cpu_fallback), resources)

    def fixed_settings(self) -> dict:
        searched = {p.name for p in self.plan.study.params}
        return {k: v for k, v in self.plan.base.to_dict().items() if k not in searched}

    def fresh_tuner(self, data: DataSplits, teacher, resources: dict):
        from ray import tune
        from ray.tune.logger import JsonLoggerCallback
        from ray.tune.schedulers import FIFOScheduler
        from ray.tune.search import ConcurrencyLimiter

        plan, study = self.plan, self.plan.study
        searcher = ConcurrencyLimiter(make_searcher(study, self.optuna_url, plan.name, stock=plan.stock_optuna),
                                      max_concurrent=study.max_concurrency)
        if not study.early_stopping:  # Tune's default: every trial runs its budget
            scheduler = FIFOScheduler()
        elif study.multi_objective:
            scheduler = MultiObjectiveASHA(study.objectives, max_t=study.epochs, grace_period=study.grace_period,
                                           reduction_factor=study.reduction_factor)
        else:
            scheduler = ResumableASHA(time_attr="training_iteration", metric=study.metric, mode=study.mode,
                                      max_t=study.epochs, grace_period=study.grace_period,
                                      reduction_factor=study.reduction_factor)
        return tune.Tuner(
            self.trainable(data, teacher, resources),
            param_space=self.fixed_settings(),
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=study.num_samples,
                                        trial_name_creator=trial_name, trial_dirname_creator=trial_name,
                                        reuse_actors=True),  # no new worker process per trial
            run_config=tune.RunConfig(
                name=plan.name, storage_path=plan.storage_path,
                callbacks=[self.tracker, JsonLoggerCallback(), StorageWatch()],
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=2),
                progress_reporter=progress_table(study), verbose=1,
            ),
        )

    def restored_tuner(self, data: DataSplits, teacher, resources: dict):
        """The interrupted search's tuner. Trials, searcher (and its Optuna study) and callbacks come back from
        the experiment folder with the paths of where the search was started: they are pointed at where it
        is now."""
        from ray import tune

        plan = self.plan
        ResumableOptunaSearch.storage_url = self.optuna_url
        ResumableASHA.storage_path = MultiObjectiveASHA.storage_path = trial_storage.filesystem(plan.storage_path)[1]
        tuner = tune.Tuner.restore(trial_storage.join(plan.storage_path, plan.name),
                                   trainable=self.trainable(data, teacher, resources),
                                   resume_unfinished=True, resume_errored=True, param_space=self.fixed_settings())
        restored = [t for t in MlflowTrialTracker.active()
                    if t is not self.tracker and t.parent_run_id == self.parent_id]
        for tracker in restored:  # Tune runs the tracker it unpickled, not the one made here
            tracker.tracking_uri, tracker.experiment_id = plan.tracking_uri, self.experiment_id
        self.tracker = restored[-1] if restored else self.tracker
        return tuner

    def fit(self, tuner, interruption: Interruption):
        """Tune's run. While it runs, the first signal asks Tune to stop cleanly; after, a signal aborts."""
        interruption.tune_running = True
        results = tuner.fit()
        interruption.tune_running = False
        if interruption.aborted:
            # The second signal's KeyboardInterrupt can land in code that swallows it (Python prints
            # "Exception ignored in ...") and Tune then returns as after the first: the user asked to abort.
            raise Interrupted
        return results

    def finish(self, results, interruption: Interruption) -> int:
        """Tune returned: the search ended, or stopped cleanly on the first signal."""
        plan, tracker = self.plan, self.tracker
        if plan.resume:  # MLflow calls of their own, retried against an unreachable server: a signal cuts them short
            close_lost_runs(self.client, self.experiment_id, self.parent_id, results)
        with deferred():  # a signal now aborts once the record of the end is whole
            interrupted = interruption.signum is not None
            stopped = self.close_unfinished(interruption) if interrupted else []
            summary = summarize(plan, results, self.optuna_url, self.experiment_dir, interrupted=set(stopped))
            summary.log_to(tracker, final=not interrupted)
            tracker.end_parent("KILLED" if interrupted else "FINISHED")
        # A signal while this waits for an unreachable tracking server aborts: the wait is cut to seconds.
        unsent = tracker.close(timeout=FAILED_GRACE_S if interrupted else GRACE_S)
        interruption.closing = True
        self.release_ray()
        summary.print(plan, self.experiment_id, self.parent_id)
        report_unsent(unsent, self.experiment_dir, tracker)
        warn_refused(tracker)
        sys.stdout.flush()
        tracker.raise_if_crashed()
        if interrupted:
            # A second signal while this ran may have been swallowed on its way (see fit): it still counts.
            how = f"aborted ({interruption.name} twice)" if interruption.aborted else f"interrupted ({interruption.name})"
            print(f"{PROG_NAME}: search {plan.name} {how}; continue it with\n  {resume_command(plan)}",
                  file=sys.stderr)
            return interruption.exit_status
        if summary.best is None:
            print(f"{PROG_NAME}: no trial produced a result; see the outcomes above and in MLflow", file=sys.stderr)
            return 1
        return 0

    def close_unfinished(self, interruption: Interruption) -> list[str]:
        """The trials the interruption stopped: their runs KILLED (outcome interrupted), their Optuna trials
        closed as FAIL until --resume continues them. Returns their trial ids."""
        tracker = self.tracker
        stopped = tracker.end_unfinished(outcomes.INTERRUPTED, "KILLED", {INTERRUPTED_TAG: interruption.name})
        tracker.log_parent(tags=[RunTag(OUTCOME_TAG, outcomes.INTERRUPTED),
                                 RunTag(INTERRUPTED_TAG, interruption.name)])
        try:
            close_unfinished(self.optuna_url, self.plan.name)
        except Exception as e:  # the record of trials in MLflow is closed all the same
            print(f"warning: could not close the Optuna trials in {self.optuna_url}: {first_line(e)}",
                  file=sys.stderr)
        return stopped

    def release_ray(self) -> None:
        if self.owns_ray:
            stop_ray()

    def abort(self, error: BaseException, interruption: Interruption) -> int:
        """Tune raised: a second signal (abort), a results folder that became unwritable, or a bug."""
        plan, tracker = self.plan, self.tracker
        interruption.closing = True  # a further signal must not cut the closing of the records short
        if isinstance(error, KeyboardInterrupt) or interruption.aborted:
            self.close_unfinished(interruption)
            tracker.end_parent("KILLED")
            report_unsent(tracker.close(timeout=ABORT_GRACE_S), self.experiment_dir, tracker)
            self.release_ray()
            print(f"{PROG_NAME}: search {plan.name} aborted ({interruption.name} twice); continue it with\n"
                  f"  {resume_command(plan)}", file=sys.stderr)
            return interruption.exit_status
        storage = storage_error(error)
        reason = f"the results folder {self.experiment_dir} became unwritable: {storage}" if storage \
            else first_line(error)
        tracker.end_unfinished(outcomes.SEARCH_FAILED, "FAILED", {ERROR_TAG: reason[:500]})
        tracker.log_parent(tags=[RunTag(OUTCOME_TAG, outcomes.FAILED), RunTag(ERROR_TAG, reason[:500])])
        tracker.end_parent("FAILED")
        report_unsent(tracker.close(timeout=ABORT_GRACE_S), self.experiment_dir, tracker)
        if storage is None:
            raise error
        self.release_ray()
        print(f"{PROG_NAME}: error: search {plan.name} failed: {reason}", file=sys.stderr)
        return 1


def resume_command(plan: SearchPlan) -> str:
    """The exact command that continues this search, runnable as printed."""
    study = build_parser().parse_args(list(plan.argv)).study
    words = [python_command(), "-m", "rekd.search", study, "--resume", plan.name, "--storage-path", plan.storage_path]
    if plan.storage_path != str(plan.local_path):
        words += ["--local-path", str(plan.local_path)]
    return " ".join(shlex.quote(w) for w in words)


def close_lost_runs(client: MlflowClient, experiment_id: str, parent_id: str, results) -> None:
    """Runs of trials that started after the dead driver's last experiment snapshot: Tune does not know
    them after a resume (their work is lost and their slot re-run), so they are closed and tagged."""
    known = {str((r.metrics or {}).get("trial_id")) for r in results}
    try:
        children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                                      max_results=10000)
        for run in children:
            if run.data.tags.get(TRIAL_TAG) not in known and run.info.status == "RUNNING":
                client.set_tag(run.info.run_id, OUTCOME_TAG, outcomes.LOST_WITH_DRIVER)
                client.set_terminated(run.info.run_id, "KILLED")
    except Exception as e:
        if not transient(e):
            raise
        # The search itself has ended: an outage now must not turn it into a failure. The summary's calls
        # still queue and wait for the store; only these stale runs stay RUNNING in MLflow.
        print(f"warning: the runs of trials lost with the earlier driver could not be closed (they stay "
              f"RUNNING in MLflow): {first_line(e)}", file=sys.stderr)


def report_unsent(unsent: list, experiment_dir, tracker: MlflowTrialTracker) -> None:
    """Say clearly what never reached MLflow; it is kept next to the results with what sending it later needs."""
    if not unsent:
        return
    print(f"warning: {unsent_reason(tracker)}; {len(unsent)} logging calls were not made "
          f"({describe_unsent(unsent)}); {keep_unsent(unsent, experiment_dir, tracker)}", file=sys.stderr)
