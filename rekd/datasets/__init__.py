"""The dataset registry: name -> how to load it and its default number of timesteps. Each dataset has its
file (digits, ndigits, cifar100, dvsgesture); splits and batches (splits), event frames and their cache
(frames), and small files in the real on-disk formats for the tests and benchmarks (synthetic)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from rekd.config import TrainConfig
from rekd.datasets.cifar100 import load_cifar100
from rekd.datasets.digits import load_digits
from rekd.datasets.dvsgesture import load_dvsgesture
from rekd.datasets.ndigits import load_ndigits
from rekd.datasets.splits import DataSplits, Split, batches
from rekd.registry import lookup


@dataclass(frozen=True)
class DatasetSpec:
    load: Callable[[TrainConfig], DataSplits]  # takes a resolved config (timesteps set)
    default_timesteps: int  # paper 4.1: T=4 for static images, T=16 for DVS-Gesture
    num_classes: int  # known before loading, so configs can be checked before any data is read


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(load_digits, default_timesteps=4, num_classes=10),
    "ndigits": DatasetSpec(load_ndigits, default_timesteps=8, num_classes=10),
    "cifar100": DatasetSpec(load_cifar100, default_timesteps=4, num_classes=100),
    "dvsgesture": DatasetSpec(load_dvsgesture, default_timesteps=16, num_classes=11),
}


def dataset_spec(name: str) -> DatasetSpec:
    return lookup(DATASETS, name, "dataset")


def load_dataset(cfg: TrainConfig) -> DataSplits:
    """The splits of `cfg.dataset` for a resolved config."""
    return dataset_spec(cfg.dataset).load(cfg)


__all__ = ["DATASETS", "DataSplits", "DatasetSpec", "Split", "batches", "dataset_spec", "load_dataset"]
