"""The tabular benchmark of rekd's own search problem: real learning curves, recorded once, replayed many times.

As LCBench and NAS-Bench-201 do for theirs: a fixed, seeded sample of configurations of both re-KD modes
(a Latin hypercube over each mode's search space, SPACES) is trained for the whole epoch budget with
several seeds, and every epoch's val_acc, test_acc, energy per sample and wall time is recorded.
rekd.bench.replay then serves these curves to the real search machinery, so that search strategies can be
compared over hundreds of seeded searches in minutes instead of GPU-weeks.

Building runs every (mode, configuration, seed) as a Ray task of one CPU; each finished run is appended to
`runs.jsonl` in the work folder, so a killed build continues where it stopped. The result is one gzipped CSV
(one row per run and epoch) whose `#` header lines carry the design, the code version and the libraries'.
"""
from __future__ import annotations

import dataclasses
import gzip
import csv
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import optuna

from rekd.errors import UsageError

FORMAT = "rekd tabular benchmark, format 1"
MODES = ("sparse_kd", "default_kd")
TEMPERATURE = optuna.distributions.FloatDistribution(1.0, 20.0, log=True)
ALPHA = optuna.distributions.FloatDistribution(0.0, 1.0)
# SGD's peak learning rate (cosine schedule), a decade either side of rekd's default 0.1, capped where the
# tiny networks start to diverge.
LR = optuna.distributions.FloatDistribution(0.01, 0.5, log=True)
# Each mode's search space: the shipped studies' (search_spaces/*.yaml) and the learning rate.
SPACES: dict[str, dict[str, optuna.distributions.FloatDistribution]] = {
    "sparse_kd": {"prune_ratio": optuna.distributions.FloatDistribution(0.0, 0.9), "temperature": TEMPERATURE,
                  "alpha": ALPHA, "lr": LR},
    "default_kd": {"confidence": optuna.distributions.FloatDistribution(0.9, 0.99), "temperature": TEMPERATURE,
                   "alpha": ALPHA, "lr": LR},
}
PARAMS = ("prune_ratio", "confidence", "temperature", "alpha", "lr")  # the CSV's parameter columns
METRICS = ("val_acc", "test_acc", "energy_uj", "wall_s", "diverged")  # the CSV's per-epoch columns
COLUMNS = ("mode", "config", "seed", "epoch", *PARAMS, *METRICS)
DEFAULT_CONFIGS = {"digits": 200, "ndigits": 24}  # per mode: ndigits costs ~10x more per epoch on CPUs
TABLES_DIR = Path(__file__).resolve().parent / "tables"  # the tables shipped with rekd
PROG = "python -m rekd.bench.tabular build"


class BuildInterrupted(Exception):
    """A build ended by a signal, its runs so far recorded; `exit_status` as a shell reports the signal."""

    def __init__(self, exit_status: int):
        super().__init__(f"interrupted (exit status {exit_status})")
        self.exit_status = exit_status


@dataclasses.dataclass(frozen=True)
class Design:
    """What a table holds: `configs` Latin-hypercube points per mode, each trained with seeds 0..seeds-1."""
    dataset: str = "digits"
    configs: int = 200
    seeds: int = 2
    epochs: int = 8
    arch: str = "tiny"
    batch_size: int = 32
    val_fraction: float = 0.1  # of the training split, held out for validation (rekd's default)
    design_seed: int = 0  # seeds the Latin hypercube

    def check(self) -> "Design":
        from rekd.datasets import DATASETS
        from rekd.snn.models import ARCHS

        for name, value, ok, allowed in (
                ("dataset", self.dataset, self.dataset in DATASETS and self.dataset not in ("cifar100", "dvsgesture"),
                 "an embedded dataset: " + " | ".join(d for d in DATASETS if d not in ("cifar100", "dvsgesture"))),
                ("arch", self.arch, self.arch in ARCHS, " | ".join(ARCHS)),
                ("configs", self.configs, self.configs >= 2, "an integer >= 2 (per mode)"),
                ("seeds", self.seeds, self.seeds >= 1, "an integer >= 1"),
                ("epochs", self.epochs, self.epochs >= 1, "an integer >= 1"),
                ("batch_size", self.batch_size, self.batch_size >= 1, "an integer >= 1"),
                ("val_fraction", self.val_fraction, 0 < self.val_fraction < 1, "0 < val_fraction < 1")):
            if not ok:
                raise UsageError(f"{name}={value!r} is not allowed; allowed: {allowed}")
        return self

    def points(self, mode: str) -> list[dict[str, float]]:
        """The mode's configurations: a Latin hypercube (centred-discrepancy optimised) mapped onto SPACES,
        log-scaled where the distribution is. The same on every machine for the same design."""
        from scipy.stats import qmc

        space = SPACES[mode]
        offset = MODES.index(mode)  # the modes get different hypercubes from one design seed
        unit = qmc.LatinHypercube(d=len(space), optimization="random-cd", seed=self.design_seed * 101 + offset)
        return [{name: from_unit(dist, float(u)) for (name, dist), u in zip(space.items(), row)}
                for row in unit.random(self.configs)]

    def train_config(self, mode: str, params: dict[str, float], seed: int):
        from rekd.config import TrainConfig

        return TrainConfig(mode=mode, dataset=self.dataset, arch=self.arch, epochs=self.epochs,
                           teacher_epochs=self.epochs, batch_size=self.batch_size, val_fraction=self.val_fraction,
                           seed=seed, eval_test=True, device="cpu", **params)

    def keys(self) -> list[tuple[str, int, int]]:
        """Every run as (mode, config, seed), seed-major so that a partial build covers every config once."""
        return [(mode, c, s) for s in range(self.seeds) for mode in MODES for c in range(self.configs)]


def from_unit(dist: optuna.distributions.FloatDistribution, u: float) -> float:
    if dist.log:
        return math.exp(math.log(dist.low) + u * (math.log(dist.high) - math.log(dist.low)))
    return dist.low + u * (dist.high - dist.low)


def to_unit(dist: optuna.distributions.FloatDistribution, value: float) -> float:
    if dist.log:
        return (math.log(value) - math.log(dist.low)) / (math.log(dist.high) - math.log(dist.low))
    return (value - dist.low) / (dist.high - dist.low)


# --- one run (a Ray task) ---------------------------------------------------------------------------------------

def train_teacher(design: Design, seed: int) -> dict:
    """The baseline sparse_kd's runs of this seed prune: from rekd's teacher cache, or trained and cached."""
    import torch

    from rekd.train.loop import ensure_teacher

    torch.set_num_threads(1)
    return ensure_teacher(design.train_config("sparse_kd", {}, seed))


def train_run(design: Design, mode: str, params: dict[str, float], seed: int,
              teacher_weights: Optional[dict]) -> list[dict]:
    """One run's per-epoch records {epoch, val_acc, test_acc, energy_uj, wall_s, diverged}. A run that
    diverges ends there, its last epoch marked diverged (a real outcome of its configuration, kept)."""
    import torch

    from rekd.train.loop import NonFiniteLoss, train

    torch.set_num_threads(1)  # one CPU per task: the tasks of a build share the machine
    epochs: list[dict] = []
    clock = [time.perf_counter()]

    def record(metrics: dict) -> None:
        now = time.perf_counter()
        epochs.append({"epoch": int(metrics["epoch"]), "val_acc": float(metrics["val_acc"]),
                       "test_acc": float(metrics["test_acc"]), "energy_uj": float(metrics["energy_uj"]),
                       "wall_s": now - clock[0], "diverged": int(bool(metrics.get("diverged")))})
        clock[0] = now

    try:
        train(design.train_config(mode, params, seed), teacher_weights=teacher_weights, on_epoch=record)
    except NonFiniteLoss:
        pass
    return epochs


# --- the work folder: what a build has done so far --------------------------------------------------------------

def check_work_dir(work: Path, design: Design) -> None:
    """Make the work folder, or check that the one there was started with the same design."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / "design.json"
    wanted = dataclasses.asdict(design)
    if path.is_file():
        found = {**dataclasses.asdict(Design()), **json.loads(path.read_text())}  # a key added since: its default
        if found != wanted:
            differ = ", ".join(f"{k}={found.get(k)!r} there, {v!r} now" for k, v in wanted.items() if found.get(k) != v)
            raise UsageError(f"{work} holds a build of another design ({differ}); give the same settings to "
                             f"continue it, or another --work-dir")
    else:
        path.write_text(json.dumps(wanted, indent=2) + "\n")


def read_runs(path: Path) -> dict[tuple[str, int, int], dict]:
    """The runs recorded so far by (mode, config, seed). A line cut short by a killed build is skipped: that
    run is trained again."""
    runs = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                run = json.loads(line)
            except json.JSONDecodeError:
                continue
            runs[(run["mode"], run["config"], run["seed"])] = run
    return runs


def end_last_line(path: Path) -> None:
    """A build killed while writing leaves its last line unfinished: end it, so the next run gets a line of its own."""
    if path.is_file() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def append_run(path: Path, run: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(run) + "\n")
        f.flush()
        os.fsync(f.fileno())


# --- the build ----------------------------------------------------------------------------------------------

def build(design: Design, work: Path, out: Path, progress=print) -> Path:
    """Train every run of the design not yet in `work`, as Ray tasks, then write the table to `out`."""
    from rekd.locks import FileLock, Held

    design.check()
    check_work_dir(work, design)
    try:  # a second build on the same folder would train every run again beside the first
        lock = FileLock(work / "build.lock").acquire()
    except Held as e:
        raise UsageError(f"{work} is being built by {e.holder}; wait for it, or give another --work-dir") from None
    with lock:
        return build_locked(design, work, out, progress)


def build_locked(design: Design, work: Path, out: Path, progress) -> Path:
    runs_path = work / "runs.jsonl"
    end_last_line(runs_path)
    done = read_runs(runs_path)
    points = {mode: design.points(mode) for mode in MODES}
    todo = [k for k in design.keys() if k not in done]
    total = len(design.keys())
    progress(f"{design.dataset}: {total} runs ({design.configs} configurations x {len(MODES)} modes x "
             f"{design.seeds} seeds, {design.epochs} epochs each); {len(done)} recorded in {work}, {len(todo)} to train")
    if todo:
        train_all(design, points, todo, runs_path, len(done), total, progress)
    write_table(out, design, points, read_runs(runs_path))
    progress(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")
    return out


def train_all(design: Design, points: dict, todo: list, runs_path: Path, done: int, total: int, progress) -> None:
    from rekd.provenance import code_version
    from rekd.search.interrupt import Interruption
    from rekd.search.ray_session import start_ray, stop_ray

    version = code_version()
    start_ray(worker_output=False)
    # Ctrl-C, and the SIGTERM a scheduler or `kill` sends, end the build alike: Ray stopped, the runs recorded so
    # far kept, the way to continue printed.
    try:
        with Interruption(PROG) as interruption:
            submit_and_record(design, points, todo, runs_path, done, total, progress, version)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted by {interruption.name}: {len(read_runs(runs_path))} of {total} runs are recorded in "
              f"{runs_path.parent}; the same command continues the build", file=sys.stderr, flush=True)
        raise BuildInterrupted(interruption.exit_status) from None
    finally:
        stop_ray()


def submit_and_record(design: Design, points: dict, todo: list, runs_path: Path, done: int, total: int, progress,
                      version: str) -> None:
    import ray

    teacher_task = ray.remote(num_cpus=1)(train_teacher)
    run_task = ray.remote(num_cpus=1)(train_run)
    teachers = {seed: teacher_task.remote(design, seed) for seed in sorted({s for m, _, s in todo if m == "sparse_kd"})}
    pending = {run_task.remote(design, mode, points[mode][c], seed, teachers.get(seed) if mode == "sparse_kd" else None):
               (mode, c, seed) for mode, c, seed in todo}
    started = time.perf_counter()
    finished = 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        mode, c, seed = pending.pop(ready[0])
        epochs = ray.get(ready[0])
        append_run(runs_path, {"mode": mode, "config": c, "seed": seed, "params": points[mode][c],
                               "code_version": version, "epochs": epochs})
        finished += 1
        rate = (time.perf_counter() - started) / finished
        last = epochs[-1]
        progress(f"[{done + finished}/{total}] {mode} #{c} seed {seed}: val_acc {last['val_acc']:.3f} test_acc "
                 f"{last['test_acc']:.3f}{' (diverged)' if last['diverged'] else ''}; about "
                 f"{rate * len(pending) / 60:.0f} min to go")


def write_table(out: Path, design: Design, points: dict, runs: dict) -> None:
    """The gzipped CSV, atomically, byte-for-byte the same for the same runs (no timestamp in the gzip)."""
    from rekd.provenance import provenance

    missing = [k for k in design.keys() if k not in runs]
    if missing:
        raise RuntimeError(f"{len(missing)} runs missing from the build, e.g. {missing[0]}")
    versions = sorted({runs[k]["code_version"] for k in design.keys()})
    libraries = {k: v for k, v in provenance().items() if k.startswith("version/") or k == "python"}
    text = io.StringIO()
    text.write(f"# {FORMAT}\n# design: {json.dumps(dataclasses.asdict(design), sort_keys=True)}\n"
               f"# spaces: {json.dumps(space_text(), sort_keys=True)}\n"
               f"# code_version: {', '.join(versions)}\n# libraries: {json.dumps(libraries, sort_keys=True)}\n")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(COLUMNS)
    for mode, c, seed in sorted(design.keys()):
        params = points[mode][c]
        for e in runs[(mode, c, seed)]["epochs"]:
            writer.writerow([mode, c, seed, e["epoch"], *(short(params.get(p)) for p in PARAMS),
                             *(short(e[m]) for m in METRICS)])
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    with open(part, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(text.getvalue().encode())
    os.replace(part, out)


def short(value) -> str:
    """A CSV cell: empty for a parameter the mode has not, 6 significant digits for a float (accuracies on
    hundreds of samples and seconds need no more)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def space_text() -> dict:
    return {mode: {name: {"low": d.low, "high": d.high, "log": d.log} for name, d in space.items()}
            for mode, space in SPACES.items()}


# --- reading a table -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Table:
    """A table as the replay reads it: per mode, the configurations' params, and per (config, seed) the curve,
    one record per epoch."""
    design: Design
    header: dict[str, str]
    params: dict[str, list[dict[str, float]]]  # mode -> config -> {param: value}
    curves: dict[tuple[str, int, int], list[dict]]  # (mode, config, seed) -> [{val_acc, test_acc, ...}]

    def final_test(self, mode: str, config: int) -> float:
        """The configuration's quality: its final test accuracy, averaged over the seeds."""
        return self.final_mean(mode, config, "test_acc")

    def final_val(self, mode: str, config: int) -> float:
        return self.final_mean(mode, config, "val_acc")

    def final_mean(self, mode: str, config: int, metric: str) -> float:
        return sum(self.curves[(mode, config, s)][-1][metric] for s in range(self.design.seeds)) / self.design.seeds


def read_table(path: str | os.PathLike) -> Table:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no tabular benchmark at {path}; `python -m rekd.bench.tabular build` makes one")
    with gzip.open(path, "rt") as f:
        lines = f.read().splitlines()
    header = dict(line[2:].split(": ", 1) for line in lines if line.startswith("# ") and ": " in line)
    if not lines or lines[0] != f"# {FORMAT}":
        raise UsageError(f"{path} is not a rekd tabular benchmark of this version (first line: {lines[0][:60]!r})")
    design = Design(**json.loads(header["design"]))
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    params: dict[str, list[dict[str, float]]] = {mode: [{}] * design.configs for mode in MODES}
    curves: dict[tuple[str, int, int], list[dict]] = {}
    for row in rows:
        mode, c, seed = row["mode"], int(row["config"]), int(row["seed"])
        params[mode][c] = {p: float(row[p]) for p in SPACES[mode]}
        curves.setdefault((mode, c, seed), []).append(
            {"epoch": int(row["epoch"]), **{m: float(row[m]) for m in METRICS}})
    return Table(design, header, params, curves)


def shipped(name: str) -> Path:
    return TABLES_DIR / f"{name}.csv.gz"


def table_path(name_or_path: str) -> Path:
    """A shipped table's name (digits, ndigits, ...) or a file."""
    if "/" in name_or_path or name_or_path.endswith(".gz"):
        return Path(name_or_path)
    if not shipped(name_or_path).is_file():
        names = sorted(p.name.removesuffix(".csv.gz") for p in TABLES_DIR.glob("*.csv.gz"))
        raise UsageError(f"--table {name_or_path!r} is not a shipped table; allowed: {' | '.join(names)}, or a "
                         ".csv.gz file")
    return shipped(name_or_path)

