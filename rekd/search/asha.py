"""ASHA whose rungs survive a driver restart.

Ray restores a Tune experiment's trials and searcher but rebuilds the scheduler from the pickle taken
when the search began (ray issue 30838): after a resume ASHA's rungs are empty, and trials that the
uninterrupted search would stop are let through. Here every trial that comes back on restore replays
its recorded results (its result.json) through ASHA's public `on_trial_result`, so the rungs hold what
they held before the driver died and later decisions follow the same rule.
"""
from __future__ import annotations

import copy
import json
from typing import Iterator, Optional

from ray.tune.result import TRAINING_ITERATION
from ray.tune.schedulers import ASHAScheduler

from rekd.search import trial_storage


class ResumableASHA(ASHAScheduler):
    storage_path: Optional[str] = None  # set by the driver on a resume: where the experiment's folder is now

    def __init__(self, time_attr: str = TRAINING_ITERATION, **kwargs):
        super().__init__(time_attr=time_attr, **kwargs)
        self.time_attr = time_attr  # ASHA keeps its own copy privately

    def on_trial_add(self, tune_controller, trial) -> None:
        relocate(trial, self.storage_path)
        super().on_trial_add(tune_controller, trial)
        # Each recorded result goes through ASHA's public entry, as it did when the trial reported it: it
        # fills the rungs the same way. The decisions it returns were acted on then, and are ignored now.
        for result in recorded_results(trial, self.time_attr, [self.metric]):
            super().on_trial_result(tune_controller, trial, result)


def relocate(trial, storage_path: Optional[str]) -> None:
    """Point a trial at the folder the search is in now. Tune does so for the trials it restores, but the
    trials its search generator creates after a resume take the storage saved with the experiment's spec
    (ray 2.60), so a moved search would write them where it was started, or fail if that place is gone.
    This is the same update Tune's own resume makes (`Trial.set_storage`)."""
    if storage_path is None or trial.storage is None or trial.storage.storage_fs_path == storage_path:
        return
    storage = copy.copy(trial.storage)
    storage.storage_fs_path = storage_path
    trial.set_storage(storage)


def recorded_results(trial, time_attr: str, metrics: list[str]) -> Iterator[dict]:
    """{time_attr, *metrics} of every result the trial reported before with all of them, from its
    result.json (if any)."""
    try:
        folder = getattr(trial, "path", None)
    except RuntimeError:  # a new trial has no folder yet (ray raises rather than returning None)
        return
    if not folder or getattr(trial, "storage", None) is None:
        return
    # Read where Tune keeps the trial: a folder, or an object store (its driver-side copy starts empty).
    text = trial_storage.read_text(trial.storage.storage_filesystem, f"{folder}/result.json")
    for line in (text or "").splitlines():
        try:
            result = json.loads(line)
        except json.JSONDecodeError:  # a line cut short when the driver died
            continue
        if time_attr in result and all(isinstance(result.get(m), (int, float)) for m in metrics):
            yield {time_attr: int(result[time_attr]), **{m: float(result[m]) for m in metrics}}
