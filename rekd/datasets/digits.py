"""scikit-learn's bundled handwritten digits (1797 images, 8x8, 10 classes): real data that needs no download.

The test split is a fixed 20% (the same for every seed, so test scores are comparable across runs);
validation is carved from the rest by the run's seed.
"""
from __future__ import annotations

import torch

from rekd.config import TrainConfig
from rekd.datasets.splits import DataSplits, Split, carve_validation

TEST_FRACTION = 0.2
TEST_SPLIT_SEED = 20240  # fixed on purpose: the test set must not move with the run's seed


def digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as (N, 1, 8, 8) floats in [0, 1] and (N,) labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(bunch.target, dtype=torch.int64)


def fixed_test_split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_pool_indices, test_indices), identical on every machine and for every seed."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(TEST_SPLIT_SEED))
    n_test = int(round(n * TEST_FRACTION))
    return order[n_test:], order[:n_test]


def load_digits(cfg: TrainConfig) -> DataSplits:
    x, y = digits_arrays()
    pool, test = fixed_test_split(len(y))
    train, val = carve_validation(x[pool], y[pool], cfg.val_fraction, cfg.seed)
    mean = train.x.mean().reshape(1, 1, 1)
    std = train.x.std().reshape(1, 1, 1)
    return DataSplits(
        name="digits", train=train, val=val, test=Split(x[test], y[test]),
        num_classes=10, in_channels=1, resolution=8, events=False, mean=mean, std=std,
    )
