"""How good is rekd's search? Every strategy replayed over a tabular benchmark (rekd.bench.replay), many seeds.

For each mode of the table and each strategy, `seeds` searches of the same epoch budget. A search's score
is its incumbent's regret (test accuracy the configuration it would pick by validation misses against the
table's best), after every trial; summarised as the mean regret at the budget and at half of it, with a 95 %
interval paired by seed against random search, the epochs it took to come within TARGET_REGRET of the best
(median over seeds), and the strategy's rank among all (per mode and seed, ties shared; mean over them with
a bootstrap 95 % interval).
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

from rekd.bench.replay import Replay, Strategy, budget_to_reach, regret_at
from rekd.bench.table import MODES, read_table, table_path
from rekd.errors import UsageError

TARGET_REGRET = 0.005  # within half a point of the best configuration's test accuracy
FULL_TRIALS = 16  # the default budget: this many full-budget trials' worth of epochs (the shipped studies' num_samples)
REFERENCE = "random"  # what every strategy is compared with, paired by seed

STRATEGIES = [
    Strategy("random", "random", "none"),
    Strategy("random + ASHA", "random", "asha", grace_period=2, reduction_factor=2),
    Strategy("TPE", "tpe", "none"),
    Strategy("TPE + ASHA grace 1", "tpe", "asha", grace_period=1, reduction_factor=2),
    Strategy("TPE + ASHA grace 2", "tpe", "asha", grace_period=2, reduction_factor=2),
    Strategy("TPE + ASHA grace 4", "tpe", "asha", grace_period=4, reduction_factor=2),
    Strategy("TPE + ASHA grace 1, eta 3", "tpe", "asha", grace_period=1, reduction_factor=3),
    Strategy("TPE multivariate", "tpe-multivariate", "none"),
    Strategy("TPE multivariate + ASHA grace 2", "tpe-multivariate", "asha", grace_period=2, reduction_factor=2),
    Strategy("TPE + ASHA grace 2, 4 at a time", "tpe", "asha", grace_period=2, reduction_factor=2, concurrency=4),
    Strategy("TPE constant liar + ASHA grace 2, 4 at a time", "tpe-liar", "asha", grace_period=2,
             reduction_factor=2, concurrency=4),
    Strategy("Hyperband (async, 3 brackets)", "random", "hyperband", grace_period=1, reduction_factor=2),
    Strategy("BOHB-style + Hyperband", "bohb", "hyperband", grace_period=1, reduction_factor=2),
]
BY_NAME = {s.name: s for s in STRATEGIES}


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One strategy over one mode's seeds."""
    strategy: str
    mode: str
    curves: list  # per seed: [(epochs spent, regret)]
    val_curves: list  # per seed: [(epochs spent, validation regret)]
    trials: list  # per seed: how many trials it ran
    full: list  # per seed: how many of them ran the full budget
    budget: int
    none: float  # the regret before any trial ends (the best configuration's whole accuracy)

    def regrets(self, spent: Optional[int] = None) -> list[float]:
        return [regret_at(c, self.budget if spent is None else spent, self.none) for c in self.curves]

    def val_regrets(self) -> list[float]:
        return [regret_at(c, self.budget, self.none) for c in self.val_curves]

    def to_target(self, target: float = TARGET_REGRET) -> list[float]:
        return [budget_to_reach(c, target) for c in self.curves]


@lru_cache(maxsize=4)
def replay_of(path: str, mode: str) -> Replay:
    return Replay(read_table(path), mode)


def one(job: tuple) -> tuple:
    """A worker's job: one seeded search -> (curve, trials, full-budget trials)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    path, mode, name, seed, budget = job
    replay = replay_of(path, mode)
    result = replay.search(BY_NAME[name], seed, budget)
    return (result.curve, len(result.trials), sum(t.epochs == replay.max_t for t in result.trials),
            result.val_curve)


def compare(path: Path, modes: Sequence[str], strategies: Sequence[Strategy], seeds: int, budget: Optional[int],
            workers: int, progress=print) -> list[Outcome]:
    table = read_table(path)
    budget = budget or FULL_TRIALS * table.design.epochs
    skipped = [s.name for s in strategies if s.stopping != "none" and s.grace_period > table.design.epochs]
    if skipped:
        progress(f"left out, their grace period exceeds the table's {table.design.epochs} epochs: {', '.join(skipped)}")
        strategies = [s for s in strategies if s.name not in skipped]
    jobs = [(str(path), mode, s.name, seed, budget) for mode in modes for s in strategies for seed in range(seeds)]
    progress(f"{path.name}: {len(strategies)} strategies x {len(modes)} modes x {seeds} seeds = {len(jobs)} searches "
             f"of {budget} epochs each, on {workers} processes")
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(one, jobs, chunksize=4))
    else:
        results = [one(job) for job in jobs]
    outcomes, i = [], 0
    for mode in modes:
        none = replay_of(str(path), mode).best
        for s in strategies:
            chunk = results[i:i + seeds]
            i += seeds
            outcomes.append(Outcome(s.name, mode, [r[0] for r in chunk], [r[3] for r in chunk],
                                    [r[1] for r in chunk], [r[2] for r in chunk], budget, none))
    return outcomes


def ranks(outcomes: Sequence[Outcome]) -> dict[str, list[float]]:
    """Each strategy's rank (1 = least regret at the budget; ties share the mean rank) in every (mode, seed)."""
    by_strategy: dict[str, list[float]] = {}
    for mode in dict.fromkeys(o.mode for o in outcomes):
        group = [o for o in outcomes if o.mode == mode]
        table = [o.regrets() for o in group]
        for seed in range(len(table[0])):
            values = [row[seed] for row in table]
            for o, value in zip(group, values):
                below = sum(v < value for v in values)
                equal = sum(v == value for v in values)
                by_strategy.setdefault(o.strategy, []).append(below + (equal + 1) / 2)
    return by_strategy


def bootstrap_ci(values: Sequence[float], level: float = 0.95, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    rng = random.Random(seed)
    means = sorted(statistics.mean(rng.choices(values, k=len(values))) for _ in range(draws))
    return means[int((1 - level) / 2 * draws)], means[min(int((1 + level) / 2 * draws), draws - 1)]


def summary_rows(outcomes: Sequence[Outcome], target: float = TARGET_REGRET, against: Optional[str] = None) -> list[dict]:
    """One row per strategy over all modes: the numbers of the README's table; with `against`, each strategy's
    regret also paired by seed with that strategy's (how the shipped default was chosen)."""
    from rekd.stats import paired_ci

    rank_of = ranks(outcomes)
    rows = []
    names = list(dict.fromkeys(o.strategy for o in outcomes))
    reference = [r for o in outcomes if o.strategy == REFERENCE for r in o.regrets()]
    other = [r for o in outcomes if o.strategy == against for r in o.regrets()]
    for name in names:
        mine = [o for o in outcomes if o.strategy == name]
        regrets = [r for o in mine for r in o.regrets()]
        halfway = [r for o in mine for r in o.regrets(o.budget // 2)]
        early = [r for o in mine for r in o.regrets(o.budget // 8)]
        without = sum(not c or c[0][0] > o.budget // 8 for o in mine for c in o.curves)  # no trial ended yet
        needed = [n for o in mine for n in o.to_target(target)]
        row = {"strategy": name, "regret": statistics.mean(regrets), "regret_half": statistics.mean(halfway),
               "regret_eighth": statistics.mean(early) if not without else math.nan, "val_regret": statistics.mean(r for o in mine for r in o.val_regrets()),
               "median_to_target": statistics.median(needed), "reached": sum(math.isfinite(n) for n in needed),
               "searches": len(needed), "rank": statistics.mean(rank_of[name]), "rank_ci": bootstrap_ci(rank_of[name]),
               "trials": statistics.mean(n for o in mine for n in o.trials),
               "full": statistics.mean(n for o in mine for n in o.full)}
        if reference and name != REFERENCE and len(reference) == len(regrets):
            row["vs_random"] = paired_ci(regrets, reference)
            # Several strategies against one reference: Bonferroni's correction says which differences survive.
            _, low, high = paired_ci(regrets, reference, level=1 - 0.05 / max(len(names) - 1, 1))
            row["survives_correction"] = low > 0 or high < 0
        if other and name != against and len(other) == len(regrets):
            row["vs_against"] = paired_ci(regrets, other)
        rows.append(row)
    return rows


def exhaustive_regret(path: Path, modes: Sequence[str], seeds: int) -> float:
    """The mean regret of training every configuration and picking by validation (Replay.exhaustive_regret)."""
    return statistics.mean(replay_of(str(path), mode).exhaustive_regret(seed) for mode in modes for seed in range(seeds))


def interval(ci: Optional[tuple]) -> str:
    return f"{ci[0] * 100:+.2f} [{ci[1] * 100:+.2f}, {ci[2] * 100:+.2f}]" if ci else "-"


def markdown(rows: Sequence[dict], budget: int, seeds: int, modes: Sequence[str], table_name: str,
             exhaustive: Optional[float] = None, target: float = TARGET_REGRET, against: Optional[str] = None) -> str:
    reference = next((r for r in rows if r["strategy"] == REFERENCE), None)
    extra = f" vs {against} at {budget}, paired 95 % CI |" if against else ""
    lines = [f"{table_name}, {', '.join(modes)}; {seeds} seeds per mode, {budget} epochs per search; regret in points "
             f"of test accuracy; target regret {target * 100:g} points", "",
             f"| strategy | regret at {budget // 8} epochs | at {budget // 2} | at {budget} | vs random at {budget}, paired "
             f"95 % CI |{extra} validation regret at {budget} | epochs to target (median) | reached | rank at budget "
             "(95 % CI) | trials (full budget) |",
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if against else "")]
    for r in sorted(rows, key=lambda r: r["rank"]):
        vs_text = interval(r.get("vs_random")) + (" *" if r.get("survives_correction") else "")
        if against:
            vs_text += " | " + interval(r.get("vs_against"))
        to_target = r["median_to_target"]
        ratio = ""
        if reference and math.isfinite(to_target) and math.isfinite(reference["median_to_target"]):
            ratio = f" ({to_target / reference['median_to_target']:.2f}x random)"
        early = "no trial ended" if math.isnan(r["regret_eighth"]) else f"{r['regret_eighth'] * 100:.2f}"
        lines.append(
            f"| {r['strategy']} | {early} | {r['regret_half'] * 100:.2f} | {r['regret'] * 100:.2f} | "
            f"{vs_text} | {r['val_regret'] * 100:.2f} | "
            f"{'not reached' if not math.isfinite(to_target) else f'{to_target:.0f}'}{ratio} | "
            f"{r['reached']}/{r['searches']} | {r['rank']:.1f} [{r['rank_ci'][0]:.1f}, {r['rank_ci'][1]:.1f}] | "
            f"{r['trials']:.0f} ({r['full']:.0f}) |")
    lines += ["", "`*`: the interval excludes 0 also at the Bonferroni-corrected level (0.05 divided by the number of "
                  "strategies compared with random search)."]
    if exhaustive is not None:
        lines += ["", f"Every configuration of the table trained once and the best by validation taken: regret "
                      f"{exhaustive * 100:.2f} points (mean over {seeds} draws of seeds per mode): what picking by "
                      "validation costs when search is no limit."]
    return "\n".join(lines) + "\n"


def plot(outcomes: Sequence[Outcome], path: Path, title: str, target: float = TARGET_REGRET,
         exhaustive: Optional[float] = None) -> None:
    """Mean regret against epochs spent (log scale), one panel per mode, one line
    per strategy; the target (grey) and the exhaustive search's regret (black) as dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(o.mode for o in outcomes))
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes) + 3, 4.8), squeeze=False, sharey=True)
    top = 0.0
    for ax, mode in zip(axes[0], modes):
        for i, o in enumerate(o for o in outcomes if o.mode == mode):
            first = max(1, o.budget // 32)
            steps = sorted({round(first * (o.budget / first) ** (k / 63)) for k in range(64)})
            mean = [100 * statistics.mean(o.regrets(s)) for s in steps]
            top = max(top, 3 * mean[-1])
            ax.plot(steps, mean, label=o.strategy, linestyle="-" if i < 10 else "--")
        ax.axhline(100 * target, color="grey", linewidth=0.8, linestyle=":")
        if exhaustive is not None:
            ax.axhline(100 * exhaustive, color="black", linewidth=0.8, linestyle=":")
        ax.set(title=f"{title}: {mode}", xlabel="epochs spent", xscale="log",
               ylabel="regret (test accuracy points; no incumbent yet = off the top)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylim(0, max(top, 2 * 100 * target))
    fig.tight_layout(rect=(0, 0, 1 - 3 / (5.5 * len(modes) + 3), 1))
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="center right", fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_command(args) -> int:
    path = table_path(args.table)
    modes = args.mode or list(MODES)
    unknown = [s for s in args.strategy or () if s not in BY_NAME]
    if unknown:
        raise UsageError(f"--strategy {unknown[0]!r} is not one; allowed: " + " | ".join(BY_NAME))
    strategies = [BY_NAME[s] for s in args.strategy] if args.strategy else STRATEGIES
    if args.seeds < 2:
        raise UsageError(f"--seeds {args.seeds} is not allowed; allowed: an integer >= 2 (intervals need two)")
    if not 0 < args.target < 100:
        raise UsageError(f"--target {args.target} is not allowed; allowed: 0 < points < 100")
    if args.against is not None and args.against not in [s.name for s in strategies]:
        raise UsageError(f"--against {args.against!r} is not among the strategies compared; allowed: "
                         + " | ".join(s.name for s in strategies))
    if args.budget is not None and args.budget < 1:
        raise UsageError(f"--budget {args.budget} is not allowed; allowed: an integer >= 1 (epochs)")
    workers = args.workers or os.cpu_count() or 1
    outcomes = compare(path, modes, strategies, args.seeds, args.budget, workers,
                       progress=lambda line: print(line, file=sys.stderr, flush=True))
    budget = outcomes[0].budget
    target = args.target / 100
    exhaustive = exhaustive_regret(path, modes, args.seeds)
    text = markdown(summary_rows(outcomes, target, args.against), budget, args.seeds, modes, path.name, exhaustive,
                    target, args.against)
    print(text, end="")
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.plot:
        plot(outcomes, Path(args.plot), path.name.split(".")[0], target, exhaustive)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


DEFAULT = "TPE + ASHA grace 4"  # what the shipped studies run (search_spaces/*.yaml): kept in step by a test


def tabular_rows(quick: bool) -> list:
    """`python -m rekd.bench --only tabular`: rekd's default strategy against random search on the shipped digits
    table, both modes, paired by seed: its regret must be no worse on average, and the epochs it needs to come
    within TARGET_REGRET of the best configuration are compared where both get there."""
    import optuna

    from rekd.bench.rows import Row
    from rekd.bench.table import shipped

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    seeds = 10 if quick else 50
    chosen = [BY_NAME[REFERENCE], BY_NAME[DEFAULT]]
    outcomes = compare(shipped("digits"), list(MODES), chosen, seeds, None, os.cpu_count() or 1, progress=lambda _: None)
    rows = {r["strategy"]: r for r in summary_rows(outcomes)}
    default, reference = rows[DEFAULT], rows[REFERENCE]
    difference, low, high = default["vs_random"]
    medians = default["median_to_target"], reference["median_to_target"]
    reached = (f"median epochs to regret <= {TARGET_REGRET * 100:g} points: {medians[0]:.0f} vs {medians[1]:.0f}"
               if all(map(math.isfinite, medians)) else
               f"regret <= {TARGET_REGRET * 100:g} points reached by {default['reached']} vs {reference['reached']} of "
               f"{default['searches']} searches")
    return [Row(f"regret at {outcomes[0].budget} epochs, {DEFAULT} - random [digits table]", difference * 100, "points",
                0.0, f"paired over {default['searches']} searches, 95 % CI [{low * 100:+.2f}, {high * 100:+.2f}]; "
                     f"{default['regret'] * 100:.2f} vs {reference['regret'] * 100:.2f}; {reached}")]
