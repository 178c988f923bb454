"""Replay a tabular benchmark (rekd.bench.table) to rekd's real search machinery, in simulated time.

A search strategy is a sampler, a way of stopping trials early and a concurrency. The classes that decide are
those a real search uses: rekd's PrunedAwareOptunaSearch (the PRUNED fix, FAIL for a diverged trial) over
Optuna's samplers, rekd's ResumableASHA (Ray's ASHA; with several brackets, Ray's asynchronous Hyperband),
called in the order Tune calls them: on_trial_add, on_trial_result per epoch, on_trial_complete when a trial
ends, however it ends.

What a trial is served: the proposal's nearest sampled configuration (Euclidean distance in the unit cube of
the search space, log scale for log-scaled settings) and one of that configuration's recorded seeds, drawn
from the search's seed. The response surface is thus piecewise constant over the sample's Voronoi cells. How
that biases the comparison: a model-based sampler gains nothing from refining between sampled points (its
finest advantage is not measured); two proposals in one cell are a re-run of one configuration with a
possibly different seed, as a real search re-running a near-identical setting would be; random search picks
cells in proportion to their volume, nearly uniform for a Latin hypercube. So the comparison is conservative
for TPE against random search.

Simulated time: each running trial's next epoch ends after its recorded wall time; `concurrency` trials run at
once and the earliest epoch end is processed next, so with several workers the searcher proposes while
others are running, as it does under Tune. A search ends when its epoch budget is spent (the same for every
strategy); its score is the regret of its incumbent: the full-budget trial with the best final val_acc, scored
by its configuration's test accuracy averaged over seeds, against the best configuration's in the table.
"""
from __future__ import annotations

import dataclasses
import heapq
import math
import random
from types import SimpleNamespace
from typing import Optional

import numpy as np
import optuna
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher

from rekd.bench.table import SPACES, Table, to_unit
from rekd.search.asha import ResumableASHA
from rekd.search.optuna_searcher import PrunedAwareOptunaSearch, sampler_for
from rekd.search.ranking import rank_key
from rekd.tracking.outcomes import COMPLETED, NON_FINITE_LOSS, STOP_REASON

SAMPLERS = ("random", "tpe", "tpe-multivariate", "tpe-liar", "bohb")
STOPPING = ("none", "asha", "hyperband")


@dataclasses.dataclass(frozen=True)
class Strategy:
    name: str
    sampler: str = "tpe"  # a key of SAMPLERS
    stopping: str = "asha"  # none | asha | hyperband (asynchronous: ASHA over `brackets` brackets)
    grace_period: int = 1
    reduction_factor: int = 2
    concurrency: int = 1
    brackets: int = 3  # hyperband only

    def scheduler(self, max_t: int) -> Optional[ResumableASHA]:
        if self.stopping == "none":
            return None
        return ResumableASHA(metric="val_acc", mode="max", max_t=max_t, grace_period=self.grace_period,
                             reduction_factor=self.reduction_factor,
                             brackets=self.brackets if self.stopping == "hyperband" else 1)

    def searcher(self, space: dict, max_t: int, seed: int) -> Searcher:
        if self.sampler == "bohb":
            return RungTPESearch(space, max_t=max_t, seed=seed)
        sampler = sampler_for("random" if self.sampler == "random" else "tpe", seed,
                              multivariate=self.sampler == "tpe-multivariate", constant_liar=self.sampler == "tpe-liar")
        return PrunedAwareOptunaSearch(space=space, metric="val_acc", mode="max", sampler=sampler, max_epochs=max_t)


class RungTPESearch(Searcher):
    """BOHB-style proposals (Falkner et al., 2018): a model fitted on the results of the largest budget that
    has enough of them. Each epoch is a budget; a trial's value at budget b is its val_acc after b epochs. With
    at least MIN_POINTS results at some budget, the largest such budget's results are given to a multivariate
    TPE (Optuna's, standing in for BOHB's kernel density estimator) in a fresh in-memory study, and its
    proposal is taken; a RANDOM_FRACTION of proposals, and all until the first model, are uniform at random."""

    MIN_POINTS = 10
    RANDOM_FRACTION = 1 / 3

    def __init__(self, space: dict, max_t: int, seed: int):
        super().__init__(metric="val_acc", mode="max")
        self.space, self.max_t = space, max_t
        self.rng = random.Random(seed)
        self.params: dict[str, dict] = {}  # trial id -> its proposal
        self.values: dict[int, dict[str, float]] = {}  # budget -> trial id -> val_acc there

    def suggest(self, trial_id: str) -> dict:
        budget = max((b for b, seen in self.values.items() if len(seen) >= self.MIN_POINTS), default=None)
        if budget is None or self.rng.random() < self.RANDOM_FRACTION:
            params = {name: self.uniform(d) for name, d in self.space.items()}
        else:
            study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(
                seed=self.rng.randrange(2**31), multivariate=True, n_startup_trials=0))
            study.add_trials([optuna.trial.create_trial(params=self.params[t], distributions=self.space, value=v)
                              for t, v in self.values[budget].items()])
            params = study.ask(self.space).params
        self.params[trial_id] = params
        return dict(params)

    def uniform(self, d: optuna.distributions.FloatDistribution) -> float:
        if d.log:
            return math.exp(self.rng.uniform(math.log(d.low), math.log(d.high)))
        return self.rng.uniform(d.low, d.high)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.values.setdefault(int(result["training_iteration"]), {})[trial_id] = float(result["val_acc"])

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        if result and not result.get(STOP_REASON) and not error:
            self.on_trial_result(trial_id, result)


@dataclasses.dataclass(frozen=True)
class TrialRecord:
    config: int  # the table's configuration it was served
    epochs: int  # epochs it ran
    val_acc: float  # at its last epoch
    spent: int  # epochs the whole search had spent when it ended


@dataclasses.dataclass
class SearchResult:
    trials: list[TrialRecord]
    curve: list[tuple[int, float]]  # (epochs spent, regret of the incumbent) after each trial that ended
    budget: int
    val_curve: list[tuple[int, float]]  # the same in validation accuracy (Replay.val_regret)


class Replay:
    """One mode of a table, ready to serve searches: nearest-configuration lookup and the regret scale."""

    def __init__(self, table: Table, mode: str):
        self.table, self.mode = table, mode
        self.space = SPACES[mode]
        self.max_t = table.design.epochs
        self.seeds = table.design.seeds
        self.units = np.array([[to_unit(d, p[name]) for name, d in self.space.items()] for p in table.params[mode]])
        self.quality = [table.final_test(mode, c) for c in range(table.design.configs)]
        self.best = max(self.quality)
        self.val_quality = [table.final_val(mode, c) for c in range(table.design.configs)]
        self.best_val = max(self.val_quality)

    def nearest(self, params: dict) -> int:
        u = np.array([to_unit(d, params[name]) for name, d in self.space.items()])
        return int(np.argmin(((self.units - u) ** 2).sum(axis=1)))

    def regret(self, config: Optional[int]) -> float:
        """Test accuracy the incumbent misses against the best configuration's; all of it without one."""
        return self.best - (self.quality[config] if config is not None else 0.0)

    def val_regret(self, config: Optional[int]) -> float:
        """The same in validation accuracy averaged over seeds: how well the search optimises what it sees, apart
        from how well validation predicts test."""
        return self.best_val - (self.val_quality[config] if config is not None else 0.0)

    def exhaustive_regret(self, seed: int) -> float:
        """Every configuration trained once (each with a seed drawn as a search draws it, in a random order for
        ties) and the best by final val_acc taken: what picking by validation costs when search is no limit.
        Not a floor: among more candidates the best validation score is more often luck."""
        draw = random.Random(seed)
        order = list(range(len(self.quality)))
        draw.shuffle(order)
        finals = {c: self.table.curves[(self.mode, c, draw.randrange(self.seeds))][-1] for c in order}
        full = [c for c in order if not finals[c]["diverged"] and finals[c]["epoch"] == self.max_t]
        return self.regret(max(full, key=lambda c: finals[c]["val_acc"]) if full else None)

    def search(self, strategy: Strategy, seed: int, budget: int) -> SearchResult:
        """One seeded search, until `budget` epochs are spent."""
        np.random.seed(seed)  # Ray's Hyperband draws each trial's bracket from numpy's global generator
        searcher = strategy.searcher(self.space, self.max_t, seed)
        scheduler = strategy.scheduler(self.max_t)
        draw = random.Random(seed)  # which recorded seed serves each trial
        spent, started, now = 0, 0, 0.0
        events: list[tuple[float, int, int]] = []  # (simulated time its next epoch ends, trial number, epoch)
        running: dict[int, tuple[SimpleNamespace, list[dict]]] = {}
        trials: list[TrialRecord] = []
        curve: list[tuple[int, float]] = []
        val_curve: list[tuple[int, float]] = []
        incumbent: Optional[tuple] = None  # the best full-budget trial's ranking key, its configuration below
        incumbent_config: Optional[int] = None

        def start() -> None:
            nonlocal started
            started += 1
            trial = SimpleNamespace(trial_id=f"t{started}", path="", storage=None, config_index=0)
            params = searcher.suggest(trial.trial_id)
            trial.config_index = self.nearest(params)
            curve_of = self.table.curves[(self.mode, trial.config_index, draw.randrange(self.seeds))]
            if scheduler is not None:
                scheduler.on_trial_add(None, trial)
            running[started] = (trial, curve_of)
            heapq.heappush(events, (now + curve_of[0]["wall_s"], started, 1))

        while spent < budget:
            while len(running) < strategy.concurrency:
                start()
            now, number, epoch = heapq.heappop(events)
            trial, recorded = running[number]
            record = recorded[epoch - 1]
            spent += 1
            result = {"training_iteration": epoch, "epoch": epoch, "val_acc": record["val_acc"]}
            if record["diverged"]:
                result[STOP_REASON] = NON_FINITE_LOSS
            decision = scheduler.on_trial_result(None, trial, result) if scheduler else TrialScheduler.CONTINUE
            ends = record["diverged"] or epoch == len(recorded) or epoch == self.max_t or decision == TrialScheduler.STOP
            if not ends:
                searcher.on_trial_result(trial.trial_id, result)
                heapq.heappush(events, (now + recorded[epoch]["wall_s"], number, epoch + 1))
                continue
            searcher.on_trial_complete(trial.trial_id, result)
            if scheduler is not None:
                scheduler.on_trial_complete(None, trial, result)
            del running[number]
            trials.append(TrialRecord(trial.config_index, epoch, record["val_acc"], spent))
            if epoch == self.max_t and not record["diverged"]:  # rekd's ranking rule picks the incumbent
                key = rank_key(COMPLETED, record["val_acc"], f"{number:08d}", "max")
                if incumbent is None or key < incumbent:
                    incumbent, incumbent_config = key, trial.config_index
            curve.append((spent, self.regret(incumbent_config)))
            val_curve.append((spent, self.val_regret(incumbent_config)))
        return SearchResult(trials, curve, budget, val_curve)


def regret_at(curve: list[tuple[int, float]], spent: int, none: float) -> float:
    """The regret after `spent` epochs: of the last trial that had ended by then (`none` before any)."""
    value = none
    for at, regret in curve:
        if at > spent:
            break
        value = regret
    return value


def budget_to_reach(curve: list[tuple[int, float]], target: float) -> float:
    """Epochs spent until the incumbent's regret was at most `target`; inf if it never was."""
    return next((at for at, regret in curve if regret <= target), math.inf)
