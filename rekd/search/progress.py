"""rekd's progress table: what Tune prints while a search runs, in rekd's words.

Tune's CLIReporter prints Ray's temp folder as the "Result logdir" (not the results folder rekd names),
ASHA's brackets, resource usage and raw floats. This reporter prints one header line (trials started,
their outcomes counted as the search's summary counts them, the best so far) and one row per trial.

Tune (RAY_AIR_NEW_OUTPUT=0, verbose >= 1) calls `setup()` once, then `should_report()` after every step
of its loop and `report()` whenever that says yes, and both once more with done=True at the end.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

from ray.tune import ProgressReporter
from ray.tune.experiment import Trial

from rekd.search.ranking import pareto_ranked, rank_key
from rekd.search.study import Study
from rekd.tracking import outcomes

MAX_ROWS = 20  # more trials than this and the table hides the worst ones
UNFINISHED = {Trial.PENDING: "pending", Trial.RUNNING: "running", Trial.PAUSED: "paused"}
ENDED = (Trial.TERMINATED, Trial.ERROR)


def outcome(trial: Trial, epochs: int) -> str:
    """The trial's state in rekd's words; an ended trial's as the search's summary and MLflow tags say it."""
    if trial.status in UNFINISHED:
        return UNFINISHED[trial.status]
    ended = outcomes.ended(trial.last_result, epochs, errored=trial.status == Trial.ERROR)
    return "stopped early" if ended == outcomes.STOPPED_EARLY else ended  # the table's words


def metric_value(trial: Trial, metric: str) -> float:
    value = trial.last_result.get(metric)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def number(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def param(value) -> str:
    """A searched value to 4 significant digits (Optuna's 0.4939321535 is 0.4939); choices as they are."""
    return format(value, ".4g") if isinstance(value, float) else "-" if value is None else str(value)


def clock_str(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class RekdProgress(ProgressReporter):
    """Prints the table every `max_report_frequency` seconds, when a trial ends, and once at the end."""

    def __init__(self, study: Study, max_report_frequency: float = 10, max_rows: int = MAX_ROWS,
                 clock: Callable[[], float] = time.time):
        self.study = study
        self.max_report_frequency = max_report_frequency
        self.max_rows = max_rows
        self.clock = clock  # time.time, as Tune's start_time is; tests pass their own
        self.start_time = clock()
        self.last_report_time = self.start_time  # the first table comes after one period, not at once
        self.ended_reported: set[str] = set()  # ids of the ended trials the last table showed

    def setup(self, start_time: Optional[float] = None, total_samples: Optional[int] = None,
              metric: Optional[str] = None, mode: Optional[str] = None, **kwargs) -> None:
        # Tune's metric and mode are None here (rekd gives them to the searcher and scheduler) and its
        # total_samples is the study's num_samples: the study says all three.
        if start_time is not None:
            self.start_time = self.last_report_time = start_time

    def should_report(self, trials: list[Trial], done: bool = False) -> bool:
        if done:
            return True
        ended = {t.trial_id for t in trials if t.status in ENDED}
        if ended - self.ended_reported:
            # When the last trial has ended, Tune's loop stops and reports with done=True right after:
            # reporting here too would print the same table twice.
            return len(ended) < self.study.num_samples
        return self.clock() - self.last_report_time >= self.max_report_frequency

    def report(self, trials: list[Trial], done: bool, *sys_info: str) -> None:
        # sys_info is ASHA's brackets and Ray's resource usage: left out on purpose.
        self.last_report_time = self.clock()
        self.ended_reported = {t.trial_id for t in trials if t.status in ENDED}
        print(self.table(trials), flush=True)

    def table(self, trials: list[Trial]) -> str:
        """The header line, then one row per trial: running first, then as rekd ranks them."""
        outcomes = {t.trial_id: outcome(t, self.study.epochs) for t in trials}
        ordered = self.ordered(trials, outcomes)
        shown, hidden = ordered[:self.max_rows], ordered[self.max_rows:]
        lines = [self.header(trials, outcomes), *self.rows(shown, outcomes)]
        if hidden:
            states = count_str([outcomes[t.trial_id] for t in hidden])
            lines.append(f"... {len(hidden)} more trials not shown ({states})")
        return "\n".join(lines)

    def ordered(self, trials: list[Trial], outcomes: dict[str, str]) -> list[Trial]:
        """Running trials first, then as rekd ranks them (by the metric, or by Pareto front)."""
        if not self.study.multi_objective:
            return sorted(trials, key=lambda t: (outcomes[t.trial_id] != "running", *self.rank(t, outcomes[t.trial_id])))
        running = sorted((t for t in trials if outcomes[t.trial_id] == "running"), key=lambda t: t.trial_id)
        rest = self.front_ranked([t for t in trials if outcomes[t.trial_id] != "running"], outcomes)
        return running + [t for t, _ in rest]

    def front_ranked(self, trials: list[Trial], outcomes: dict[str, str]) -> list[tuple[Trial, int]]:
        objectives = self.study.objectives
        return pareto_ranked(trials, lambda t: outcomes[t.trial_id],
                             lambda t: [metric_value(t, m) for m, _ in objectives], lambda t: t.trial_id,
                             [mode for _, mode in objectives])

    def rank(self, trial: Trial, state: str) -> tuple:
        return rank_key(state, metric_value(trial, self.study.metric), trial.trial_id, self.study.mode)

    def header(self, trials: list[Trial], outcomes: dict[str, str]) -> str:
        study = self.study
        started = [outcomes[t.trial_id] for t in trials if t.status != Trial.PENDING]
        counts = {"running": 0, "completed": 0, "stopped early": 0, "errored": 0}
        for state in started:
            counts[state] = counts.get(state, 0) + 1
        order = ["running", "paused", "completed", "stopped early"]
        order += sorted(set(counts) - {*order, "errored"}) + ["errored"]  # stop reasons before errored
        said = ", ".join(f"{counts[k]} {k}" for k in order if k in counts)
        line = (f"[{clock_str(self.clock() - self.start_time)}] "
                f"{len(started)}/{max(study.num_samples, len(trials))} trials started: {said}")
        return line + self.best_str(trials, outcomes)

    def best_str(self, trials: list[Trial], outcomes: dict[str, str]) -> str:
        """The best trial by rekd's rule (full budget first); a trial stopped by its own failure is no candidate."""
        if self.study.multi_objective:
            completed = [t for t in trials if outcomes[t.trial_id] == "completed"]
            front = [t.trial_id for t, number in self.front_ranked(completed, outcomes) if number == 1
                     and all(math.isfinite(metric_value(t, m)) for m, _ in self.study.objectives)]
            return f"; Pareto front {len(front)}: {', '.join(front)}" if front else ""
        candidates = [t for t in trials if outcomes[t.trial_id] in ("completed", "stopped early", "running", "paused")
                      and math.isfinite(metric_value(t, self.study.metric))]
        if not candidates:
            return ""
        best = min(candidates, key=lambda t: self.rank(t, outcomes[t.trial_id]))
        budget = "" if outcomes[best.trial_id] == "completed" else \
            f", at epoch {best.last_result.get('epoch', 0)}/{self.study.epochs}"
        return f"; best {self.study.metric} {metric_value(best, self.study.metric):.4f} (trial {best.trial_id}{budget})"

    def rows(self, trials: list[Trial], outcomes: dict[str, str]) -> list[str]:
        study = self.study
        names = [p.name for p in study.params]
        shown = [m for m, _ in study.objectives] + [m for m in ("train_loss",) if m not in dict(study.objectives)]
        head = ["trial", "status", "epoch", *shown, "s/epoch", *names]
        body = []
        for t in trials:
            last = t.last_result
            body.append([t.trial_id, outcomes[t.trial_id], f"{last.get('epoch', 0)}/{study.epochs}",
                         *(number(last.get(m), ".4f" if m.endswith("_acc") else ".4g") for m in shown),
                         number(last.get("epoch_time_s"), ".1f"), *(param(t.config.get(n)) for n in names)])
        widths = [max(len(row[i]) for row in (head, *body)) for i in range(len(head))]
        # id and status read left to right; numbers line up on the right
        return ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                .rstrip() for row in (head, *body)]


def count_str(states: list[str]) -> str:
    counts: dict[str, int] = {}
    for state in states:
        counts[state] = counts.get(state, 0) + 1
    return ", ".join(f"{n} {state}" for state, n in counts.items())
