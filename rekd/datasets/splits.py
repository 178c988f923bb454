"""The shape every dataset takes once loaded: train / val / test tensors plus how to turn a batch into SNN input.

Small datasets are held whole as tensors (on the training device when it has room), so an epoch is a
permutation and slicing, no DataLoader workers. `to_input` turns stored samples into [T, N, C, H, W]:
static images are direct-encoded (repeated T times), event frames already carry their T axis.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # (N, C, H, W) images, or (N, T, C, H, W) event frames; any dtype
    y: torch.Tensor  # (N,) int64 class indices

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class DataSplits:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    in_channels: int
    resolution: int  # height (= width) of the network's input
    events: bool  # samples carry their own time axis
    mean: Optional[torch.Tensor] = None  # (C, 1, 1) normalisation, applied after augmentation
    std: Optional[torch.Tensor] = None
    augment: Optional[Augment] = None  # training-time augmentation of a float batch (N, C, H, W)

    def to(self, device: torch.device | str) -> "DataSplits":
        move = lambda s: Split(s.x.to(device), s.y.to(device))  # noqa: E731
        return dataclasses.replace(
            self,
            train=move(self.train), val=move(self.val), test=move(self.test),
            mean=None if self.mean is None else self.mean.to(device),
            std=None if self.std is None else self.std.to(device),
        )

    def to_input(
        self, x: torch.Tensor, timesteps: int, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """Stored samples -> float SNN input (T, N, C, H, W); augments when a generator is given."""
        x = x.float()
        if self.augment is not None and generator is not None:
            x = self.augment(x, generator)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        if self.events:
            return x.transpose(0, 1)  # (N, T, C, H, W) -> (T, N, C, H, W)
        return x.unsqueeze(0).expand(timesteps, *x.shape)  # direct encoding: (T, N, C, H, W)


def batches(
    split: Split, batch_size: int, generator: Optional[torch.Generator] = None, drop_last: bool = False,
    with_index: bool = False,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """(x, y) batches of a split, or (x, y, sample indices); shuffled when a generator is given."""
    n = len(split)
    if generator is not None:
        order = torch.randperm(n, generator=generator).to(split.y.device)
    else:
        order = torch.arange(n, device=split.y.device)
    # A last batch of one sample would break batch norm in training: drop it (and any remainder) then.
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        yield (split.x[idx], split.y[idx], idx) if with_index else (split.x[idx], split.y[idx])


def carve_validation(x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int) -> tuple[Split, Split]:
    """Split a training set into (train, val) by a seeded permutation."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(len(y) * fraction)))
    val_idx, train_idx = order[:n_val], order[n_val:]
    return Split(x[train_idx], y[train_idx]), Split(x[val_idx], y[val_idx])
