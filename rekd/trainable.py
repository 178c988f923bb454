"""The Tune trainable: a thin adapter around rekd.train.train.

It rebuilds the TrainConfig from the trial's config, reports once per epoch with a checkpoint (so that
"iteration" means "epoch" for ASHA) and resumes from Tune's checkpoint when the trial is restarted. The
dataset and the teacher's weights arrive through Ray's object store (tune.with_parameters), so a trial
neither reads them from disk nor trains a teacher.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from ray import tune

from rekd.checkpoint import FILENAME
from rekd.config import TrainConfig
from rekd.datasets import DataSplits
from rekd.train import train


def run_trial(config: dict, data: Optional[DataSplits] = None, teacher_weights: Optional[dict] = None) -> None:
    # One line per epoch per trial saying a checkpoint was written drowns the driver's table.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    cfg = TrainConfig.from_dict(config, source="trial config")
    run_dir = Path(tempfile.mkdtemp(prefix="rekd-trial-"))
    try:
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as restored:
                shutil.copy(Path(restored) / FILENAME, run_dir / FILENAME)

        def report(metrics: dict) -> None:
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(run_dir)))

        train(cfg, data=data, teacher_weights=teacher_weights, on_epoch=report, run_dir=run_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
