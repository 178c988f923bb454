"""The Pareto front a multi-objective search found: its points, its hypervolume against the epochs spent,
a CSV of the points with their settings, and a plot.

Only trials that ran the full budget are candidates (a stopped trial's values are from a shorter budget);
the front is the non-dominated ones by the objectives at their last epoch (rekd.search.pareto). The
hypervolume is normalised per objective so that the best value any full-budget trial reached is 0 and the
worst plus 10 % of the range is 1 (rekd.search.pareto.bounds): a share of that box, from 0 to 1, in no
unit. It is recomputed after each trial that completes, in the order trials reported (to the second), with
the same box throughout, and plotted against every epoch trained by then, stopped trials' included.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from rekd.search import pareto
from rekd.search.ranking import pareto_ranked
from rekd.tracking import outcomes

MARGIN = 0.1  # the reference point lies this share of the range past the worst value seen


@dataclass
class Front:
    objectives: list[tuple[str, str]]
    ranked: list[tuple[object, int]]  # every row, best first (rekd.search.ranking.pareto_ranked), with its front
    points: list  # the rows on the front: full budget, front 1, in ranked order
    ideal: Optional[tuple] = None  # the normalisation box, in the objectives' own units (None: no point)
    reference: Optional[tuple] = None
    curve: list[tuple[int, float]] = field(default_factory=list)  # (epochs trained, hypervolume) per completion

    @property
    def hypervolume(self) -> float:
        return self.curve[-1][1] if self.curve else math.nan

    def box(self) -> dict[str, str]:
        """The normalisation box as tags: metric=value for the ideal and the reference point."""
        if self.ideal is None:
            return {}
        return {name: ",".join(f"{m}={v:.6g}" for (m, _), v in zip(self.objectives, values))
                for name, values in (("rekd.hypervolume_ideal", self.ideal),
                                     ("rekd.hypervolume_reference", self.reference))}


def values(row, objectives) -> list[float]:
    return [row.values.get(metric, math.nan) for metric, _ in objectives]


def make_front(objectives: Sequence[tuple[str, str]], rows: list, events: list[tuple[float, str, int]]) -> Front:
    """The front of `rows` (with .trial_id, .outcome, .values, .epochs) and its hypervolume curve from
    `events`: (timestamp, trial id, epoch) of every reported epoch."""
    objectives = list(objectives)
    modes = [mode for _, mode in objectives]
    ranked = pareto_ranked(rows, lambda r: r.outcome, lambda r: values(r, objectives), lambda r: r.trial_id, modes)
    # The candidates: full budget, every objective finite (with no finite point at all, NaN ones make front 1)
    complete = {r.trial_id: pareto.minimised(values(r, objectives), modes) for r in rows
                if r.outcome == outcomes.COMPLETED and pareto.finite(values(r, objectives))}
    front = Front(objectives, ranked, [r for r, number in ranked if number == 1 and r.trial_id in complete])
    if not complete:
        return front
    ideal, reference = pareto.bounds(list(complete.values()), MARGIN)
    front.ideal, front.reference = (pareto.minimised(p, modes) for p in (ideal, reference))  # back to own units
    budget = {r.trial_id: r.epochs for r in rows}
    spent, seen = 0, {}  # trial id -> its point, in the order the trials completed
    for _, trial_id, epoch in sorted(events):
        spent += 1
        if trial_id in complete and epoch >= budget[trial_id] and trial_id not in seen:
            seen[trial_id] = complete[trial_id]
            front.curve.append((spent, pareto.normalized_hypervolume(list(seen.values()), ideal, reference)))
    if len(seen) < len(complete):  # trials whose reports were not read back: counted at the end
        spent = max(spent, sum(budget.values()))
        front.curve.append((spent, pareto.normalized_hypervolume(list(complete.values()), ideal, reference)))
    return front


def write_csv(front: Front, searched: list[str], path: Path) -> Path:
    """One line per point of the front: its place, trial, objectives, then its settings (searched first)."""
    others = sorted({k for r in front.points for k in r.settings} - set(searched))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["place", "trial_id", *(m for m, _ in front.objectives), "epochs_trained", *searched, *others])
        for place, row in enumerate(front.points, start=1):
            writer.writerow([place, row.trial_id, *values(row, front.objectives), row.epochs,
                             *(row.settings.get(k) for k in searched), *(row.settings.get(k) for k in others)])
    return path


def plot(front: Front, search_name: str, path: Path) -> Path:
    """The first objective against the second: full-budget trials, stopped ones (their partial values),
    and the front joined as a staircase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (y_name, y_mode), (x_name, x_mode) = front.objectives[:2]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for label, style, chosen in (("full budget", dict(c="0.55", marker="o", s=28), outcomes.COMPLETED),
                                 ("stopped early (shorter budget)", dict(facecolors="none", edgecolors="0.6",
                                                                         marker="v", s=30), outcomes.STOPPED_EARLY)):
        rows = [r for r, _ in front.ranked if r.outcome == chosen and pareto.finite(values(r, front.objectives))]
        if rows:
            ax.scatter([r.values[x_name] for r in rows], [r.values[y_name] for r in rows], label=label, **style)
    if front.points:
        ordered = sorted(front.points, key=lambda r: r.values[x_name])
        xs, ys = [r.values[x_name] for r in ordered], [r.values[y_name] for r in ordered]
        # The edge of what the front dominates: each point's value holds until the next point along x.
        ax.step(xs, ys, where="pre" if x_mode == "max" else "post", c="tab:red", lw=1)
        ax.scatter(xs, ys, c="tab:red", s=40, zorder=3, label=f"Pareto front ({len(ordered)})")
        for r in ordered:
            ax.annotate(r.trial_id, (r.values[x_name], r.values[y_name]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    more = f" (the first two of {len(front.objectives)} objectives)" if len(front.objectives) > 2 else ""
    ax.set_xlabel(f"{x_name} ({x_mode})")
    ax.set_ylabel(f"{y_name} ({y_mode})")
    ax.set_title(f"search {search_name}: {y_name} against {x_name}{more}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
