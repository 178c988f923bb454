"""DVS-Gesture (11 gestures, 128x128 event camera) from `--data-root`, read by tonic's DVSGesture.

tonic's release is preprocessed: <root>/DVSGesture/ibmGestureTrain/userNN_<lighting>/<label>.npy, one
[N, 4] array (x, y, p, t in ms) per recording, and the same under ibmGestureTest; tonic also wants the
two .tar.gz archives beside the folders. The events become T frames (T=16 by default, paper 4.1),
optionally downsampled in space, computed once and cached per (data, T, downsample).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from rekd.config import TrainConfig
from rekd.datasets.frames import cached, events_to_frames
from rekd.datasets.splits import DataSplits, Split, carve_validation
from rekd.errors import UsageError

SENSOR_SIZE = (128, 128, 2)
NUM_CLASSES = 11
MIN_FILES = 100  # tonic treats a folder with fewer .npy files as not downloaded
SPLITS = {"train": "ibmGestureTrain", "test": "ibmGestureTest"}
SOURCE = "https://figshare.com/ndownloader/files/38022171 (train), .../38020584 (test)"


def check_layout(root: Path) -> list[Path]:
    """The .npy files of both splits, or a UsageError saying what tonic expects where."""
    base = root / "DVSGesture"
    files: list[Path] = []
    for folder in SPLITS.values():
        found = sorted((base / folder).glob("user*_*/*.npy"))
        if not (base / f"{folder}.tar.gz").is_file() or len(found) < MIN_FILES:
            raise UsageError(
                f"dvsgesture: expected {base}/{folder}/userNN_<lighting>/<label>.npy (at least {MIN_FILES} files, "
                f"found {len(found)}) and {base}/{folder}.tar.gz; download tonic's preprocessed release "
                f"({SOURCE}) and extract it there, then point --data-root at {root}"
            )
        files += found
    return files


def fingerprint(files: list[Path]) -> str:
    """Names, sizes and times of the recordings: a changed dataset gets new frames, not stale ones."""
    digest = hashlib.sha1()
    for f in files:
        stat = f.stat()
        digest.update(f"{f.resolve()}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def frames_of(root: Path, split: str, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    import tonic

    dataset = tonic.datasets.DVSGesture(save_to=str(root), train=split == "train")
    labels = torch.tensor(dataset.targets, dtype=torch.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise UsageError(f"dvsgesture: labels must be 0..{NUM_CLASSES - 1} (the .npy file names); found {labels.max()}")
    frames = events_to_frames(
        (dataset[i][0] for i in range(len(dataset))), len(dataset), SENSOR_SIZE, cfg.timesteps, cfg.downsample,
        f"dvsgesture {split}",
    )
    return {"frames": frames, "labels": labels}


def load_dvsgesture(cfg: TrainConfig) -> DataSplits:
    root = Path(cfg.data_root)
    key = fingerprint(check_layout(root))
    folder = Path(cfg.cache_dir) / "dvsgesture"
    loaded = {
        split: cached(folder / f"frames-{key}-{split}-T{cfg.timesteps}-d{cfg.downsample}.pt",
                      lambda split=split: frames_of(root, split, cfg), "dvsgesture frame cache")
        for split in SPLITS
    }
    train, val = carve_validation(loaded["train"]["frames"], loaded["train"]["labels"], cfg.val_fraction, cfg.seed)
    test = Split(loaded["test"]["frames"], loaded["test"]["labels"])
    return DataSplits(
        name="dvsgesture", train=train, val=val, test=test,
        num_classes=NUM_CLASSES, in_channels=2, resolution=test.x.shape[-1], events=True,
    )
