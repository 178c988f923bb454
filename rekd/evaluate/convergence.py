"""`python -m rekd.evaluate.convergence`: has the baseline converged at a given epoch budget?

A comparison of distillation against a baseline means little while the baseline is still learning: a KD term
can look like a gain when it only speeds up an unfinished run. Each run's learning rate anneals to zero over
its own budget (cosine), so the last epoch of a short run is not an early epoch of a long one: the question
is answered by training the baseline at several budgets, under the same seeds, and comparing their final
test accuracies. A budget has converged when doubling it changes the final accuracy by less than the seeds
disagree (the paired difference's 95% interval contains 0, or is small). Runs go to a local process pool,
one thread each; this is a check of a configuration's length, not a search.

Writes `<out>/convergence.json` (every run's per-epoch history), `convergence.md` (final test accuracy per
budget, mean +- std, and the paired change from the budget before) and `convergence.png` (the final accuracy
against the budget, and the per-epoch test accuracy of every run). convergence.json is rewritten as each run
finishes: run again into the same folder (after Ctrl-C, or with more budgets or seeds), the check keeps the
runs it already has (same settings) and trains only the others. One check writes a folder at a time.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from rekd.cli import Parser, run
from rekd.config import TrainConfig
from rekd.errors import UsageError
from rekd.locks import FileLock, Held
from rekd.provenance import provenance
from rekd.stats import mean_std, paired_ci

PROG = "python -m rekd.evaluate.convergence"
MIN_SEEDS = 3  # the paired interval between budgets is a Student t over seeds


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Train the baseline at several epoch budgets under the same seeds and "
                                      "compare their final test accuracies: has it converged?")
    p.add_argument("--dataset", default="digits", help="digits (default) | ndigits | cifar100 | dvsgesture")
    p.add_argument("--arch", default="tiny", help="tiny (default) | resnet18 | wrn16_4 | vgg16")
    p.add_argument("--budgets", default="4,8,16", metavar="E,E,...", help="epoch budgets, ascending (default 4,8,16)")
    p.add_argument("--seeds", type=int, default=3, metavar="N", help=f"seeds 0..N-1 (default 3, at least {MIN_SEEDS})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fix another TrainConfig setting for every run (not mode, seed, epochs)")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="runs at once (default: the CPU count)")
    p.add_argument("--out", default="convergence-results", metavar="DIR", help="results folder (default ./convergence-results)")
    return p


def parse_budgets(text: str) -> tuple[int, ...]:
    try:
        budgets = tuple(int(item) for item in text.split(","))
    except ValueError:
        budgets = ()
    if not budgets or any(b < 1 for b in budgets) or list(budgets) != sorted(set(budgets)):
        raise UsageError(f"--budgets {text} is not allowed; allowed: distinct ascending integers >= 1, e.g. 4,8,16")
    return budgets


def base_config(args) -> TrainConfig:
    cfg = TrainConfig(dataset=args.dataset, arch=args.arch).with_overrides(args.set)
    fixed = [key for item in args.set for key in (item.partition("=")[0].strip(),) if key in ("mode", "seed", "epochs")]
    if fixed:
        raise UsageError(f"--set {fixed[0]}=...: the check sets {fixed[0]} itself; allowed: any other setting")
    return TrainConfig.from_dict({**cfg.to_dict(), "mode": "baseline", "eval_test": True, "device": "cpu"})


def quiet_worker() -> None:
    """A pool worker leaves Ctrl-C (sent to the whole terminal's process group) to the parent, which ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def train_one(cfg: TrainConfig) -> dict:
    """One baseline run in a worker process: its per-epoch validation and test accuracy."""
    import torch

    from rekd.train.loop import train

    torch.set_num_threads(1)  # one run per core: the pool is the parallelism
    start = time.monotonic()
    result = train(cfg)
    return {"epochs": cfg.epochs, "seed": cfg.seed, "wall_s": round(time.monotonic() - start, 1),
            "val_acc": [h["val_acc"] for h in result.history], "test_acc": [h["test_acc"] for h in result.history]}


def earlier_runs(path: Path, base: TrainConfig) -> list[dict]:
    """The runs an earlier (or interrupted) check in this folder made, if its settings were these."""
    if not path.exists():
        return []
    earlier = json.loads(path.read_text())
    if earlier.get("config") != base.to_dict():
        raise UsageError(f"--out {path.parent} holds a convergence check of other settings; allowed: the same "
                         "settings (to add budgets or seeds) or another --out")
    return earlier["runs"]


def save(path: Path, document: dict) -> None:
    """Replace the file whole: a check killed while writing leaves the previous version."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=1) + "\n")
    os.replace(tmp, path)


def summary(runs: list[dict], budgets: Sequence[int], seeds: Sequence[int]) -> list[dict]:
    """Per budget: final test accuracy (%) mean +- std, and the paired change from the previous budget."""
    final = {(r["epochs"], r["seed"]): r["test_acc"][-1] for r in runs}
    rows, previous = [], None
    for budget in budgets:
        scores = [final[budget, s] for s in seeds]
        mean, std = mean_std(scores)
        row = {"epochs": budget, "test_acc_mean": 100 * mean, "test_acc_std": 100 * std}
        if previous is not None:
            gain, low, high = paired_ci(scores, previous)
            row.update(change=100 * gain, change_low=100 * low, change_high=100 * high)
        rows.append(row)
        previous = scores
    return rows


def markdown(rows: list[dict], cfg: TrainConfig, seeds: Sequence[int]) -> str:
    lines = [f"Baseline ({cfg.dataset}/{cfg.arch}) final test accuracy against its epoch budget, {len(seeds)} seeds "
             "(cosine schedule over each budget); change = this budget minus the one before, paired by seed, "
             "with its 95% interval.", "",
             "| Epochs | Test acc. (%) | Change (%) | 95% CI of the change (%) |", "|---|---|---|---|"]
    for row in rows:
        change = (f"{row['change']:+.2f} | [{row['change_low']:+.2f}, {row['change_high']:+.2f}]"
                  if "change" in row else "– | –")
        lines.append(f"| {row['epochs']} | {row['test_acc_mean']:.2f} ± {row['test_acc_std']:.2f} | {change} |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], rows: list[dict], cfg: TrainConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.errorbar([r["epochs"] for r in rows], [r["test_acc_mean"] for r in rows],
                  yerr=[r["test_acc_std"] for r in rows], marker="o", capsize=3)
    left.set(xscale="log", xlabel="epoch budget", ylabel="final test accuracy (%)",
             title=f"{cfg.dataset}/{cfg.arch} baseline: final accuracy")
    left.set_xticks([r["epochs"] for r in rows], [str(r["epochs"]) for r in rows])
    left.minorticks_off()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    budgets = [r["epochs"] for r in rows]
    for run_ in runs:
        color = colors[budgets.index(run_["epochs"]) % len(colors)]
        epochs = range(1, len(run_["test_acc"]) + 1)
        right.plot(epochs, [100 * a for a in run_["test_acc"]], color=color, alpha=0.7,
                   label=f"{run_['epochs']} epochs" if run_["seed"] == 0 else None)
    right.set(xlabel="epoch", ylabel="test accuracy (%)", title="per epoch, every seed",
              ylim=(max(0, min(100 * min(r["test_acc"][-1] for r in runs) - 15, 100)), 100))
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    budgets = parse_budgets(args.budgets)
    if args.seeds < MIN_SEEDS:
        raise UsageError(f"--seeds {args.seeds} is not allowed; allowed: an integer >= {MIN_SEEDS}")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers {args.workers} is not allowed; allowed: an integer >= 1")
    base = base_config(args)
    from rekd.train.loop import resolve

    resolve(base)  # a dataset or architecture that is not there is refused before anything runs
    seeds = tuple(range(args.seeds))
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        lock = FileLock(out / "convergence.lock").acquire()
    except Held as e:
        raise UsageError(f"--out {out} is being written by another convergence check ({e.holder}); allowed: "
                         "wait for it to end, or another --out") from None
    with lock:  # SIGTERM ends the check as Ctrl-C does (rekd.cli): workers stopped, runs kept
        return check(base, budgets, seeds, out, args.workers or multiprocessing.cpu_count())


def check(base: TrainConfig, budgets: tuple[int, ...], seeds: tuple[int, ...], out: Path, workers: int) -> int:
    path = out / "convergence.json"
    runs = earlier_runs(path, base)
    kept = [r for r in runs if r["epochs"] in budgets and r["seed"] in seeds]
    done = {(r["epochs"], r["seed"]) for r in runs}
    configs = [TrainConfig.from_dict({**base.to_dict(), "epochs": e, "seed": s}) for e in reversed(budgets)
               for s in seeds if (e, s) not in done]  # longest first: the pool ends on short runs, not one long one
    print(f"{len(configs)} baseline runs of {base.dataset}/{base.arch} (budgets {', '.join(map(str, budgets))} "
          f"epochs x seeds {', '.join(map(str, seeds))}), {workers} at once"
          + (f"; {len(kept)} kept from {out / 'convergence.json'}" if kept else ""), flush=True)
    start, new = time.monotonic(), 0
    document = {"config": base.to_dict(), "budgets": budgets, "seeds": seeds, "rows": [], "runs": runs,
                "provenance": provenance()}
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=quiet_worker)
    try:
        for r in pool.imap_unordered(train_one, configs):
            runs.append(r)
            new += 1
            save(path, document)  # each finished run survives an interruption
            print(f"{r['epochs']} epochs seed {r['seed']}: test_acc={r['test_acc'][-1]:.4f} "
                  f"({r['wall_s']:.0f} s; {new}/{len(configs)} done)", flush=True)
    except KeyboardInterrupt:
        kept_where = f"kept in {path}" if new or runs else "finished"
        print(f"interrupted: {new} of {len(configs)} runs {kept_where}; the same command trains the rest",
              file=sys.stderr)
        raise
    finally:
        pool.terminate()
        pool.join()
    runs.sort(key=lambda r: (r["epochs"], r["seed"]))
    asked = [r for r in runs if r["epochs"] in budgets and r["seed"] in seeds]
    rows = summary(asked, budgets, seeds)
    wall = time.monotonic() - start
    save(path, {**document, "rows": rows, "wall_s": round(wall, 1)})
    table = markdown(rows, base, seeds)
    (out / "convergence.md").write_text(table)
    plot(asked, rows, base, out / "convergence.png")
    print(table + f"wall time {wall:.0f} s; written: {out}/convergence.md, convergence.png, convergence.json")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(_main, PROG, argv)


if __name__ == "__main__":
    sys.exit(main())
