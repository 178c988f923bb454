"""MO-ASHA (rekd.search.moasha) decides on hand-made rungs as worked out here: at each rung a trial goes on
only if fewer than n/eta of the n results there rank strictly ahead of it by Pareto front and crowding
distance; after a driver restart its rungs are rebuilt from the trials' recorded results."""
import json
import random
from types import SimpleNamespace

import pyarrow.fs
import pytest
from ray.tune.schedulers import TrialScheduler

from rekd.search.moasha import MultiObjectiveASHA

GO, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP
OBJECTIVES = [("val_acc", "max"), ("energy_uj", "min")]
LOCAL = SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem())


def moasha(**kwargs):
    return MultiObjectiveASHA(OBJECTIVES, **{"max_t": 8, "grace_period": 1, "reduction_factor": 2, **kwargs})


def decide(scheduler, trials, name, epoch, acc, energy):
    if name not in trials:
        trials[name] = SimpleNamespace(trial_id=name, path="")
        scheduler.on_trial_add(None, trials[name])
    return scheduler.on_trial_result(None, trials[name], {"training_iteration": epoch, "val_acc": acc,
                                                          "energy_uj": energy})


def test_the_rungs_are_ashas_milestones_below_max_t():
    assert moasha().milestones == [1, 2, 4]
    assert moasha(grace_period=2, reduction_factor=3, max_t=20).milestones == [2, 6, 18]
    assert moasha(grace_period=8).milestones == []  # every trial runs the full budget


def test_at_a_rung_only_the_top_half_by_front_and_crowding_goes_on():
    s, trials = moasha(), {}
    assert decide(s, trials, "a", 1, 0.90, 3.0) == GO  # alone at the rung
    assert decide(s, trials, "b", 1, 0.80, 4.0) == STOP  # dominated by a: 1 of 2 ahead, not < 2/2
    assert decide(s, trials, "c", 1, 0.70, 1.0) == GO  # on the front with a, an extreme: none ahead
    # d is on the front too, but inside it: a and c (the extremes, infinite crowding) rank ahead, 2 of 4
    assert decide(s, trials, "d", 1, 0.85, 2.0) == STOP
    # e is a new extreme (most accurate): none strictly ahead of it
    assert decide(s, trials, "e", 1, 0.95, 5.0) == GO
    assert s.rungs[1] == {"a": (-0.90, 3.0), "b": (-0.80, 4.0), "c": (-0.70, 1.0), "d": (-0.85, 2.0),
                          "e": (-0.95, 5.0)}


def test_a_trial_is_decided_once_per_rung_at_the_highest_rung_it_reached():
    s, trials = moasha(), {}
    decide(s, trials, "a", 1, 0.90, 3.0)
    decide(s, trials, "b", 1, 0.80, 4.0)
    assert decide(s, trials, "a", 2, 0.91, 3.0) == GO  # first at rung 2
    assert decide(s, trials, "a", 3, 0.10, 9.0) == GO  # between rungs: no decision
    assert decide(s, trials, "b", 2, 0.50, 9.0) == STOP  # dominated by a at rung 2
    assert decide(s, trials, "c", 4, 0.99, 0.1) == GO  # first seen at epoch 4: recorded at rung 4 only
    assert "c" in s.rungs[4] and "c" not in s.rungs[2] and "c" not in s.rungs[1]
    assert decide(s, trials, "a", 8, 0.95, 3.0) == STOP  # max_t: the trial is done


def test_a_copy_of_a_promoted_result_is_promoted_too():
    s, trials = moasha(reduction_factor=3), {}
    assert decide(s, trials, "a", 1, 0.9, 1.0) == GO
    assert decide(s, trials, "b", 1, 0.9, 1.0) == GO  # equal to a: neither is ahead
    assert decide(s, trials, "c", 1, 0.5, 2.0) == STOP


def test_a_result_without_every_objective_is_ignored():
    s, trials = moasha(), {}
    trial = trials.setdefault("x", SimpleNamespace(trial_id="x", path=""))
    s.on_trial_add(None, trial)
    assert s.on_trial_result(None, trial, {"training_iteration": 1, "val_acc": 0.9}) == GO
    assert s.on_trial_result(None, trial, {"training_iteration": 1, "stop_reason": "cuda_oom"}) == GO
    assert all(not r for r in s.rungs.values())


@pytest.mark.parametrize("eta", [2, 3, 4])
def test_with_one_objective_it_keeps_the_top_1_over_eta_by_value(eta):
    rng = random.Random(eta)
    s = MultiObjectiveASHA([("val_acc", "max")], max_t=100, grace_period=1, reduction_factor=eta)
    seen = []
    for i in range(40):
        value = rng.choice([0.1, 0.2, 0.3, 0.4, 0.5])  # ties on purpose
        seen.append(value)
        trial = SimpleNamespace(trial_id=f"t{i}", path="")
        s.on_trial_add(None, trial)
        decision = s.on_trial_result(None, trial, {"training_iteration": 1, "val_acc": value})
        better = sum(v > value for v in seen)
        assert decision == (GO if better < len(seen) / eta else STOP)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="mode"):
        MultiObjectiveASHA([("val_acc", "best")], max_t=4)
    with pytest.raises(ValueError, match="grace_period"):
        MultiObjectiveASHA(OBJECTIVES, max_t=4, grace_period=5)


# (trial, epoch, val_acc, energy_uj) in the order an uninterrupted search saw them
HISTORY = [("a", 1, 0.50, 3.0), ("b", 1, 0.70, 2.0), ("a", 2, 0.60, 3.0), ("c", 1, 0.40, 1.0),
           ("b", 2, 0.80, 2.0), ("d", 1, 0.65, 2.5), ("b", 3, 0.85, 2.0), ("b", 4, 0.90, 1.9), ("d", 2, 0.75, 2.4)]
LATER = [("e", 1, 0.55, 2.2), ("e", 2, 0.62, 2.2), ("d", 3, 0.70, 2.4), ("d", 4, 0.71, 2.4), ("f", 1, 0.3, 3.5)]


def test_a_restored_moasha_rebuilds_its_rungs_and_decides_as_before(tmp_path):
    straight, trials = moasha(), {}
    for step in HISTORY:
        decide(straight, trials, *step)
    # The driver dies here; each trial left its results in <trial dir>/result.json, as Tune writes them.
    restored, restored_trials = moasha(), {}
    for name in sorted({n for n, *_ in HISTORY}):
        folder = tmp_path / name
        folder.mkdir()
        lines = [json.dumps({"training_iteration": e, "val_acc": v, "energy_uj": w}) for n, e, v, w in HISTORY
                 if n == name]
        (folder / "result.json").write_text("\n".join(lines) + "\n" + '{"training_iteration": 9, "val_')  # cut short
        restored_trials[name] = SimpleNamespace(trial_id=name, path=str(folder), storage=LOCAL)
        restored.on_trial_add(None, restored_trials[name])
    assert restored.rungs == straight.rungs and any(restored.rungs.values())
    decisions = [decide(restored, restored_trials, *step) for step in LATER]
    assert decisions == [decide(straight, trials, *step) for step in LATER]
    assert STOP in decisions and GO in decisions
    fresh = moasha()  # what Ray restores by itself: the scheduler pickled when the search began, rungs empty
    assert decide(fresh, {}, "f", 1, 0.3, 3.5) == GO
