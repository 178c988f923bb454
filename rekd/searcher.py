"""Optuna behind Ray Tune, with ASHA-stopped trials recorded as PRUNED.

Ray's OptunaSearch tells Optuna that a trial ASHA stopped early is COMPLETE, with the value it had at
its partial budget. TPE then models those low, early values as if they were final results of their
configurations, which misleads it. Here such a trial is told as PRUNED: Optuna keeps its intermediate
values (reported every epoch) and TPE treats it as a trial that did not earn its full budget.
"""
from __future__ import annotations

import logging
from typing import Optional

import optuna
from ray.tune.result import TRAINING_ITERATION
from ray.tune.search.optuna import OptunaSearch

from rekd.study import Param, Study
from rekd.trainable import STOP_REASON

log = logging.getLogger(__name__)

EPOCH_KEY = "epoch"  # rekd's own per-epoch counter: survives trial restarts, unlike Tune's iteration


def distribution(param: Param) -> optuna.distributions.BaseDistribution:
    if param.kind == "uniform":
        return optuna.distributions.FloatDistribution(param.low, param.high)
    if param.kind == "loguniform":
        return optuna.distributions.FloatDistribution(param.low, param.high, log=True)
    if param.kind == "int":
        return optuna.distributions.IntDistribution(int(param.low), int(param.high))
    return optuna.distributions.CategoricalDistribution(list(param.choices))


def make_sampler(study: Study) -> optuna.samplers.BaseSampler:
    if study.sampler == "random":
        return optuna.samplers.RandomSampler(seed=study.sampler_seed)
    return optuna.samplers.TPESampler(seed=study.sampler_seed)


class PrunedAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna PRUNED, not COMPLETE, for a trial stopped before `max_epochs`."""

    def __init__(self, *args, max_epochs: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_epochs = max_epochs

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result:  # a result that only says why the trial stopped carries no metric
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        if result and result.get(STOP_REASON):  # NaN loss or out of memory: a failed configuration
            return super().on_trial_complete(trial_id, None, error=True)
        epoch = (result or {}).get(EPOCH_KEY)
        if error or epoch is None or epoch >= self.max_epochs or trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result, error)
        # Ray keeps the trial state in these private fields (ray 2.60). Earlier epochs were reported by
        # on_trial_result; the result ASHA stopped the trial on reaches only this method, so it is
        # reported here and becomes the pruned trial's value.
        ot_trial = self._ot_trials[trial_id]
        try:
            value = result.get(self.metric)
            if value is not None:
                ot_trial.report(float(value), int(result.get(TRAINING_ITERATION, epoch)))
            self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
        except Exception as exc:  # Optuna refuses e.g. a trial that reported nothing; not worth failing for
            log.warning("could not record trial %s as pruned: %s", trial_id, exc)
        self._completed_trials.add(trial_id)


    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        # Trials asked after the searcher's last snapshot died with the old driver: Tune never heard of
        # them. Close them in Optuna so no trial stays RUNNING forever.
        known = {t.number for t in self._ot_trials.values()}
        for trial in self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if trial.number not in known:
                self._ot_study.tell(trial.number, state=optuna.trial.TrialState.FAIL)


def make_searcher(study: Study, storage_url: str, study_name: str, stock: bool = False) -> OptunaSearch:
    """The study's sampler over its params, persisted in an Optuna RDB storage (for plots and resume)."""
    space = {p.name: distribution(p) for p in study.params}
    storage = optuna.storages.RDBStorage(storage_url)
    common = dict(space=space, metric=study.metric, mode=study.mode, sampler=make_sampler(study),
                  study_name=study_name, storage=storage)
    if stock:
        return OptunaSearch(**common)
    return PrunedAwareOptunaSearch(max_epochs=study.epochs, **common)
