"""CIFAR-100 from `--data-root`, in the release's own layout: <root>/cifar-100-python/{train,test,meta}.

The release files are Python pickles. Instead of torchvision's plain pickle.load, they are read with an
unpickler that admits only the numpy array constructors the format needs, so a tampered file cannot
run code. Download (only with `download=true`) goes through torchvision's checked downloader.
Training batches get a random 32x32 crop of the zero-padded (4 px) image and a horizontal flip, done
on the whole batch on the training device, then per-channel normalisation by the training split's
statistics.
"""
from __future__ import annotations

import hashlib
import pickle
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rekd.config import TrainConfig
from rekd.datasets.splits import DataSplits, Split, carve_validation
from rekd.errors import UsageError

FOLDER = "cifar-100-python"
URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
RELEASE_MD5 = {  # the official release, as torchvision lists it
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}
PAD = 4


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays; any other global is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
        ("numpy.core.numeric", "_frombuffer"): np._core.numeric._frombuffer,
        ("numpy._core.numeric", "_frombuffer"): np._core.numeric._frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): __import__("_codecs").encode,
    }

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None


def read_release_file(path: Path) -> dict:
    with open(path, "rb") as f:
        try:
            content = ArrayUnpickler(f, encoding="latin1").load()
        except Exception as e:  # any failure here means a file not in the release format
            raise UsageError(f"cifar100: {path} is not a CIFAR-100 python-format file ({e})") from None
    if not isinstance(content, dict):
        raise UsageError(f"cifar100: {path} is not a CIFAR-100 python-format file (no dict inside)")
    if hashlib.md5(path.read_bytes()).hexdigest() != RELEASE_MD5[path.name]:
        print(f"cifar100: {path} differs from the official release (md5); using it as it is", file=sys.stderr)
    return content


def images_and_labels(path: Path, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    content = read_release_file(path)
    data, labels = content.get("data"), content.get("fine_labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UsageError(f"cifar100: {path} must hold 'data' as uint8 [N, 3072]")
    if labels is None or len(labels) != len(data) or not all(0 <= int(c) < num_classes for c in labels):
        raise UsageError(f"cifar100: {path} must hold one 'fine_labels' entry in 0..{num_classes - 1} per image")
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())  # (N, 3, 32, 32) uint8
    return x, torch.tensor(labels, dtype=torch.int64)


def ensure_present(root: Path, download: bool) -> Path:
    folder = root / FOLDER
    missing = [name for name in RELEASE_MD5 if not (folder / name).is_file()]
    if missing and download:
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(URL, str(root), md5=ARCHIVE_MD5)
        except Exception as e:  # network failures come in many types; all mean the same to the user
            raise UsageError(f"cifar100: download from {URL} failed ({type(e).__name__}: {e})") from None
        missing = [name for name in RELEASE_MD5 if not (folder / name).is_file()]
    if missing:
        raise UsageError(
            f"cifar100: expected {folder}/{{train,test,meta}} (missing: {', '.join(missing)}); "
            f"extract {URL} into {root}, point --data-root at the folder holding {FOLDER}/, "
            "or pass --set download=true"
        )
    return folder


def random_crop_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random crop of the zero-padded batch and random horizontal flip; x: (N, C, H, W)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (PAD, PAD, PAD, PAD))
    # Drawn on the CPU generator (its state is what a checkpoint keeps); copied without waiting on the GPU's
    # queue: CUDA stages a pageable host-to-device copy at once, so non_blocking never reads a freed buffer.
    shifts = torch.randint(0, 2 * PAD + 1, (2, n), generator=generator).to(x.device, non_blocking=True)
    flips = (torch.rand(n, generator=generator) < 0.5).to(x.device, non_blocking=True)
    j = torch.arange(w, device=x.device).expand(n, w)
    j = torch.where(flips[:, None], w - 1 - j, j)  # a flip reads the crop's columns right to left
    rows = (shifts[0, :, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (N, 1, H, 1)
    cols = (shifts[1, :, None] + j)[:, None, None, :]  # (N, 1, 1, W)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def load_cifar100(cfg: TrainConfig) -> DataSplits:
    folder = ensure_present(Path(cfg.data_root), cfg.download)
    meta = read_release_file(folder / "meta")
    names = meta.get("fine_label_names")
    if not isinstance(names, list) or len(names) < 2:
        raise UsageError(f"cifar100: {folder / 'meta'} must hold the list 'fine_label_names'")
    num_classes = len(names)
    x, y = images_and_labels(folder / "train", num_classes)
    test = Split(*images_and_labels(folder / "test", num_classes))
    train, val = carve_validation(x, y, cfg.val_fraction, cfg.seed)
    pixels = train.x.float()
    return DataSplits(
        name="cifar100", train=train, val=val, test=test,
        num_classes=num_classes, in_channels=3, resolution=32, events=False,
        mean=pixels.mean(dim=(0, 2, 3)).reshape(3, 1, 1), std=pixels.std(dim=(0, 2, 3)).reshape(3, 1, 1),
        augment=random_crop_flip,
    )
