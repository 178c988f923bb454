"""MO-ASHA: asynchronous successive halving whose rungs rank trials by Pareto fronts, not by one metric.

Ray Tune's ASHA ranks by one metric. Here a trial that reaches a rung (epochs grace_period x eta^k, as
ASHA's) is compared with every result recorded at that rung, its own included, by non-dominated sorting
of the objective vectors (Schmucker et al. 2021, MOASHA); within a front, a larger crowding distance
(NSGA-II) ranks ahead, so that the spread of a front survives rather than one crowded corner of it. The
trial continues if fewer than n/eta of the n results rank strictly ahead of it, i.e. it is in the top
1/eta; otherwise it stops. Equal results are equally good: a copy of a promoted result is promoted.

Syne Tune's MOASHA continues a trial whose rank / n <= 1/eta, its rank being the number strictly ahead:
at eta = 2 the worse of the first two trials at a rung goes on, and in general one more than 1/eta
whenever n is a multiple of eta. Here the comparison is strict, as ASHA's top 1/eta is.

Asynchronous like ASHA: a decision is made once, when the trial arrives at the rung, against what is
recorded there by then. Resumable like rekd's ASHA (rekd.search.asha): on a driver restart every trial
that comes back replays its recorded results, so the rungs hold what they held before.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from ray.tune.result import TRAINING_ITERATION
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from rekd.search import asha as resumable
from rekd.search.pareto import ahead_of, minimised


class MultiObjectiveASHA(FIFOScheduler):
    """Stops trials at each rung unless they rank in the top 1/reduction_factor by Pareto front and
    crowding distance. `objectives`: (metric, mode) pairs, mode max or min."""

    storage_path: Optional[str] = None  # set by the driver on a resume: where the experiment's folder is now

    def __init__(self, objectives: Sequence[tuple[str, str]], max_t: int, grace_period: int = 1,
                 reduction_factor: int = 2, time_attr: str = TRAINING_ITERATION):
        if len(objectives) < 1:
            raise ValueError("MultiObjectiveASHA needs at least one objective")
        if not 1 <= grace_period <= max_t or reduction_factor < 2:
            raise ValueError(f"grace_period {grace_period}, max_t {max_t}, reduction_factor {reduction_factor}: "
                             "allowed 1 <= grace_period <= max_t and reduction_factor >= 2")
        super().__init__()
        self.objectives = [(str(m), str(mode)) for m, mode in objectives]
        self.metrics = [m for m, _ in self.objectives]
        self.modes = [mode for _, mode in self.objectives]
        minimised([0.0] * len(self.modes), self.modes)  # checks the modes
        self.time_attr, self.max_t = time_attr, max_t
        self.grace_period, self.reduction_factor = grace_period, reduction_factor
        # ASHA's milestones (one bracket): grace_period * eta^k below max_t (a result at max_t ends the trial).
        count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1 + 1e-9)
        self.milestones = [grace_period * reduction_factor ** k for k in range(count)
                           if grace_period * reduction_factor ** k < max_t]
        self.rungs: dict[int, dict[str, tuple[float, ...]]] = {m: {} for m in self.milestones}  # trial -> point
        self.stopped = 0

    def set_search_properties(self, metric: Optional[str], mode: Optional[str], **spec) -> bool:
        # Tune offers TuneConfig's single metric and mode; this scheduler has its objectives already.
        return True

    def point(self, result: dict) -> Optional[tuple[float, ...]]:
        """The result's objectives, minimised; None when a result lacks one (it only says why a trial stopped)."""
        values = [result.get(m) for m in self.metrics]
        if any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in values):
            return None
        return minimised(values, self.modes)

    def decide(self, trial_id: str, iteration: int, point: tuple[float, ...]) -> str:
        """Record the trial at the highest rung it reached and not yet recorded, and say whether it goes on."""
        for milestone in reversed(self.milestones):
            recorded = self.rungs[milestone]
            if iteration < milestone or trial_id in recorded:
                continue
            recorded[trial_id] = point
            ids = list(recorded)
            ahead = ahead_of([recorded[i] for i in ids], ids.index(trial_id))
            return TrialScheduler.CONTINUE if ahead < len(ids) / self.reduction_factor else TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def on_trial_add(self, tune_controller, trial) -> None:
        resumable.relocate(trial, self.storage_path)
        # A trial that comes back after a driver restart replays what it reported before: the decisions
        # were acted on then and are ignored now; the rungs fill as they did.
        for result in resumable.recorded_results(trial, self.time_attr, self.metrics):
            point = self.point(result)
            if point is not None and result[self.time_attr] < self.max_t:
                self.decide(trial.trial_id, int(result[self.time_attr]), point)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        point = self.point(result)
        if self.time_attr not in result or point is None:
            return TrialScheduler.CONTINUE
        iteration = int(result[self.time_attr])
        if iteration >= self.max_t:  # the trial's whole budget: it ends, and was not stopped early
            return TrialScheduler.STOP
        action = self.decide(trial.trial_id, iteration, point)
        if action == TrialScheduler.STOP:
            self.stopped += 1
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        pass  # a finished trial's last result was decided on in on_trial_result

    def on_trial_remove(self, tune_controller, trial) -> None:
        pass

    def debug_string(self) -> str:
        filled = ", ".join(f"{m}: {len(self.rungs[m])}" for m in self.milestones)
        return f"MultiObjectiveASHA on {', '.join(f'{m} ({d})' for m, d in self.objectives)}: " \
               f"{self.stopped} stopped; trials per rung {filled}"
