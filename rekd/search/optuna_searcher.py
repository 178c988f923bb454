"""Optuna behind Ray Tune, with ASHA-stopped trials recorded as PRUNED.

Ray's OptunaSearch tells Optuna that a trial ASHA stopped early is COMPLETE, with the value it had at
its partial budget. TPE then models those low, early values as if they were final results of their
configurations, which misleads it. Here such a trial is told as PRUNED: Optuna keeps its intermediate
values (reported every epoch) and TPE treats it as a trial that did not earn its full budget.

The searcher is rekd's own `ray.tune.search.Searcher` over Optuna's public ask-and-tell API, not a subclass
of Ray's OptunaSearch: resuming a search needs the Optuna study and trials to be saved and reconnected,
and OptunaSearch keeps them only in private fields. Here the searcher's state is public and portable:
the study is its name and storage URL, each Tune trial maps to its Optuna trial NUMBER, and the live
Optuna objects are opened from those when needed (so a pickled searcher never holds a database
connection, and a moved folder is reconnected where it is now).

`ResumableOptunaSearch` does what Ray's OptunaSearch does (an early-stopped trial is told COMPLETE with its
partial value: the `stock` comparison); `PrunedAwareOptunaSearch` adds the PRUNED fix and tells a trial
that stopped itself (NaN loss, out of memory) as FAIL.

With several `objectives` the Optuna study has one direction per objective and a full-budget trial is
told COMPLETE with all its values. Optuna refuses intermediate values in such a study (`Trial.report`),
so a trial stopped early is told PRUNED without them; the values it was stopped on are kept in its user
attrs (`rekd.stopped_values`, `rekd.stopped_at_epoch`).
"""
from __future__ import annotations

import logging
import pickle
import warnings
from typing import Optional

import optuna
from ray.tune.result import DEFAULT_METRIC, TRAINING_ITERATION
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from rekd.search.interrupt import deferred
from rekd.search.study import Param, Study
from rekd.tracking.outcomes import COMPLETED, EPOCH, STOP_REASON, STOPPED_EARLY, ended

log = logging.getLogger(__name__)

CONTINUES_ATTR = "rekd.continues"
STOPPED_VALUES_ATTR = "rekd.stopped_values"  # multi-objective: {metric: value} at the epoch it was stopped
STOPPED_AT_ATTR = "rekd.stopped_at_epoch"
INTERRUPTED_ATTR = "rekd.interrupted_trials"

TrialState = optuna.trial.TrialState
LIVE = ("study", "storage", "open_trials")  # connections and objects opened from the saved state


def distribution(param: Param) -> optuna.distributions.BaseDistribution:
    if param.kind == "uniform":
        return optuna.distributions.FloatDistribution(param.low, param.high)
    if param.kind == "loguniform":
        return optuna.distributions.FloatDistribution(param.low, param.high, log=True)
    if param.kind == "int":
        return optuna.distributions.IntDistribution(int(param.low), int(param.high))
    return optuna.distributions.CategoricalDistribution(list(param.choices))


def make_sampler(study: Study) -> optuna.samplers.BaseSampler:
    return sampler_for(study.sampler, study.sampler_seed, population_size=study.population_size,
                       multivariate=study.multivariate, constant_liar=study.constant_liar)


def sampler_for(kind: str, seed: int, population_size: int = 8, multivariate: bool = False,
                constant_liar: bool = False) -> optuna.samplers.BaseSampler:
    """A seeded sampler of a study's kind. TPE handles several objectives itself (MOTPE); NSGA-II evolves
    generations of `population_size` trials and samples at random until the first is complete."""
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=population_size, seed=seed)
    with warnings.catch_warnings():  # both options are "experimental" in Optuna 5: a warning each time, no news
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=multivariate, constant_liar=constant_liar)


class ResumableOptunaSearch(Searcher):
    """Optuna's sampler behind Tune (as Ray's OptunaSearch), whose Optuna record stays true across
    interruptions, resumes and moved folders.

    `storage` is the study's RDB URL (None: an in-memory study, which is not resumable). An interrupted
    search closes its unfinished Optuna trials as FAIL (close_unfinished): no trial stays RUNNING while no
    driver runs. On resume, each such trial that Tune continues from its checkpoint gets a new Optuna trial
    with the same parameters and intermediate values (user attr `rekd.continues`: the number of the trial
    it continues), which is told the trial's result.
    """

    storage_url: Optional[str] = None  # set by the driver before a resume: where optuna.db is now

    def __init__(self, space: Optional[dict[str, optuna.distributions.BaseDistribution]] = None,
                 metric: Optional[str] = None, mode: Optional[str] = None,
                 sampler: Optional[optuna.samplers.BaseSampler] = None, study_name: str = "optuna",
                 storage: Optional[str] = None, objectives: Optional[list[tuple[str, str]]] = None):
        if objectives:  # several: Tune's Searcher takes the first as its metric and mode
            metric, mode = objectives[0]
        super().__init__(metric=metric, mode=mode)
        self.space = dict(space or {})
        self.target_metric, self.target_mode = metric, mode
        self.objectives = [tuple(o) for o in objectives] if objectives else None
        self.sampler = sampler or optuna.samplers.TPESampler()
        self.study_name = study_name
        self.study_url = storage
        self.trial_numbers: dict[str, int] = {}  # Tune trial id -> Optuna trial number
        self.completed: set[str] = set()  # Tune trial ids already told to Optuna
        self.study: Optional[optuna.Study] = None
        self.storage: Optional[optuna.storages.BaseStorage] = None
        self.open_trials: dict[int, optuna.trial.Trial] = {}  # Optuna trial number -> its live trial
        if self.space:
            self.open_study(create=True)

    # Searcher's own `metric` and `mode` read fields it keeps privately; set_search_properties may set
    # them after construction, so they are kept here instead.
    @property
    def metric(self) -> Optional[str]:
        return self.target_metric

    @property
    def mode(self) -> Optional[str]:
        return self.target_mode

    @property
    def multi_objective(self) -> bool:
        return len(getattr(self, "objectives", None) or ()) > 1

    def values(self, result: Optional[dict]):
        """The result's objective value (a list of them with several objectives); None if one is missing."""
        if not result:
            return None
        if not self.multi_objective:
            return result.get(self.metric)
        values = [result.get(metric) for metric, _ in self.objectives]
        return None if any(v is None for v in values) else [float(v) for v in values]

    def set_search_properties(self, metric: Optional[str], mode: Optional[str], config: dict, **spec) -> bool:
        """Tune's TuneConfig metric/mode and param space, used (as OptunaSearch does) only when the searcher
        was made without a space of its own."""
        if self.space:
            return False
        self.space = OptunaSearch.convert_search_space(config)
        self.target_metric = metric or self.target_metric
        self.target_mode = mode or self.target_mode
        if self.target_metric is None and self.target_mode:  # only a mode: Tune's anonymous metric
            self.target_metric = DEFAULT_METRIC
        self.open_study(create=True)
        return True

    def open_study(self, create: bool) -> optuna.Study:
        """Connect to the study: created (or loaded) by a new searcher; only loaded by a restored one, so
        that a wrong place fails instead of starting an empty study there."""
        with deferred():
            self.storage = (optuna.storages.RDBStorage(self.study_url) if self.study_url
                            else optuna.storages.InMemoryStorage())
            if create:
                modes = [mode for _, mode in self.objectives] if self.multi_objective else [self.target_mode]
                self.study = optuna.create_study(
                    study_name=self.study_name, storage=self.storage, sampler=self.sampler,
                    pruner=optuna.pruners.NopPruner(), load_if_exists=True,
                    directions=["minimize" if mode == "min" else "maximize" for mode in modes])
            else:
                self.study = optuna.load_study(study_name=self.study_name, storage=self.storage,
                                               sampler=self.sampler, pruner=optuna.pruners.NopPruner())
            self.open_trials = {}
            return self.study

    def connected(self) -> optuna.Study:
        return self.study if self.study is not None else self.open_study(create=False)

    def optuna_trial(self, trial_id: str) -> optuna.trial.Trial:
        """The live Optuna trial of a Tune trial, opened from its number after a restore. Optuna offers a
        trial by number only frozen: its storage's public lookup gives the id a live `Trial` is made from."""
        number = self.trial_numbers[trial_id]
        trial = self.open_trials.get(number)
        if trial is None:
            study = self.connected()
            study_id = self.storage.get_study_id_from_name(self.study_name)
            trial = optuna.trial.Trial(study, self.storage.get_trial_id_from_study_id_trial_number(study_id, number))
            self.open_trials[number] = trial
        return trial

    def suggest(self, trial_id: str) -> Optional[dict]:
        if not self.space:
            raise RuntimeError(f"{type(self).__name__} has no search space: pass `space`, or a param space "
                               "to tune.Tuner()")
        if not self.metric or not self.mode:
            raise RuntimeError(f"{type(self).__name__} has no metric ({self.metric}) or mode ({self.mode}): pass "
                               "them to it or to tune.TuneConfig()")
        with deferred():  # an Optuna call is never cut short by Ctrl-C (see rekd.search.interrupt)
            if trial_id not in self.trial_numbers:
                trial = self.connected().ask(fixed_distributions=self.space)
                self.trial_numbers[trial_id] = trial.number
                self.open_trials[trial.number] = trial
            return nested(self.optuna_trial(trial_id).params)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.completed:
            log.warning("received a result for trial %s, which has already finished: %s", trial_id, result)
            return
        if self.metric not in result or self.multi_objective:  # Optuna keeps no intermediate values of several
            return
        with deferred():
            self.optuna_trial(trial_id).report(result[self.metric], result[TRAINING_ITERATION])

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        """As Ray's OptunaSearch: COMPLETE with the last result's value, whatever budget it had; without a
        value FAIL on error, else PRUNED (Optuna then takes the last intermediate value)."""
        if trial_id in self.completed:
            log.warning("received another completion of trial %s, which has already finished: %s", trial_id, result)
            return
        value = self.values(result)
        if value is not None:
            self.close(trial_id, TrialState.COMPLETE, value)
        else:
            self.close(trial_id, TrialState.FAIL if error else TrialState.PRUNED)

    def close(self, trial_id: str, state: TrialState, value=None, last: Optional[tuple] = None) -> None:
        """Tell Optuna the trial's end (after reporting `last` = (value, step) as its intermediate value; with
        several objectives, keeping `last` = (values, step) in its user attrs)."""
        number = self.trial_numbers[trial_id]
        with deferred():
            try:
                if last is not None and self.multi_objective:
                    trial = self.optuna_trial(trial_id)
                    trial.set_user_attr(STOPPED_VALUES_ATTR, dict(zip((m for m, _ in self.objectives), last[0])))
                    trial.set_user_attr(STOPPED_AT_ATTR, int(last[1]))
                elif last is not None:
                    self.optuna_trial(trial_id).report(*last)
                self.connected().tell(number, value, state=state)
            except Exception as exc:  # e.g. a NaN value, or a trial that reported nothing: not worth failing for
                log.warning("could not record trial %s as %s: %s", trial_id, state.name, exc)
            self.completed.add(trial_id)
            self.open_trials.pop(number, None)

    # Tune pickles the searcher twice: whole, in tuner.pkl (unpickled by Tuner.restore), and by save(), in
    # its searcher-state file (read by restore()). Both keep the study as its name and URL and the trials as
    # numbers: the live objects would reconnect to the pickled URL, where the search was started, not where
    # it is now. An in-memory study has no URL: it is kept whole.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__, open_trials={})
        if self.study_url is not None:
            state.update(study=None, storage=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)  # an earlier rekd's searcher never gets here (rekd.search.state.STATE_FORMAT)
        if self.study_url is not None:
            self.study_url = type(self).storage_url or self.study_url

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__setstate__(pickle.load(f))
        with deferred():
            self.reconnect()

    def reconnect(self) -> None:
        """The restored searcher's trials, matched to the study's: those the old driver asked and Tune never
        heard of are closed, those it closed as interrupted and Tune continues get a continuing trial."""
        study = self.connected()
        by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
        known = set(self.trial_numbers.values())
        for trial in by_number.values():
            # Trials asked after the searcher's last snapshot died with the old driver: Tune never heard of them.
            if trial.state == TrialState.RUNNING and trial.number not in known:
                study.tell(trial.number, state=TrialState.FAIL)
        for tune_id, number in list(self.trial_numbers.items()):
            frozen = by_number.get(number)
            if tune_id in self.completed or frozen is None or frozen.state != TrialState.FAIL:
                continue
            # Closed as FAIL by close_unfinished, and continued by Tune from its checkpoint.
            study.enqueue_trial(frozen.params, user_attrs={CONTINUES_ATTR: frozen.number})
            continued = study.ask(fixed_distributions=frozen.distributions)
            for step, value in sorted(frozen.intermediate_values.items()):
                continued.report(value, step)
            self.trial_numbers[tune_id] = continued.number
            self.open_trials[continued.number] = continued


class PrunedAwareOptunaSearch(ResumableOptunaSearch):
    """Tells Optuna PRUNED, not COMPLETE, for a trial stopped before `max_epochs`, and FAIL for a trial that
    stopped itself."""

    def __init__(self, *args, max_epochs: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_epochs = max_epochs

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        if error or trial_id in self.completed:
            return super().on_trial_complete(trial_id, result, error)
        # The outcome the trial's run and the summary get; a result without rekd's keys is told as Ray's
        # OptunaSearch would tell it (COMPLETE).
        rekds = result and (EPOCH in result or STOP_REASON in result)
        outcome = ended(result, self.max_epochs) if rekds else COMPLETED
        if outcome == COMPLETED:
            return super().on_trial_complete(trial_id, result, error)
        if outcome != STOPPED_EARLY:  # it stopped itself (NaN loss, out of memory): a failed configuration
            return super().on_trial_complete(trial_id, None, error=True)
        epoch = result[EPOCH]
        # Earlier epochs were reported by on_trial_result; the result ASHA stopped the trial on reaches
        # only this method, so it is reported here and becomes the pruned trial's value.
        value = self.values(result)
        last = None if value is None else (value if self.multi_objective else float(value),
                                           int(result.get(TRAINING_ITERATION, epoch)))
        self.close(trial_id, TrialState.PRUNED, last=last)


def nested(params: dict) -> dict:
    """A config from Optuna's flat params: a space converted from a nested Tune param space names its
    params by path ("a/b"), as in Ray's OptunaSearch."""
    config: dict = {}
    for name, value in params.items():
        *parents, leaf = name.split("/")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return config


def close_unfinished(storage_url: str, study_name: str) -> int:
    """Close the study's RUNNING trials as FAIL when the search stops without a driver to finish them; their
    numbers are kept in the study's user attr `rekd.interrupted_trials`. Returns how many were closed."""
    study = optuna.load_study(study_name=study_name, storage=storage_url)
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in running:
        study.tell(trial.number, state=TrialState.FAIL)
    if running:
        earlier = study.user_attrs.get(INTERRUPTED_ATTR, [])
        study.set_user_attr(INTERRUPTED_ATTR, sorted({*earlier, *(t.number for t in running)}))
    return len(running)


def make_searcher(study: Study, storage_url: str, study_name: str, stock: bool = False) -> ResumableOptunaSearch:
    """The study's sampler over its params, persisted in an Optuna RDB storage (for plots and resume)."""
    common = dict(space={p.name: distribution(p) for p in study.params}, metric=study.metric, mode=study.mode,
                  sampler=make_sampler(study), study_name=study_name, storage=storage_url,
                  objectives=list(study.objectives))
    if stock:
        return ResumableOptunaSearch(**common)
    return PrunedAwareOptunaSearch(max_epochs=study.epochs, **common)
