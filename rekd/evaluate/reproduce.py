"""`python -m rekd.reproduce table1|table2`: the paper's Tables 1 and 2 as one command, every cell a mean +- std
over seeds and every improvement a 95% confidence interval paired by seed, scored on the test split.

table1 (sparse-KD, paper 4.2): for each seed the baseline student is trained; it is also the teacher,
magnitude-pruned at each ratio (no fine-tuning) and scored as it is, and a fresh student is distilled from
each pruned teacher. table2 (default-KD, 4.3): for each seed the baseline and a student taught by the
virtual teacher. The runs are Ray tasks (rekd.evaluate.reproduce_run), tracked in MLflow under one parent run; the
tables are rekd.evaluate.tables. Everything a user can get wrong is checked before Ray starts or anything
is written.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional, Sequence

from rekd.cli import Parser, run
from rekd.config import TrainConfig
from rekd.errors import UsageError
from rekd.evaluate.reproduce_plan import KD_SETTINGS, ReproducePlan, structure_variants
from rekd.search.study import SMOKE_SUFFIX, Study, load_study, parse_assignment
from rekd.train.loop import resolve

PROG = "python -m rekd.reproduce"
TABLES = {"table1": "sparse_kd", "table2": "default_kd", "structure": "sparse_kd"}  # -> study, distillation mode
PAPER_RATIOS = (0.0, 0.1, 0.3, 0.5, 0.7)  # Table 1's teacher prune ratios
# What the protocol sets for each run itself; fixing one with --set would change the experiment.
PROTOCOL_KEYS = ("mode", "seed", "prune_ratio", "eval_test", "teacher_epochs", "epochs")
STRUCTURE_KEYS = ("structure", "target_sparsity", "generations")  # the structure table's rows set these
STRUCTURE_SPARSITIES = (0.5, 0.8, 0.9)
STRUCTURE_RATIO = 0.5  # the structure table's teacher: each seed's baseline pruned at this ratio
# A std from two seeds says little and a t interval with one degree of freedom is four times its standard
# error wide: three seeds is the least a cell of these tables is shown with.
MIN_SEEDS = 3
DEFAULT_SEEDS = 3
SMOKE = {"seeds": 3, "epochs": 2}  # every ratio still runs: only seeds and length shrink


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Reproduce the paper's Table 1 (sparse-KD) or Table 2 (default-KD) over "
                                      "seeds, with paired 95% confidence intervals, on the test split.")
    p.add_argument("table", choices=tuple(TABLES),
                   help="table1: sparse-KD, one row per teacher prune ratio; table2: default-KD (virtual teacher); "
                        "structure: sparse students (gmp, rewire, generations) against the dense baseline")
    p.add_argument("--dataset", help="digits (default) | ndigits | cifar100 | dvsgesture")
    p.add_argument("--arch", help="tiny (default) | resnet18 | wrn16_4 | vgg16")
    p.add_argument("--data-root", metavar="DIR", help="folder with cifar-100-python/ or DVSGesture/ (default ./data)")
    p.add_argument("--seeds", type=int, metavar="N",
                   help=f"run every config under seeds 0..N-1 (default {DEFAULT_SEEDS}; at least {MIN_SEEDS}: "
                        "the improvement's confidence interval is a Student t over per-seed differences)")
    p.add_argument("--epochs", type=int, metavar="N",
                   help="epochs of every run, baseline (= teacher) included (default: the study's, 8)")
    p.add_argument("--ratios", metavar="R,R,...",
                   help="table1's teacher prune ratios, each 0 <= r < 1 (default 0,0.1,0.3,0.5,0.7, the paper's)")
    p.add_argument("--sparsities", metavar="S,S,...",
                   help="structure: the students' target sparsities, each 0 < s < 1 (default 0.5,0.8,0.9)")
    p.add_argument("--best", metavar="FILE",
                   help="take temperature, alpha and kd_reduction (table2: and confidence) from the top config of this "
                        "`python -m rekd.best` file (default: the study's, else TrainConfig's defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fix another TrainConfig setting for every run, e.g. lr=0.05 or downsample=2 (repeatable; "
                        "overrides --best)")
    p.add_argument("--out", default="reproduce-results", metavar="DIR",
                   help="folder for the tables, plot and raw numbers (default ./reproduce-results)")
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///<out>/mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment (default rekd-reproduce; rekd-reproduce-smoke with --smoke-test)")
    p.add_argument("--verbose", action="store_true",
                   help="also show what Ray, MLflow and Optuna log (always kept in the reproduction's driver.log)")
    p.add_argument("--cpu-only", action="store_true",
                   help="run every task on CPUs, even where the cluster has or can start GPU nodes")
    p.add_argument("--smoke-test", action="store_true",
                   help=f"{SMOKE['epochs']} epochs x {SMOKE['seeds']} seeds, every ratio: about a minute on a CPU")
    return p


def plan_from_args(args) -> ReproducePlan:
    from rekd.search.plan import check_writable
    from rekd.tracking.store import RESULTS_FOLDER, resolve_tracking_uri

    mode = TABLES[args.table]
    study = load_study(mode)
    n_seeds = args.seeds if args.seeds is not None else SMOKE["seeds"] if args.smoke_test else DEFAULT_SEEDS
    if n_seeds < MIN_SEEDS:
        raise UsageError(f"--seeds {n_seeds} is not allowed; allowed: an integer >= {MIN_SEEDS} (every cell is a "
                         "mean ± std over seeds, every improvement a paired t interval)")
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs {args.epochs} is not allowed; allowed: an integer >= 1")
    ratios = parse_ratios(args.ratios, args.table)
    variants = ()
    if args.table == "structure":
        if len(ratios) != 1:
            raise UsageError(f"--ratios {args.ratios}: the structure table has one teacher; allowed: one ratio")
        variants = structure_variants(parse_numbers(args.sparsities, "--sparsities", STRUCTURE_SPARSITIES, low=0.0,
                                                    open_low=True, example="0.5,0.8,0.9", symbol="s"))
    elif args.sparsities is not None:
        raise UsageError(f"--sparsities {args.sparsities}: {args.table} has no sparse students; allowed: "
                         "--sparsities with structure only")
    fixed = dict(parse_assignment(item) for item in args.set)
    protocol = sorted(set(fixed) & set(PROTOCOL_KEYS + (STRUCTURE_KEYS if variants else ())))
    if protocol:
        raise UsageError(f"--set {protocol[0]}=...: the protocol sets {protocol[0]} itself; allowed: any other "
                         f"setting (use --epochs for the length)")
    for flag in ("dataset", "arch", "data_root"):
        if getattr(args, flag) is not None:
            fixed[flag] = getattr(args, flag)
    epochs = args.epochs or (SMOKE["epochs"] if args.smoke_test else study.epochs)
    top = best_config(args.best, mode) if args.best else None
    kd, sources = kd_settings(study, top, args.best, fixed)
    settings = {**study.fixed, **fixed, **kd, "mode": mode, "epochs": epochs, "teacher_epochs": epochs,
                "seed": 0, "prune_ratio": 0.0, "eval_test": True}
    base = resolve(TrainConfig.from_dict(settings, source="settings"))
    notes = ()
    if top is not None and (top.dataset, top.arch) != (base.dataset, base.arch):
        notes = (f"note: --best {args.best} was tuned on {top.dataset}/{top.arch}; its distillation settings "
                 f"are used here on {base.dataset}/{base.arch}",)
    out_dir = Path(args.out).expanduser().resolve()
    check_writable(out_dir, "--out")
    # One store for everything run in this folder (searches, their final runs, reproductions): one UI shows it all.
    tracking_uri = resolve_tracking_uri(args.tracking_uri, Path(RESULTS_FOLDER))
    name = unique_name(out_dir, f"{args.table}-{base.dataset}-{base.arch}-{time.strftime('%Y%m%d-%H%M%S')}")
    return ReproducePlan(args.table, base, tuple(range(n_seeds)), ratios, sources, out_dir, name,
                         tracking_uri, args.experiment or f"rekd-reproduce{SMOKE_SUFFIX if args.smoke_test else ''}",
                         study.cpus,
                         study.gpus, args.best, notes, cpu_only=args.cpu_only, variants=variants)


def parse_ratios(text: Optional[str], table: str) -> tuple[float, ...]:
    if table == "table2" and text is not None:
        raise UsageError(f"--ratios {text}: {table} has no teacher to prune; allowed: --ratios with table1 or structure")
    if table == "table2":
        return ()
    default = PAPER_RATIOS if table == "table1" else (STRUCTURE_RATIO,)
    return parse_numbers(text, "--ratios", default, low=0.0, open_low=False, example="0,0.1,0.3,0.5,0.7")


def parse_numbers(text: Optional[str], flag: str, default: tuple[float, ...], low: float, open_low: bool,
                  example: str, symbol: str = "r") -> tuple[float, ...]:
    """Distinct comma-separated numbers in [low, 1) (or (low, 1)); the default when the flag is not given."""
    if text is None:
        return default
    values = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            value = None
        if value is None or not (low < value < 1 if open_low else low <= value < 1):
            bound = f"{low:g} {'<' if open_low else '<='} {symbol} < 1"
            raise UsageError(f"{flag} {text}: {item.strip()!r} is not allowed; allowed: comma-separated numbers "
                             f"{bound}, e.g. {example}")
        if value in values:
            raise UsageError(f"{flag} {text}: {value:g} appears twice; allowed: distinct values")
        values.append(value)
    return tuple(values)


def kd_settings(study: Study, top: Optional[TrainConfig], best: Optional[str], fixed: dict) -> tuple[dict, dict]:
    """The distillation settings and the source of each: --set, else the --best file's top config, else the
    study's fixed value, else TrainConfig's default (a setting the study searches has no value of its own)."""
    defaults = TrainConfig()
    values, sources = {}, {}
    for key in KD_SETTINGS[study.fixed["mode"]]:
        if key in fixed:
            values[key], sources[key] = fixed[key], "--set"
        elif top is not None:
            values[key], sources[key] = getattr(top, key), f"--best {best}"
        elif key in study.fixed:
            values[key], sources[key] = study.fixed[key], f"study {study.name}"
        else:
            values[key], sources[key] = getattr(defaults, key), "TrainConfig default"
    return values, sources


def best_config(path: str, mode: str) -> TrainConfig:
    """The top config of a rekd.best file, which must come from a search of this table's mode."""
    from rekd.evaluate.final import load_configs

    _, configs = load_configs(path, None)
    top = configs[0]
    if top.mode != mode:
        raise UsageError(f"--best {path} holds {top.mode} configs; allowed: the best file of a {mode} search "
                         f"(python -m rekd.best rekd-{mode} --out FILE)")
    return top


def unique_name(out_dir: Path, name: str) -> str:
    """name, or name-2, name-3... when a reproduction started in the same second already has it."""
    candidate, n = name, 1
    while (out_dir / candidate).exists():
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(_main, PROG, argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    from rekd.datasets import load_dataset

    args = build_parser().parse_args(argv)
    plan = dataclasses.replace(plan_from_args(args), verbose=args.verbose)
    # Each seed carves its own validation split; a missing dataset stops here, before anything is written.
    data = {seed: load_dataset(dataclasses.replace(plan.base, seed=seed)) for seed in plan.seeds}
    from rekd.library_log import LibraryLog
    from rekd.evaluate.reproduce_run import execute
    from rekd.search.ray_session import check_cluster_address

    check_cluster_address()  # a cluster that does not answer stops here, before the store or a folder is made
    library_log = LibraryLog(verbose=plan.verbose).apply()
    try:
        return execute(plan, data, library_log)
    finally:
        library_log.close()
