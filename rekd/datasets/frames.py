"""Events -> T frames with tonic's transforms, computed once and cached on disk.

Turning events into frames costs far more than a training step on small networks, so each dataset's
frames are built once per (source, T, downsample) and read back as one int16 tensor (N, T, P, H, W).
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import tonic.transforms as transforms

from rekd.storage import load_tensors, save_atomic

SensorSize = tuple[int, int, int]  # tonic's order: (W, H, P)


def frame_transform(sensor_size: SensorSize, timesteps: int, downsample: int) -> tuple[Callable, SensorSize]:
    """tonic transform events -> (T, P, H, W) frames, and the sensor size after downsampling."""
    width, height, polarities = sensor_size
    if downsample == 1:
        return transforms.ToFrame(sensor_size=sensor_size, n_time_bins=timesteps), sensor_size
    small = (math.ceil(width / downsample), math.ceil(height / downsample), polarities)
    return transforms.Compose([
        transforms.Downsample(spatial_factor=1.0 / downsample),
        transforms.ToFrame(sensor_size=small, n_time_bins=timesteps),
    ]), small


def events_to_frames(
    samples: Iterable[np.ndarray], count: int, sensor_size: SensorSize, timesteps: int, downsample: int,
    label: str,
) -> torch.Tensor:
    """Frames of every sample as an int16 tensor (N, T, P, H, W); reports progress every few seconds."""
    to_frames, (width, height, polarities) = frame_transform(sensor_size, timesteps, downsample)
    out = torch.zeros((count, timesteps, polarities, height, width), dtype=torch.int16)
    last_report = time.monotonic()
    for i, events in enumerate(samples):
        frames = to_frames(events)  # (T, P, H, W)
        out[i] = torch.from_numpy(np.minimum(frames, np.iinfo(np.int16).max).astype(np.int16))
        if time.monotonic() - last_report > 5:
            print(f"{label}: framed {i + 1}/{count} samples", file=sys.stderr, flush=True)
            last_report = time.monotonic()
    return out


def cached(path: Path, build: Callable[[], dict[str, torch.Tensor]], what: str) -> dict[str, torch.Tensor]:
    """Tensors from `path`, or built by `build()` and written there first (atomically)."""
    if path.is_file():
        return load_tensors(path, what)
    tensors = build()
    save_atomic(tensors, path)
    return tensors
