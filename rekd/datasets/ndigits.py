"""N-Digits: an event-camera version of scikit-learn's digits, made the way N-MNIST was made from MNIST.

Each digit (upsampled 2x to 16x16) sits on a dark 22x22 sensor that moves through three saccades along a
triangle, 100 ms each. A DVS pixel model turns the moving image into events: every pixel compares its
log intensity with a reference level and emits one ON (OFF) event per contrast threshold crossed upward
(downward), then moves its reference by that many thresholds. Thresholds vary a little between pixels
and a sparse background activity is added, both from a fixed seed, so the data are deterministic.

The events are stored once as plain arrays (no pickles) in the cache folder and served as tonic
structured event arrays; frames are made by tonic's ToFrame and cached per (T, downsample).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tonic.io import make_structured_array

from rekd.config import TrainConfig
from rekd.datasets.digits import digits_arrays, fixed_test_split
from rekd.datasets.frames import cached, events_to_frames
from rekd.datasets.splits import DataSplits, Split, carve_validation

VERSION = 1  # bump when the simulation changes: it names the cache files
SENSOR = 22  # pixels per side
SENSOR_SIZE = (SENSOR, SENSOR, 2)  # tonic order (W, H, P)
UPSAMPLE = 2
STEP_US = 2_000  # simulation step: 2 ms
SACCADE_STEPS = 50  # 100 ms per saccade
TRIANGLE = ((-2.0, -1.0), (2.0, -1.0), (0.0, 2.0))  # saccade vertices (dx, dy) in pixels
CONTRAST_THRESHOLD = 0.25  # log-intensity change per event
THRESHOLD_MISMATCH = 0.05  # relative spread of per-pixel thresholds
LOG_EPS = 0.1  # dark level inside the log, so black pixels have finite log intensity
NOISE_PER_PIXEL_STEP = 2e-4  # background activity probability
SIM_SEED = 7


def saccade_path() -> np.ndarray:
    """(steps + 1, 2) sensor offsets along the triangle: three straight saccades, back to the start."""
    points = [np.array(TRIANGLE[i]) for i in (0, 1, 2, 0)]
    legs = [a + (b - a) * (k / SACCADE_STEPS) for a, b in zip(points, points[1:]) for k in range(SACCADE_STEPS)]
    return np.stack(legs + [points[-1]])


def render(images: torch.Tensor, offset: np.ndarray) -> torch.Tensor:
    """Images (N, 1, 16, 16) centred on the sensor, shifted by a sub-pixel offset: (N, SENSOR, SENSOR)."""
    pad = (SENSOR - images.shape[-1]) // 2
    canvas = F.pad(images, (pad, pad, pad, pad))
    dx, dy = (2.0 * float(o) / SENSOR for o in offset)  # grid_sample's [-1, 1] coordinates
    theta = torch.tensor([[1.0, 0.0, -dx], [0.0, 1.0, -dy]]).expand(len(images), 2, 3)
    grid = F.affine_grid(theta, list(canvas.shape), align_corners=False)
    return F.grid_sample(canvas, grid, align_corners=False, padding_mode="zeros")[:, 0]


def simulate(images: torch.Tensor) -> dict[str, np.ndarray]:
    """All samples' events as flat arrays x, y, t (us), p plus `offsets` into them (N + 1)."""
    rng = np.random.default_rng(SIM_SEED)
    n = len(images)
    big = F.interpolate(images, scale_factor=UPSAMPLE, mode="bilinear", align_corners=False).clamp(0, 1)
    threshold = CONTRAST_THRESHOLD * (1 + THRESHOLD_MISMATCH * rng.standard_normal((n, SENSOR, SENSOR)))
    threshold = np.maximum(threshold, 0.05)
    path = saccade_path()
    reference = np.log(LOG_EPS + render(big, path[0]).numpy())
    chunks: list[tuple[np.ndarray, ...]] = []
    for step, offset in enumerate(path[1:], start=1):
        level = np.log(LOG_EPS + render(big, offset).numpy())
        crossings = np.trunc((level - reference) / threshold).astype(np.int64)  # signed event counts
        reference += crossings * threshold
        noise = rng.random((n, SENSOR, SENSOR)) < NOISE_PER_PIXEL_STEP
        for polarity, counts in ((1, np.maximum(crossings, 0) + noise), (0, np.maximum(-crossings, 0))):
            sample, y, x = np.nonzero(counts)
            k = counts[sample, y, x]
            # k events at a pixel within one step are spread evenly over the step.
            rank = np.arange(k.sum()) - np.repeat(np.cumsum(k) - k, k)
            t = (step - 1) * STEP_US + ((rank + 1) * STEP_US) // (np.repeat(k, k) + 1)
            chunks.append((np.repeat(sample, k), np.repeat(x, k), np.repeat(y, k), t,
                           np.full(k.sum(), polarity, dtype=bool)))
    sample, x, y, t, p = (np.concatenate(parts) for parts in zip(*chunks))
    order = np.lexsort((t, sample))
    counts = np.bincount(sample, minlength=n)
    return {
        "x": x[order].astype(np.int16), "y": y[order].astype(np.int16),
        "t": t[order].astype(np.int64), "p": p[order],
        "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
    }


def event_store(cache_dir: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The simulated events of every digit (generated on first use) and the labels."""
    images, labels = digits_arrays()
    path = Path(cache_dir) / "ndigits" / f"events-v{VERSION}.npz"
    if not path.is_file():
        print(f"ndigits: simulating saccades over {len(labels)} digits (once) -> {path}", file=sys.stderr)
        events = simulate(images)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, **events)
        tmp.replace(path)
    with np.load(path, allow_pickle=False) as f:
        events = {key: f[key] for key in f.files}
    return events, labels.numpy()


def sample_events(events: dict[str, np.ndarray], i: int) -> np.ndarray:
    """Sample i as a tonic structured array (x, y, t, p)."""
    lo, hi = events["offsets"][i], events["offsets"][i + 1]
    return make_structured_array(events["x"][lo:hi], events["y"][lo:hi], events["t"][lo:hi], events["p"][lo:hi])


def load_ndigits(cfg: TrainConfig) -> DataSplits:
    cache = Path(cfg.cache_dir) / "ndigits" / f"frames-v{VERSION}-T{cfg.timesteps}-d{cfg.downsample}.pt"

    def build() -> dict[str, torch.Tensor]:
        events, labels = event_store(cfg.cache_dir)
        n = len(labels)
        frames = events_to_frames(
            (sample_events(events, i) for i in range(n)), n, SENSOR_SIZE, cfg.timesteps, cfg.downsample,
            "ndigits",
        )
        return {"frames": frames, "labels": torch.from_numpy(labels)}

    data = cached(cache, build, "ndigits frame cache")
    x, y = data["frames"], data["labels"]
    pool, test = fixed_test_split(len(y))
    train, val = carve_validation(x[pool], y[pool], cfg.val_fraction, cfg.seed)
    return DataSplits(
        name="ndigits", train=train, val=val, test=Split(x[test], y[test]),
        num_classes=10, in_channels=2, resolution=x.shape[-1], events=True,
    )
