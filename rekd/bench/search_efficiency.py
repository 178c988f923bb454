"""Search efficiency on a synthetic multi-fidelity benchmark with a known optimum (no training, no download).

The objective stands in for a sparse-KD study: three settings (prune_ratio, temperature on a log scale,
alpha), a final accuracy with a known maximum, and learning curves whose speed depends on alpha, so
that the ranking after a few epochs is not the final one (where early stopping can mislead). The real
Ray classes decide: OptunaSearch (stock, or rekd's PRUNED fix) and ASHA, driven trial by trial in one
process, so that hundreds of searches take seconds and differences are the algorithms', not the machine's.
"""
from __future__ import annotations

import math
import statistics
from types import SimpleNamespace

import optuna
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from rekd.bench import replay
from rekd.search.optuna_searcher import PrunedAwareOptunaSearch

MAX_T = 16
OPTIMUM = 0.9
TARGET_REGRET = 0.02
SPACE = {
    "prune_ratio": optuna.distributions.FloatDistribution(0.0, 0.9),
    "temperature": optuna.distributions.FloatDistribution(1.0, 20.0, log=True),
    "alpha": optuna.distributions.FloatDistribution(0.0, 1.0),
}


def final_accuracy(c: dict) -> float:
    """Known maximum OPTIMUM at prune_ratio 0.3, temperature 4, alpha 0.7."""
    return (OPTIMUM - 0.3 * (c["prune_ratio"] - 0.3) ** 2 - 0.2 * (math.log10(c["temperature"]) - math.log10(4)) ** 2
            - 0.25 * (c["alpha"] - 0.7) ** 2)


# Learning curves acc(epoch) = final * (1 - exp(-epoch / tau)). Two shapes bracket what early stopping meets:
CURVES = {
    # strong distillation (high alpha) starts much slower: the ranking after a few epochs is not the final one
    "slow starters": lambda c: 1.0 + 5.0 * c["alpha"],
    # mildly config-dependent speed: the early ranking mostly holds
    "ranking kept": lambda c: 2.0 + 1.0 * c["alpha"],
}


def accuracy(c: dict, epoch: int, curve: str) -> float:
    return final_accuracy(c) * (1 - math.exp(-epoch / CURVES[curve](c)))


STRATEGIES = {
    "tpe + asha + pruned fix": (lambda seed: PrunedAwareOptunaSearch(
        space=SPACE, metric="val_acc", mode="max", sampler=optuna.samplers.TPESampler(seed=seed), max_epochs=MAX_T), True),
    "tpe + asha, stock OptunaSearch": (lambda seed: OptunaSearch(
        space=SPACE, metric="val_acc", mode="max", sampler=optuna.samplers.TPESampler(seed=seed)), True),
    "random + asha": (lambda seed: OptunaSearch(
        space=SPACE, metric="val_acc", mode="max", sampler=optuna.samplers.RandomSampler(seed=seed)), True),
    "random, no early stopping": (lambda seed: OptunaSearch(
        space=SPACE, metric="val_acc", mode="max", sampler=optuna.samplers.RandomSampler(seed=seed)), False),
}


def one_search(make_searcher, early_stopping: bool, seed: int, budget: int, curve: str) -> list[tuple[int, float]]:
    """[(epochs spent so far, simple regret so far)] after each trial, one trial at a time, until `budget`
    epochs are spent: a strategy that stops trials early gets to try more of them."""
    searcher = make_searcher(seed)
    scheduler = ASHAScheduler(time_attr="training_iteration", metric="val_acc", mode="max", max_t=MAX_T,
                              grace_period=1, reduction_factor=3) if early_stopping else None
    spent, best_seen, best_config, history = 0, -math.inf, None, []
    i = 0
    while spent + MAX_T <= budget:  # room for one more full trial
        i += 1
        trial = SimpleNamespace(trial_id=f"t{i}")
        config = searcher.suggest(trial.trial_id)
        if scheduler is not None:
            scheduler.on_trial_add(None, trial)
        for epoch in range(1, MAX_T + 1):
            result = {"val_acc": accuracy(config, epoch, curve), "training_iteration": epoch, "epoch": epoch}
            spent += 1
            decision = scheduler.on_trial_result(None, trial, result) if scheduler else TrialScheduler.CONTINUE
            if epoch == MAX_T or decision == TrialScheduler.STOP:
                searcher.on_trial_complete(trial.trial_id, result)
                if epoch == MAX_T and result["val_acc"] > best_seen:  # only full-budget trials count
                    best_seen, best_config = result["val_acc"], config
                break
            searcher.on_trial_result(trial.trial_id, result)
        regret = OPTIMUM - final_accuracy(best_config) if best_config else OPTIMUM
        history.append((spent, regret))
    return history


def regret_at(curve: list[tuple[int, float]], budget: int) -> float:
    return replay.regret_at(curve, budget, OPTIMUM)


budget_to_reach = replay.budget_to_reach


def search_efficiency(quick: bool) -> list:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    seeds = range(10 if quick else 20)
    budget = (20 if quick else 40) * MAX_T  # epochs per search, the same for every strategy
    return [row for curve in CURVES for row in curve_rows(curve, seeds, budget)]


def curve_rows(curve: str, seeds: range, budget: int) -> list:
    from rekd.bench.rows import Row

    early = 8 * MAX_T  # a point on the way: eight full trials' worth
    rows, mean_regret = [], {}
    for name, (make, stops_early) in STRATEGIES.items():
        curves = [one_search(make, stops_early, seed, budget, curve) for seed in seeds]
        regrets = [regret_at(c, budget) for c in curves]
        needed = [budget_to_reach(c, TARGET_REGRET) for c in curves]
        mean_regret[name] = statistics.mean(regrets)
        reached = [n for n in needed if math.isfinite(n)]
        rows.append(Row(f"simple regret at {budget} epochs [{curve}: {name}]", mean_regret[name], "regret", None,
                        f"mean over {len(curves)} seeds (std {statistics.pstdev(regrets):.4f}), "
                        f"{statistics.mean(len(c) for c in curves):.0f} trials; at {early} epochs "
                        f"{statistics.mean(regret_at(c, early) for c in curves):.4f}; epochs to regret <= "
                        f"{TARGET_REGRET}: median {statistics.median(needed):.0f}, reached by {len(reached)}/{len(curves)}"))
    fixed, stock = mean_regret["tpe + asha + pruned fix"], mean_regret["tpe + asha, stock OptunaSearch"]
    rows.append(Row(f"regret with the PRUNED fix / with stock OptunaSearch [{curve}]", fixed / stock if stock else 1.0,
                    "ratio", 1.0, "the fix must not do worse than Ray's stock behaviour"))
    return rows
