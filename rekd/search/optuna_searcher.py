"""Optuna behind Ray Tune, with ASHA-stopped trials recorded as PRUNED.

Ray's OptunaSearch tells Optuna that a trial ASHA stopped early is COMPLETE, with the value it had at
its partial budget. TPE then models those low, early values as if they were final results of their
configurations, which misleads it. Here such a trial is told as PRUNED: Optuna keeps its intermediate
values (reported every epoch) and TPE treats it as a trial that did not earn its full budget.
"""
from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from typing import Optional

import optuna
from ray.tune.result import TRAINING_ITERATION
from ray.tune.search.optuna import OptunaSearch

from rekd.search.study import Param, Study
from rekd.tracking.outcomes import STOP_REASON

log = logging.getLogger(__name__)

CONTINUES_ATTR = "rekd.continues"
INTERRUPTED_ATTR = "rekd.interrupted_trials"
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


class ResumableOptunaSearch(OptunaSearch):
    """OptunaSearch whose Optuna record stays true across interruptions, resumes and moved folders.

    An interrupted search closes its unfinished Optuna trials as FAIL (close_unfinished): no trial stays
    RUNNING while no driver runs. On resume, each such trial that Tune continues from its checkpoint gets
    a new Optuna trial with the same parameters and intermediate values (user attr `rekd.continues`:
    the number of the trial it continues), which is told the trial's result. Ray keeps the Optuna state in
    private fields (`_ot_study`, `_ot_trials`, `_completed_trials`; ray 2.60): they are read and re-pointed here.
    """

    storage_url: Optional[str] = None  # set by the driver before a resume: where optuna.db is now

    # Tune pickles the searcher twice: whole, in tuner.pkl (unpickled by Tuner.restore) and as its
    # __dict__, in its searcher-state file (save/restore). Both keep the Optuna study as its name and
    # storage URL, not as live objects: Optuna's RDBStorage reconnects to its pickled URL as it is
    # unpickled, which would open (or create) optuna.db where the search was started, not where it is now.
    def __getstate__(self) -> dict:
        return portable(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(self.live(state))

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(portable(self.__dict__), f)

    def live(self, state: dict) -> dict:
        """A saved state with its Optuna study reconnected: at `storage_url` if set, else where it was saved."""
        saved = state.get("_ot_study")
        if not isinstance(saved, PortableStudy):
            return state
        url = type(self).storage_url or saved.url
        storage = optuna.storages.RDBStorage(url)
        study = optuna.load_study(study_name=saved.name, storage=storage, sampler=state["_sampler"])
        trials = {tid: optuna.trial.Trial(study, trial_id) for tid, trial_id in state["_ot_trials"].items()}
        return {**state, "_storage": storage, "_ot_study": study, "_ot_trials": trials}

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(self.live(pickle.load(f)))
        by_number = {t.number: t for t in self._ot_study.get_trials(deepcopy=False)}
        known = {t.number for t in self._ot_trials.values()}
        for trial in by_number.values():
            # Trials asked after the searcher's last snapshot died with the old driver: Tune never heard of them.
            if trial.state == optuna.trial.TrialState.RUNNING and trial.number not in known:
                self._ot_study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        for tune_id, ot_trial in list(self._ot_trials.items()):
            frozen = by_number.get(ot_trial.number)
            if tune_id in self._completed_trials or frozen is None or frozen.state != optuna.trial.TrialState.FAIL:
                continue
            self._ot_study.enqueue_trial(frozen.params, user_attrs={CONTINUES_ATTR: frozen.number})
            continued = self._ot_study.ask(fixed_distributions=frozen.distributions)
            for step, value in sorted(frozen.intermediate_values.items()):
                continued.report(value, step)
            self._ot_trials[tune_id] = continued


class PrunedAwareOptunaSearch(ResumableOptunaSearch):
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
        # Earlier epochs were reported by on_trial_result; the result ASHA stopped the trial on reaches
        # only this method, so it is reported here and becomes the pruned trial's value.
        ot_trial = self._ot_trials[trial_id]
        try:
            value = result.get(self.metric)
            if value is not None:
                ot_trial.report(float(value), int(result.get(TRAINING_ITERATION, epoch)))
            self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
        except Exception as exc:  # Optuna refuses e.g. a trial that reported nothing; not worth failing for
            log.warning("could not record trial %s as pruned: %s", trial_id, exc)
        self._completed_trials.add(trial_id)


@dataclass(frozen=True)
class PortableStudy:
    name: str
    url: str


def portable(state: dict) -> dict:
    """The searcher's state with its Optuna study as name and URL, and its trials as Optuna trial ids."""
    study = state.get("_ot_study")
    if study is None or not isinstance(state.get("_storage"), optuna.storages.RDBStorage):
        return dict(state)
    # Optuna's Trial keeps its storage id only in a private field (optuna 5.0).
    return {**state, "_ot_study": PortableStudy(study.study_name, state["_storage"].url), "_storage": None,
            "_ot_trials": {tid: trial._trial_id for tid, trial in state["_ot_trials"].items()}}


def close_unfinished(storage_url: str, study_name: str) -> int:
    """Close the study's RUNNING trials as FAIL when the search stops without a driver to finish them; their
    numbers are kept in the study's user attr `rekd.interrupted_trials`. Returns how many were closed."""
    study = optuna.load_study(study_name=study_name, storage=storage_url)
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in running:
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    if running:
        earlier = study.user_attrs.get(INTERRUPTED_ATTR, [])
        study.set_user_attr(INTERRUPTED_ATTR, sorted({*earlier, *(t.number for t in running)}))
    return len(running)


def make_searcher(study: Study, storage_url: str, study_name: str, stock: bool = False) -> OptunaSearch:
    """The study's sampler over its params, persisted in an Optuna RDB storage (for plots and resume)."""
    space = {p.name: distribution(p) for p in study.params}
    storage = optuna.storages.RDBStorage(storage_url)
    common = dict(space=space, metric=study.metric, mode=study.mode, sampler=make_sampler(study),
                  study_name=study_name, storage=storage)
    if stock:
        return ResumableOptunaSearch(**common)
    return PrunedAwareOptunaSearch(max_epochs=study.epochs, **common)
