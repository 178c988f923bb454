"""The Tune trainable: a thin adapter around rekd.train.loop.train.

It rebuilds the TrainConfig from the trial's config, reports once per epoch with a checkpoint (so that
"iteration" means "epoch" for ASHA) and resumes from Tune's checkpoint when the trial is restarted. The
dataset and the teacher's weights arrive through Ray's object store (tune.with_parameters), so a trial
neither reads them from disk nor trains a teacher.

A trial whose loss turns NaN or infinite, or that runs out of GPU memory, ends there with
`stop_reason` in its last result; the search goes on (retrying would only repeat the failure).
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch
from ray import tune

from rekd.search import trial_storage
from rekd.train.checkpoint import FILENAME, load_checkpoint
from rekd.config import TrainConfig
from rekd.datasets import DataSplits
from rekd.errors import UsageError
from rekd.tracking import outcomes
from rekd.tracking.outcomes import STOP_DETAIL, STOP_REASON
from rekd.train.loop import NonFiniteLoss, select_device, train

RESTORED_FROM = "restored_from"  # the checkpoint a continued trial started from, in its results


def placement(device_setting: str) -> dict:
    """Where this trial runs: its Ray node, its torch device and the GPUs Ray gave it (the tracker tags the
    trial's run with them, so a search that meant GPUs and ran on CPUs shows it)."""
    import ray

    context = ray.get_runtime_context()
    device = select_device(device_setting)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    gpu_ids = context.get_accelerator_ids().get("GPU", [])
    return {"node_id": context.get_node_id(), "device": str(device), "gpu_ids": ",".join(map(str, gpu_ids)) or "none"}


def storage_uri(checkpoint: tune.Checkpoint) -> str:
    """The checkpoint's folder as a user names it: a path, or a URI for an object store (s3://bucket/...)."""
    scheme = checkpoint.filesystem.type_name if checkpoint.filesystem is not None else "local"
    return checkpoint.path if scheme == "local" else f"{scheme}://{checkpoint.path}"


def restore_checkpoint(checkpoint: tune.Checkpoint, run_dir: Path) -> str:
    """Copy the checkpoint a restored trial continues from into run_dir; returns where it came from.

    Normally the one Tune names. If that folder is gone (a driver killed between Tune deleting a superseded
    checkpoint and snapshotting its successor: rekd.search.trial_storage.checkpoint_candidates), the
    trial's newest readable later checkpoint, and it says so. None at all: the trial fails, as before.
    """
    candidates = trial_storage.checkpoint_candidates(checkpoint.path, checkpoint.filesystem, FILENAME)
    if not candidates:
        raise FileNotFoundError(f"{storage_uri(checkpoint)}/{FILENAME}: the trial's checkpoint is gone and no "
                                "later one of the trial is in its folder")
    for path in candidates:
        candidate = tune.Checkpoint(path, filesystem=checkpoint.filesystem)
        with candidate.as_directory() as restored:
            shutil.copy(Path(restored) / FILENAME, run_dir / FILENAME)
        where = f"{storage_uri(candidate)}/{FILENAME}"
        if path == checkpoint.path:
            return where
        try:  # a later checkpoint may be a half-written upload of the killed run
            load_checkpoint(run_dir / FILENAME)
        except UsageError:
            continue
        print(f"rekd: {storage_uri(checkpoint)} is gone (Tune removed it before its saved state named the next "
              f"checkpoint); the trial continues from {where}", file=sys.stderr, flush=True)
        return where
    raise FileNotFoundError(f"{storage_uri(checkpoint)}/{FILENAME}: the trial's checkpoint is gone and no later "
                            "one of the trial is readable")


def unusable_gpu(gpu_ids: str, device_setting: str) -> str:
    """Why the GPU Ray gave this trial cannot be used by torch ("" when it can, or none was given, or the
    trial was told to use the CPU): a node whose driver is missing or too old for torch's CUDA."""
    if gpu_ids == "none" or device_setting != "auto" or torch.cuda.is_available():
        return ""
    return (f"Ray gave this trial GPU {gpu_ids} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}) "
            f"but torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use it; check the node's NVIDIA "
            f"driver, or set resources.cpu_fallback: true in the study to train such trials on CPUs")


def run_trial(config: dict, data: Optional[DataSplits] = None, teacher_weights: Optional[dict] = None,
              cpu_fallback: bool = False) -> None:
    # One line per epoch per trial saying a checkpoint was written drowns the driver's table.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    cfg = TrainConfig.from_dict(config, source="trial config")
    # The working copy of the checkpoint lives in the trial's working folder (Tune makes it the current
    # folder, inside Ray's session folder): a trial stopped by an interruption, which never reaches the
    # `finally` below, leaves it there for Ray to clean up, not in the system's temp folder.
    run_dir = Path(tempfile.mkdtemp(prefix="rekd-trial-", dir=os.getcwd()))
    try:
        checkpoint = tune.get_checkpoint()
        restored_from = restore_checkpoint(checkpoint, run_dir) if checkpoint is not None else ""

        last: dict = {}
        where = placement(cfg.device)
        unusable = unusable_gpu(where["gpu_ids"], cfg.device)
        if unusable and not cpu_fallback:  # a GPU search that trains on CPUs would mislead: said, not hidden
            tune.report({"epoch": 0, STOP_REASON: outcomes.CUDA_UNUSABLE, STOP_DETAIL: unusable[:500], **where})
            return
        if restored_from:
            where[RESTORED_FROM] = restored_from

        def report(metrics: dict) -> None:
            metrics = {**metrics, **where}
            if metrics.get("diverged"):  # train() raises NonFiniteLoss right after this report
                metrics = {**metrics, STOP_REASON: outcomes.NON_FINITE_LOSS,
                           STOP_DETAIL: f"training diverged in epoch {metrics['epoch']}: non-finite loss or weights"}
            last.clear()
            last.update(metrics)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(run_dir)))

        try:
            train(cfg, data=data, teacher_weights=teacher_weights, on_epoch=report, run_dir=run_dir)
        except UsageError as e:  # e.g. a corrupt checkpoint: the message names the stored file, not its copy
            if not restored_from:
                raise
            raise UsageError(str(e).replace(str(run_dir / FILENAME), restored_from)) from None
        except NonFiniteLoss:
            return  # reported with its reason above; the trial ends, the search goes on
        except torch.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            detail = str(e).strip().splitlines()[0] if str(e).strip() else "CUDA out of memory"
            # No metric in this result (the driver turns Tune's strict metric check off): ASHA and the
            # searcher pass over it, the tracker tags the reason.
            tune.report({"epoch": last.get("epoch", 0), STOP_REASON: outcomes.CUDA_OOM, STOP_DETAIL: detail[:300], **where})
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)

