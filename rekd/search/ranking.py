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
