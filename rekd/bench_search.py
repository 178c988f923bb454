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

from rekd.searcher import PrunedAwareOptunaSearch

MAX_T = 16
OPTIMUM = 0.9
TARGET_REGRET = 0.01
SPACE = {
    "prune_ratio": optuna.distributions.FloatDistribution(0.0, 0.9),
    "temperature": optuna.distributions.FloatDistribution(1.0, 20.0, log=True),
    "alpha": optuna.distributions.FloatDistribution(0.0, 1.0),
}


def final_accuracy(c: dict) -> float:
    """Known maximum OPTIMUM at prune_ratio 0.3, temperature 4, alpha 0.7."""
    return (OPTIMUM - 0.3 * (c["prune_ratio"] - 0.3) ** 2 - 0.2 * (math.log10(c["temperature"]) - math.log10(4)) ** 2
            - 0.25 * (c["alpha"] - 0.7) ** 2)


def accuracy(c: dict, epoch: int) -> float:
    """The learning curve: strong distillation (high alpha) starts slower."""
    return final_accuracy(c) * (1 - math.exp(-epoch / (1.0 + 5.0 * c["alpha"])))


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


def one_search(make_searcher, early_stopping: bool, seed: int, trials: int) -> list[tuple[int, float]]:
    """[(epochs spent so far, simple regret so far)] after each trial, one trial at a time."""
    searcher = make_searcher(seed)
    scheduler = ASHAScheduler(time_attr="training_iteration", metric="val_acc", mode="max", max_t=MAX_T,
                              grace_period=1, reduction_factor=3) if early_stopping else None
    spent, best_seen, best_config, curve = 0, -math.inf, None, []
    for i in range(trials):
        trial = SimpleNamespace(trial_id=f"t{i}")
        config = searcher.suggest(trial.trial_id)
        if scheduler is not None:
            scheduler.on_trial_add(None, trial)
        for epoch in range(1, MAX_T + 1):
            result = {"val_acc": accuracy(config, epoch), "training_iteration": epoch, "epoch": epoch}
            spent += 1
            decision = scheduler.on_trial_result(None, trial, result) if scheduler else TrialScheduler.CONTINUE
            if epoch == MAX_T or decision == TrialScheduler.STOP:
                searcher.on_trial_complete(trial.trial_id, result)
                if epoch == MAX_T and result["val_acc"] > best_seen:  # only full-budget trials count
                    best_seen, best_config = result["val_acc"], config
                break
            searcher.on_trial_result(trial.trial_id, result)
        regret = OPTIMUM - final_accuracy(best_config) if best_config else OPTIMUM
        curve.append((spent, regret))
    return curve


def regret_at(curve: list[tuple[int, float]], budget: int) -> float:
    regret = OPTIMUM
    for spent, value in curve:
        if spent > budget:
            break
        regret = value
    return regret


def budget_to_reach(curve: list[tuple[int, float]], target: float) -> float:
    return next((spent for spent, regret in curve if regret <= target), math.inf)


def search_efficiency(quick: bool) -> list:
    from rekd.bench import Row

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    seeds = range(10 if quick else 20)
    trials = 30 if quick else 60
    budget = 8 * MAX_T  # the same number of epochs for every strategy: eight full trials' worth
    rows, mean_regret = [], {}
    for name, (make, early) in STRATEGIES.items():
        curves = [one_search(make, early, seed, trials) for seed in seeds]
        regrets = [regret_at(c, budget) for c in curves]
        needed = [budget_to_reach(c, TARGET_REGRET) for c in curves]
        mean_regret[name] = statistics.mean(regrets)
        reached = [n for n in needed if math.isfinite(n)]
        rows.append(Row(f"simple regret at {budget} epochs [{name}]", mean_regret[name], "regret", None,
                        f"mean over {len(curves)} seeds (std {statistics.pstdev(regrets):.4f}); epochs to regret "
                        f"<= {TARGET_REGRET}: median {statistics.median(needed):.0f}, reached by {len(reached)}/{len(curves)}"))
    fixed, stock = mean_regret["tpe + asha + pruned fix"], mean_regret["tpe + asha, stock OptunaSearch"]
    rows.append(Row("regret with the PRUNED fix / with stock OptunaSearch", fixed / stock if stock else 1.0, "ratio",
                    1.0, "the fix must not do worse than Ray's stock behaviour"))
    return rows
