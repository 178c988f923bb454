"""The plan of a search, checked before Ray starts: `python -m rekd.search STUDY`: Ray Tune schedules Optuna-sampled trials of a study, ASHA stops the bad
ones early, and every trial is tracked in MLflow as a child of the search's parent run.

Inside `ray job submit` it joins that cluster (RAY_ADDRESS is set); run alone it starts a private Ray on
127.0.0.1. Everything a user can get wrong (study file, flags, data, tracking URI, results folder) is
checked before Ray starts or anything is written.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from rekd.search import trial_storage
from rekd.cli import Parser
from rekd.config import TrainConfig
from rekd.errors import UsageError
from rekd.tracking.store import RESULTS_FOLDER
from rekd.search.state import DEFAULT_STORE, check_resumable, default_store_uri, name_taken, read_state
from rekd.search.study import SMOKE_SUFFIX, Study, load_study, parse_assignment
from rekd.train.loop import resolve

PROG = "python -m rekd.search"
# Ray binds its processes to this machine's routable address unless told otherwise (ray 2.60).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# The classic engine prints with the reporter rekd passes (rekd.search.progress); the newer one ignores it.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# The driver handles SIGINT itself (rekd.search.interrupt): Tune's own handler would end the search as if it
# had finished. SIGUSR1 stays Tune's: it is how the driver asks Tune to stop.
os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
# A trial that runs out of GPU memory ends with a result that says why and carries no metric.
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
# MLflow holds the metrics: of Tune's own loggers only the JSON one is kept (rekd.search.driver adds it), which
# ASHA's replay on resume and Tune's result tables read. The CSV and TensorBoard writers cost the driver
# CPU on every result.
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Search re-KD hyperparameters with Ray Tune, Optuna and ASHA; track in MLflow.")
    p.add_argument("study", help="a study name (search_spaces/<name>.yaml: sparse_kd, default_kd, baseline)")
    p.add_argument("--search-space", metavar="FILE", help="a study file elsewhere (instead of search_spaces/)")
    p.add_argument("--num-samples", type=int, help="number of trials")
    p.add_argument("--max-concurrency", type=int, help="trials running at once")
    p.add_argument("--epochs", type=int, help="epochs per trial (ASHA's max budget)")
    p.add_argument("--dataset", help="digits | ndigits | cifar100 | dvsgesture")
    p.add_argument("--arch", help="tiny | resnet18 | wrn16_4 | vgg16")
    p.add_argument("--data-root", help="folder with cifar-100-python/ or DVSGesture/")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fix any TrainConfig setting for every trial (fixing a searched one removes it from the search)")
    p.add_argument("--storage-path", metavar="DIR|URI",
                   help="where Tune keeps trials and their checkpoints: a folder, or s3://... gs://... that every "
                        "Ray node reaches (default ./rekd-results)")
    p.add_argument("--local-path", metavar="DIR",
                   help="where the driver keeps the search's own files (state, Optuna study, default MLflow store, "
                        "summary, driver.log); default: --storage-path if a folder, else ./rekd-results")
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///<local-path>/mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment (default rekd-<study>; rekd-<study>-smoke with --smoke-test)")
    p.add_argument("--name", help="name of this search (default <study>-<date>-<time>)")
    p.add_argument("--smoke-test", action="store_true", help="a few trials of one or two epochs (about a minute on a CPU)")
    p.add_argument("--resume", metavar="NAME",
                   help="continue the search NAME (in --local-path) after its driver died: finished trials are kept")
    p.add_argument("--verbose", action="store_true",
                   help="also show what Ray, Tune, MLflow and Optuna log (always kept in <local-path>/<name>/driver.log)")
    p.add_argument("--cpu-only", action="store_true",
                   help="run trials (and the teacher) on CPUs, even where the cluster has or can start GPU nodes")
    p.add_argument("--early-stopping", choices=("on", "off"),
                   help="stop trials at ASHA's rungs (MO-ASHA's with several objectives) or not; default: the study's")
    p.add_argument("--grace-period", type=int, metavar="EPOCHS",
                   help="epochs every trial runs before ASHA may stop it (default: the study's asha.grace_period; "
                        "scale it with --epochs, e.g. 50 for 200 epochs)")
    p.add_argument("--stock-optuna", action="store_true",
                   help="record ASHA-stopped trials as Ray's OptunaSearch does (COMPLETE), for comparison")
    return p


@dataclass(frozen=True)
class SearchPlan:
    """Everything the driver needs, resolved and checked before Ray starts."""
    study: Study
    base: TrainConfig  # resolved fixed settings
    name: str
    local_path: Path  # the driver's own files: <local_path>/<name>
    storage_path: str  # Tune's trials and checkpoints: an absolute folder or a storage URI (rekd.search.trial_storage)
    tracking_uri: str
    experiment: str
    stock_optuna: bool
    argv: tuple = ()  # the command line that made the plan, saved for --resume
    resume: Optional[dict] = None  # rekd-search.json of the search being resumed
    verbose: bool = False  # libraries' logs and a private Ray's worker output on the console too
    cpu_only: bool = False  # trials request no GPU, whatever the study asks

    @property
    def folder(self) -> Path:
        """The search's own folder: state, lock, Optuna study, summary, driver.log."""
        return self.local_path / self.name

    def with_study(self, **overrides) -> "SearchPlan":
        """The same plan with some of the study's own settings changed (e.g. grace_period, gpus)."""
        return dataclasses.replace(self, study=self.study.with_overrides(**overrides))


def make_plan(study: str, **flags) -> SearchPlan:
    """The plan of a new search, made from Python: `flags` are the command's options by name
    (`num_samples=8`, `storage_path=...`, `set={"lr": 0.01}`, `smoke_test=True`), checked exactly as the
    command checks them. The command line they make is what the search saves for --resume."""
    argv = [study]
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if key == "set":
            items = value.items() if isinstance(value, dict) else (item.split("=", 1) for item in value)
            argv += [word for k, v in items for word in ("--set", f"{k}={v}")]
        elif value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    parser = build_parser()
    unknown = sorted(set(flags) - set(vars(parser.parse_args([study]))) - {"set"})
    if unknown or "resume" in flags:
        raise TypeError(f"make_plan: no option {', '.join(unknown or ['resume'])} (the command's options by name)")
    return new_plan(parser.parse_args(argv), argv, must_be_new=True)


def plan_from_args(args, argv: Sequence[str] = ()) -> SearchPlan:
    """The checked plan of a new search, or of the one --resume names (rebuilt from its saved command line).

    On --resume the folders the search is in now (--storage-path, --local-path) win over the ones it was
    started in, and --tracking-uri, when given, over the store it was tracked in: results folders get moved."""
    if args.resume:
        local_path = local_folder(args)
        folder = local_path / args.resume
        state = read_state(folder, args.resume)
        saved = build_parser().parse_args(state["argv"])
        if saved.study != args.study:
            raise UsageError(f"--resume {args.resume} is a search of study {saved.study!r}, not {args.study!r}")
        # Trials' storage apart from the search's folder (a URI, a shared mount) stays where it was; trials
        # kept in the search's folder follow it when it moved.
        apart = saved.storage_path if saved.storage_path and (saved.local_path or trial_storage.is_uri(
            saved.storage_path)) else None
        saved.storage_path = args.storage_path or apart or str(local_path)
        saved.local_path = str(local_path)
        saved.tracking_uri = args.tracking_uri or (  # the default store: beside the results, wherever they are
            default_store_uri(local_path) if state["tracking_uri"] == DEFAULT_STORE else state["tracking_uri"])
        check_resumable(folder, trial_storage.join(trial_storage.resolve(saved.storage_path), args.resume),
                        args.resume)
        plan = new_plan(saved, state["argv"], must_be_new=False)
        return dataclasses.replace(plan, resume=state, verbose=args.verbose, cpu_only=args.cpu_only or plan.cpu_only)
    return new_plan(args, argv, must_be_new=True)


def trial_budget(study: Study, fixed: dict) -> Optional[int]:
    """Epochs of a whole trial with the command line's settings; None where they are not valid (the study's own
    check names the bad value later)."""
    try:
        return TrainConfig.from_dict({**study.fixed, **fixed}, source="fixed").total_epochs
    except UsageError:
        return None


def grace_within(study: Study, fixed: dict) -> dict:
    """A budget asked for on the command line that is shorter than the study's grace period: ASHA then stops no
    trial early (the grace period becomes the budget), and the search says so, rather than refusing a short run."""
    budget = trial_budget(study, fixed)
    if budget is None or study.grace_period <= budget:
        return {}
    print(f"note: the study's asha.grace_period {study.grace_period} exceeds the {budget} epochs asked for: no trial "
          "is stopped early (a smaller asha.grace_period in the study file would)", file=sys.stderr)
    return {"grace_period": budget}


def grace_flag(value: int, study: Study, fixed: dict) -> int:
    """--grace-period, checked against the trials' budget (a grace period past it would stop nothing)."""
    budget = trial_budget(study, fixed)
    if value < 1 or budget is not None and value > budget:
        raise UsageError(f"--grace-period {value} is not allowed; allowed: an integer 1..{budget or 'epochs'} "
                         "(the trials' epochs)")
    return value


def new_plan(args, argv: Sequence[str], must_be_new: bool) -> SearchPlan:
    from rekd.tracking.store import resolve_tracking_uri

    study = load_study(args.search_space or args.study)
    if args.smoke_test:
        study = study.smoke()
    fixed = dict(p for p in (parse_assignment(item) for item in args.set))
    for flag, key in (("epochs", "epochs"), ("dataset", "dataset"), ("arch", "arch"), ("data_root", "data_root")):
        if getattr(args, flag) is not None:
            fixed[key] = getattr(args, flag)
    if "epochs" in fixed and study.fixed.get("mode") == "sparse_kd" and "teacher_epochs" not in fixed:
        fixed["teacher_epochs"] = fixed["epochs"]
    searched = tuple(p for p in study.params if p.name not in fixed)
    if not searched:
        raise UsageError("--set fixes every searched setting; leave at least one to search")
    overrides = {}
    for flag in ("num_samples", "max_concurrency"):
        value = getattr(args, flag)
        if value is not None:
            if value < 1:
                raise UsageError(f"--{flag.replace('_', '-')} {value} is not allowed; allowed: an integer >= 1")
            overrides[flag] = value
    if args.early_stopping is not None:
        overrides["early_stopping"] = args.early_stopping == "on"
    if args.grace_period is not None:
        overrides["grace_period"] = grace_flag(args.grace_period, study, fixed)
    elif "epochs" in fixed:
        overrides.update(grace_within(study, fixed))
    study = study.with_overrides(params=searched, fixed=fixed, **overrides)
    if args.stock_optuna and study.multi_objective:
        raise UsageError(f"--stock-optuna compares single-objective searches; study {study.name} has "
                         f"{len(study.objectives)} objectives")
    base = resolve(study.base_config())
    storage_path = trial_storage.resolve(args.storage_path or RESULTS_FOLDER)
    local_path = local_folder(args)
    check_writable(local_path, "--local-path" if args.local_path else "--storage-path")
    if trial_storage.is_uri(storage_path):
        trial_storage.check_reachable(storage_path)
    elif Path(storage_path) != local_path:
        check_writable(Path(storage_path))
    name = args.name or f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if must_be_new and args.name and (local_path / name).exists():
        raise name_taken(local_path / name)
    argv = [*argv, "--name", name] if "--name" not in argv else list(argv)
    tracking_uri = resolve_tracking_uri(args.tracking_uri, local_path)
    experiment = args.experiment or f"rekd-{study.name}{SMOKE_SUFFIX if args.smoke_test else ''}"
    return SearchPlan(study, base, name, local_path, storage_path, tracking_uri, experiment, args.stock_optuna,
                      tuple(argv), verbose=args.verbose, cpu_only=args.cpu_only)


def local_folder(args) -> Path:
    """--local-path; else --storage-path when it is a folder; else ./rekd-results."""
    storage = args.storage_path or RESULTS_FOLDER
    chosen = args.local_path or (RESULTS_FOLDER if trial_storage.is_uri(storage) else storage)
    return Path(chosen).expanduser().resolve()


def check_writable(path: Path, flag: str = "--storage-path") -> None:
    """The folder can be created and written, judged without creating anything yet."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    if existing == path and not path.is_dir() or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path} cannot be written ({existing} is not a writable folder); "
                         "choose a writable folder")
