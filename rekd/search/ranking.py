"""The one rule that orders a search's trials, used wherever rekd says which trial is best: the search's
summary and its `rekd.best_trial` tag, `rekd.best`, and through its file `rekd.final` and `rekd.reproduce`.

1. Trials that ran the full budget come before those early stopping ended (their metric is from a shorter
   budget, so the two do not compare).
2. Then the study's metric at the trial's last epoch, best first (`mode` max or min); NaN last.
3. Ties, which are common on small validation splits (a 144-sample split has only 145 accuracies), go to
   the smaller trial id: an arbitrary order, but a fixed one, so every command picks the same trial.
"""
from __future__ import annotations

import math

from rekd.search import pareto
from rekd.tracking import outcomes

FULL_BUDGET = outcomes.COMPLETED
MODES = ("max", "min")
RULE = "full-budget trials first, then the metric at the last epoch (best first), then the smaller trial id"


def rank_key(outcome: str, value: float, trial_id: str, mode: str) -> tuple:
    """Sort key: sorted(..., key=...) puts the best trial first."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}; allowed: {', '.join(MODES)}")
    finite = isinstance(value, (int, float)) and math.isfinite(value)
    signed = (-value if mode == "max" else value) if finite else 0.0
    return outcome != FULL_BUDGET, not finite, signed, str(trial_id)


PARETO_RULE = ("full-budget trials first, then by Pareto front of the objectives at the last epoch (non-dominated "
               "first), within a front by crowding distance (larger first), then the smaller trial id")


def pareto_ranked(entries: list, outcome, values, trial_id, modes: list[str]) -> list[tuple[object, int]]:
    """Several objectives: `entries` best first by PARETO_RULE, each with its front number (1 = on the
    Pareto front of its group). `outcome`, `values` and `trial_id` read an entry's outcome, objective
    values (in the order of `modes`) and id."""
    ranked = []
    for full in (True, False):
        group = [e for e in entries if (outcome(e) == FULL_BUDGET) == full]
        points = [pareto.minimised([float(v) if isinstance(v, (int, float)) else math.nan for v in values(e)], modes)
                  for e in group]
        priorities = pareto.priority(points)
        order = sorted(range(len(group)), key=lambda i: (priorities[i], str(trial_id(group[i]))))
        ranked += [(group[i], priorities[i][0] + 1) for i in order]
    return ranked
