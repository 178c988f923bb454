"""Is MO-ASHA worth it? Two objectives on a synthetic multi-fidelity benchmark with a known Pareto front.

The problem stands in for a sparse-student study (search_spaces/sparse_student.yaml): the student's
target_sparsity, the teacher's prune_ratio, temperature and alpha; validation accuracy (max) against energy
per sample (min). Accuracy falls as sparsity rises, steeply near the top; energy is proportional to the
student's density times a firing-rate factor that the distillation settings move a little, so the front is a
real trade-off curve, known by dense sampling. Two scenarios say what the objectives look like before the
last epoch: a student sparse from the start (rewire), and one pruned while it trains (gmp), whose early
energy and accuracy are not yet those of its final sparsity.

A search's score is its share of the attainable hypervolume: the hypervolume of the front of its full-budget
trials over the true front's, both normalised by the true front's bounds, so that scores compare across
strategies and seeds. As in rekd.bench.search_efficiency the real classes decide (rekd's Optuna searcher,
MO-ASHA, ASHA), driven one trial at a time in one process until an epoch budget is spent.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import statistics
from types import SimpleNamespace
from typing import Callable, Sequence

import optuna
from ray.tune.schedulers import TrialScheduler

from rekd.bench import replay
from rekd.bench.rows import Row
from rekd.search.asha import ResumableASHA
from rekd.search.moasha import MultiObjectiveASHA
from rekd.search.optuna_searcher import PrunedAwareOptunaSearch
from rekd.search.pareto import Point, bounds, minimised, normalized_hypervolume, pareto_front
from rekd.snn.structure import cubic_sparsity

MAX_T, GRACE_PERIOD, REDUCTION_FACTOR = 16, 1, 3  # the same for every strategy that stops trials early
OBJECTIVES = [("val_acc", "max"), ("energy_uj", "min")]
MODES = [mode for _, mode in OBJECTIVES]
BEST_ACCURACY = 0.92  # a converged student at sparsity 0.5 with the best distillation settings
DENSE_ENERGY_UJ = 20.0  # energy per sample of a dense student at firing-rate factor 1
PRUNING_ENDS = 0.75 * MAX_T  # gmp reaches the target sparsity at 3/4 of the budget
WEIGHTS = (0.5, 0.5)  # the weighted sum's weights of accuracy and energy, each scaled to 0..1
TARGET_SHARE = 0.9  # the rows report how many epochs each search needed to reach this share
SPACE = {
    "target_sparsity": optuna.distributions.FloatDistribution(0.5, 0.95),
    "prune_ratio": optuna.distributions.FloatDistribution(0.0, 0.9),
    "temperature": optuna.distributions.FloatDistribution(1.0, 20.0, log=True),
    "alpha": optuna.distributions.FloatDistribution(0.0, 1.0),
}


def final_accuracy(c: dict, sparsity: float | None = None) -> float:
    """BEST_ACCURACY at sparsity 0.5, prune_ratio 0.3, temperature 4, alpha 0.7; sparsity costs
    0.25 ((s - 0.5) / 0.45)^3 (0.25 at s = 0.95, most of it near the top), the other settings quadratically."""
    s = c["target_sparsity"] if sparsity is None else sparsity
    return (BEST_ACCURACY - 0.25 * (max(s - 0.5, 0.0) / 0.45) ** 3 - 0.3 * (c["prune_ratio"] - 0.3) ** 2
            - 0.2 * (math.log10(c["temperature"]) - math.log10(4)) ** 2 - 0.25 * (c["alpha"] - 0.7) ** 2)


def firing_rate_factor(c: dict) -> float:
    """0.8 to 1.1: strong distillation (alpha) makes the student fire a little more, softer targets (a higher
    temperature) a little less, so the distillation settings' accuracy optimum is not their energy optimum."""
    return 0.9 + 0.2 * c["alpha"] - 0.1 * math.log(c["temperature"]) / math.log(20.0)


def sparse_from_the_start(c: dict, epoch: int) -> tuple[float, float]:
    """rewire: the final density from the first step, so energy never changes; learning speed depends
    mildly on alpha, so the early accuracy ranking mostly holds."""
    val_acc = final_accuracy(c) * (1 - math.exp(-epoch / (2.0 + c["alpha"])))
    return val_acc, DENSE_ENERGY_UJ * (1 - c["target_sparsity"]) * firing_rate_factor(c)


def pruned_while_training(c: dict, epoch: int) -> tuple[float, float]:
    """gmp: dense at first, the target sparsity reached on Zhu & Gupta's cubic ramp at PRUNING_ENDS, so the
    early rungs see neither the final energy nor the accuracy the final sparsity allows; strong distillation
    (high alpha) starts much slower."""
    sparsity = cubic_sparsity(epoch / PRUNING_ENDS, 0.0, c["target_sparsity"])
    val_acc = final_accuracy(c, sparsity) * (1 - math.exp(-epoch / (1.0 + 5.0 * c["alpha"])))
    return val_acc, DENSE_ENERGY_UJ * (1 - sparsity) * firing_rate_factor(c)


# (val_acc, energy_uj) of a config after `epoch` epochs
SCENARIOS: dict[str, Callable[[dict, int], tuple[float, float]]] = {
    "sparse from the start": sparse_from_the_start,
    "pruned while training": pruned_while_training,
}


GRID = {"target_sparsity": 46, "temperature": 11, "alpha": 11}  # the true front's first grid, refined twice


@functools.lru_cache(maxsize=None)
def true_front(scenario: str) -> tuple[Point, ...]:
    """The attainable front at MAX_T (minimised points, best accuracy first). prune_ratio moves accuracy only, so
    it sits at its optimum 0.3; sparsity, temperature (log scale) and alpha are searched on GRID over their
    ranges, then twice around the front's points at a quarter of the step. Measured: a point between the front's
    points adds at most ~1e-8 to the share."""
    def objectives(u: tuple[float, ...]) -> Point:
        config = {name: grid_value(SPACE[name], x) for name, x in zip(GRID, u)}
        return minimised(SCENARIOS[scenario]({**config, "prune_ratio": 0.3}, MAX_T), MODES)

    seen = {u: objectives(u) for u in itertools.product(*([i / (n - 1) for i in range(n)] for n in GRID.values()))}
    steps = [1 / (n - 1) for n in GRID.values()]
    front = sweep_front(seen)
    for _ in range(2):
        steps = [s / 4 for s in steps]
        for u in front:
            for offsets in itertools.product(range(-2, 3), repeat=len(u)):
                v = tuple(min(1.0, max(0.0, x + o * s)) for x, o, s in zip(u, offsets, steps))
                if v not in seen:
                    seen[v] = objectives(v)
        front = sweep_front(seen)
    return tuple(sorted(seen[u] for u in front))


def sweep_front(seen: dict[tuple[float, ...], Point]) -> list[tuple[float, ...]]:
    """The keys whose two-objective points are non-dominated. pareto.pareto_front compares all pairs (10^10
    here); in two objectives one sort and one sweep find the same front."""
    front, best_second = [], math.inf
    for point, u in sorted((point, u) for u, point in seen.items()):
        if point[1] < best_second:
            front.append(u)
            best_second = point[1]
    return front


def grid_value(distribution: optuna.distributions.FloatDistribution, u: float) -> float:
    """The value at share u (0..1) of a range, on a log scale for a log distribution."""
    if distribution.log:
        return math.exp(math.log(distribution.low) + u * (math.log(distribution.high) - math.log(distribution.low)))
    return distribution.low + u * (distribution.high - distribution.low)


@functools.lru_cache(maxsize=None)
def normalisation(scenario: str) -> tuple[Point, Point]:
    """(ideal, reference): the true front's best value in each objective, and its worst plus 10 % of its range."""
    return bounds(true_front(scenario), margin=0.1)


@functools.lru_cache(maxsize=None)
def attainable_hypervolume(scenario: str) -> float:
    return front_hypervolume(true_front(scenario), *normalisation(scenario))


def front_hypervolume(front: Sequence[Point], ideal: Point, reference: Point) -> float:
    """pareto.normalized_hypervolume of a two-objective front sorted by its first objective, inside the box, in
    one sweep: pareto.hypervolume is quadratic in the points, fine for a search's tens, slow for thousands."""
    scaled = [tuple((x - i) / (r - i) for x, i, r in zip(point, ideal, reference)) for point in front]
    edges = [x for x, _ in scaled[1:]] + [1.0]  # each point's slab ends where the next point's begins
    return sum((edge - x) * (1.0 - y) for (x, y), edge in zip(scaled, edges))


def share(points: Sequence[Point], scenario: str) -> float:
    """The share of the attainable hypervolume that these minimised points dominate: 0 to 1, higher is better."""
    return normalized_hypervolume(points, *normalisation(scenario)) / attainable_hypervolume(scenario)


def weighted_score(val_acc: float, energy_uj: float, scenario: str) -> float:
    """The weighted-sum strategy's one metric (max): 1 - WEIGHTS . (objectives scaled so that the true front's
    ideal is 0 and its reference 1). The scaling knows the true front, the best this strategy could be given."""
    ideal, reference = normalisation(scenario)
    point = minimised((val_acc, energy_uj), MODES)
    return 1.0 - sum(w * (x - i) / (r - i) for w, x, i, r in zip(WEIGHTS, point, ideal, reference))


def mo_search(sampler: optuna.samplers.BaseSampler) -> PrunedAwareOptunaSearch:
    return PrunedAwareOptunaSearch(space=SPACE, objectives=OBJECTIVES, sampler=sampler, max_epochs=MAX_T)


def mo_asha() -> MultiObjectiveASHA:
    return MultiObjectiveASHA(objectives=OBJECTIVES, max_t=MAX_T, grace_period=GRACE_PERIOD,
                              reduction_factor=REDUCTION_FACTOR)


def weighted_sum_tpe_asha(seed: int) -> tuple[PrunedAwareOptunaSearch, ResumableASHA]:
    searcher = PrunedAwareOptunaSearch(space=SPACE, metric="score", mode="max",
                                       sampler=optuna.samplers.TPESampler(seed=seed), max_epochs=MAX_T)
    return searcher, ResumableASHA(time_attr="training_iteration", metric="score", mode="max", max_t=MAX_T,
                                   grace_period=GRACE_PERIOD, reduction_factor=REDUCTION_FACTOR)


# name -> seed -> (searcher, scheduler or None for no early stopping)
STRATEGIES = {
    "mo-tpe + mo-asha": lambda seed: (mo_search(optuna.samplers.TPESampler(seed=seed)), mo_asha()),
    "mo-tpe, no early stopping": lambda seed: (mo_search(optuna.samplers.TPESampler(seed=seed)), None),
    "nsga-ii + mo-asha": lambda seed: (
        mo_search(optuna.samplers.NSGAIISampler(population_size=8, seed=seed)), mo_asha()),
    "random + mo-asha": lambda seed: (mo_search(optuna.samplers.RandomSampler(seed=seed)), mo_asha()),
    "random, no early stopping": lambda seed: (mo_search(optuna.samplers.RandomSampler(seed=seed)), None),
    "tpe on a weighted sum + asha": weighted_sum_tpe_asha,
}


@dataclasses.dataclass(frozen=True)
class TrialRecord:
    spent: int  # epochs the whole search had spent when this trial ended
    epochs: int  # epochs this trial ran: MAX_T unless it was stopped early
    val_acc: float  # at its last epoch
    energy_uj: float  # at its last epoch


def one_search(strategy: str, seed: int, budget: int, scenario: str) -> list[TrialRecord]:
    """Every trial of one search, in order, one trial at a time until `budget` epochs are spent: a strategy
    that stops trials early gets to try more of them."""
    searcher, scheduler = STRATEGIES[strategy](seed)
    objectives = SCENARIOS[scenario]
    spent, trials = 0, []
    while spent + MAX_T <= budget:  # room for one more full trial
        trial = SimpleNamespace(trial_id=f"t{len(trials) + 1}", path="")  # ResumableASHA: no folder to replay
        config = searcher.suggest(trial.trial_id)
        if scheduler is not None:
            scheduler.on_trial_add(None, trial)
        for epoch in range(1, MAX_T + 1):
            val_acc, energy_uj = objectives(config, epoch)
            result = {"training_iteration": epoch, "epoch": epoch, "val_acc": val_acc, "energy_uj": energy_uj,
                      "score": weighted_score(val_acc, energy_uj, scenario)}
            spent += 1
            decision = scheduler.on_trial_result(None, trial, result) if scheduler else TrialScheduler.CONTINUE
            if epoch == MAX_T or decision == TrialScheduler.STOP:
                searcher.on_trial_complete(trial.trial_id, result)
                break
            searcher.on_trial_result(trial.trial_id, result)
        trials.append(TrialRecord(spent, epoch, val_acc, energy_uj))
    return trials


def share_curve(trials: Sequence[TrialRecord], scenario: str) -> list[tuple[int, float]]:
    """[(epochs spent, share of the attainable hypervolume)] after each trial. Only full-budget trials count:
    a trial stopped early has no final objectives, and its early ones are not what it would have reached."""
    front: list[Point] = []
    current, curve = 0.0, []
    for trial in trials:
        if trial.epochs == MAX_T:
            front.append(minimised((trial.val_acc, trial.energy_uj), MODES))
            front = [front[i] for i in pareto_front(front)]
            current = share(front, scenario)
        curve.append((trial.spent, current))
    return curve


def share_at(curve: Sequence[tuple[int, float]], budget: int) -> float:
    return replay.regret_at(list(curve), budget, 0.0)  # the same step lookup: the last value by `budget`


def budget_to_reach(curve: Sequence[tuple[int, float]], target: float) -> float:
    return next((spent for spent, share_then in curve if share_then >= target), math.inf)


def pareto_efficiency(quick: bool) -> list[Row]:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    seeds = range(10 if quick else 20)
    budget = (30 if quick else 40) * MAX_T  # epochs per search, the same for every strategy
    return [row for scenario in SCENARIOS for row in scenario_rows(scenario, seeds, budget)]


def scenario_rows(scenario: str, seeds: Sequence[int], budget: int) -> list[Row]:
    """One row per strategy, then whether MO-ASHA pays off for MO-TPE (the same seeds, paired)."""
    rows, shares = [], {}
    for name in STRATEGIES:
        searches = [one_search(name, seed, budget, scenario) for seed in seeds]
        curves = [share_curve(trials, scenario) for trials in searches]
        shares[name] = [share_at(c, budget) for c in curves]
        rows.append(strategy_row(f"{scenario}: {name}", searches, curves, budget))
    with_asha, without = shares["mo-tpe + mo-asha"], shares["mo-tpe, no early stopping"]
    differences = [a - b for a, b in zip(with_asha, without)]
    rows.append(Row(
        f"hv share of mo-tpe + mo-asha / mo-tpe without early stopping [{scenario}]",
        statistics.mean(with_asha) / statistics.mean(without), "ratio", 1.0,
        f"same seeds paired: mo-asha ahead on {sum(d > 0 for d in differences)}/{len(seeds)}, difference "
        f"{statistics.mean(differences):+.4f} (std {statistics.pstdev(differences):.4f})", higher_is_better=True))
    return rows


def strategy_row(name: str, searches: Sequence[list[TrialRecord]], curves: Sequence[list[tuple[int, float]]],
                 budget: int) -> Row:
    early = budget // 2
    shares = [share_at(c, budget) for c in curves]
    needed = [budget_to_reach(c, TARGET_SHARE) for c in curves]
    reached = sum(math.isfinite(n) for n in needed)
    epochs_per_trial = statistics.mean(t.epochs for trials in searches for t in trials)
    full_budget = statistics.mean(sum(t.epochs == MAX_T for t in trials) for trials in searches)
    stopping = (f"every trial to max_t {MAX_T}" if epochs_per_trial == MAX_T
                else f"stopped at rungs of max_t {MAX_T}, grace {GRACE_PERIOD}, eta {REDUCTION_FACTOR}")
    return Row(
        f"hv share at {budget} epochs [{name}]", statistics.mean(shares), "hv share", None,
        f"mean over {len(searches)} seeds (std {statistics.pstdev(shares):.4f}), "
        f"{statistics.mean(len(t) for t in searches):.1f} trials of {epochs_per_trial:.2f} epochs, {full_budget:.1f} "
        f"at max_t ({stopping}); at {early} epochs {statistics.mean(share_at(c, early) for c in curves):.4f}; "
        f"epochs to share >= {TARGET_SHARE}: median {statistics.median(needed):.0f}, reached by "
        f"{reached}/{len(searches)}", higher_is_better=True)
