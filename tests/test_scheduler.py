"""After a driver restart ASHA's rungs are rebuilt from the trials' recorded results, so its decisions
follow the same rule as in an uninterrupted search (ray issue 30838 leaves them empty)."""
import json
from types import SimpleNamespace

import pyarrow.fs
from ray.tune.schedulers import TrialScheduler

from rekd.search.asha import ResumableASHA

# (trial, epoch, val_acc) in the order an uninterrupted search saw them
HISTORY = [("a", 1, 0.50), ("b", 1, 0.70), ("a", 2, 0.60), ("c", 1, 0.40), ("b", 2, 0.80), ("d", 1, 0.65),
           ("b", 3, 0.85), ("b", 4, 0.90), ("d", 2, 0.75)]
LOCAL = SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem())  # where Tune keeps a trial: a folder here
LATER = [("e", 1, 0.55), ("e", 2, 0.62), ("d", 3, 0.70)]


def asha():
    return ResumableASHA(time_attr="training_iteration", metric="val_acc", mode="max", max_t=8,
                         grace_period=1, reduction_factor=2)


def decide(scheduler, trials, name, epoch, value):
    if name not in trials:
        trials[name] = SimpleNamespace(trial_id=name, path="")
        scheduler.on_trial_add(None, trials[name])
    return scheduler.on_trial_result(None, trials[name], {"training_iteration": epoch, "val_acc": value})


def test_a_restored_scheduler_rebuilds_its_rungs_and_decides_as_before(tmp_path):
    straight, trials = asha(), {}
    for step in HISTORY:
        decide(straight, trials, *step)
    # The driver dies here. Each trial left its results in <trial dir>/result.json, as Tune writes them.
    restored, restored_trials = asha(), {}
    for name in sorted({n for n, _, _ in HISTORY}):
        folder = tmp_path / name
        folder.mkdir()
        lines = [json.dumps({"training_iteration": e, "val_acc": v}) for n, e, v in HISTORY if n == name]
        (folder / "result.json").write_text("\n".join(lines) + "\n")
        restored_trials[name] = SimpleNamespace(trial_id=name, path=str(folder), storage=LOCAL)
        restored.on_trial_add(None, restored_trials[name])
    assert [dict(r) for _, r in restored._brackets[0]._rungs] == [dict(r) for _, r in straight._brackets[0]._rungs]
    assert any(r for _, r in restored._brackets[0]._rungs)
    for step in LATER:
        assert decide(restored, restored_trials, *step) == decide(straight, trials, *step)


def test_without_the_replay_the_rungs_are_empty_and_a_weak_trial_survives(tmp_path):
    straight, trials = asha(), {}
    for step in HISTORY:
        decide(straight, trials, *step)
    fresh = asha()  # what ray restores: the scheduler as it was pickled at the start
    assert decide(straight, trials, "w", 1, 0.30) == TrialScheduler.STOP
    assert decide(fresh, {}, "w", 1, 0.30) == TrialScheduler.CONTINUE
