"""Datasets: splits, the event simulation, and the real on-disk layouts of CIFAR-100 and DVS-Gesture."""
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
import tonic

from rekd.config import TrainConfig
from rekd.datasets import DATASETS, batches, load_dataset
from rekd.datasets.cifar100 import random_crop_flip
from rekd.datasets.ndigits import SENSOR_SIZE, event_store, sample_events, simulate
from rekd.datasets.digits import digits_arrays
from rekd.errors import UsageError


def load(**settings):
    return load_dataset(TrainConfig(**settings).resolved(DATASETS[settings.get("dataset", "digits")].default_timesteps))


def test_digits_splits_are_disjoint_seeded_and_the_test_split_is_fixed(cache_dir):
    a, b = load(seed=0), load(seed=1)
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert a.num_classes == 10 and a.train.x.shape[1:] == (1, 8, 8)
    torch.testing.assert_close(a.test.x, b.test.x)
    assert not torch.equal(a.val.x, b.val.x)
    train_rows = {tuple(r) for r in a.train.x.flatten(1).tolist()}
    val_rows = {tuple(r) for r in a.val.x.flatten(1).tolist()}
    assert len(val_rows - train_rows) >= len(val_rows) - 5  # digits has a few duplicate images, no more overlap


def test_static_images_are_repeated_over_time_and_events_keep_their_own_time_axis(cache_dir):
    digits = load()
    x = digits.to_input(digits.train.x[:3], 4)
    assert x.shape == (4, 3, 1, 8, 8) and torch.equal(x[0], x[3])
    events = load(dataset="ndigits", timesteps=4, cache_dir=cache_dir)
    y = events.to_input(events.train.x[:3], 4)
    assert y.shape == (4, 3, 2, 22, 22) and torch.equal(y[1], events.train.x[:3, 1].float())


def test_batches_cover_a_split_once_and_drop_only_the_ragged_tail_in_training():
    digits = load()
    seen = torch.cat([y for _, y in batches(digits.val, 32)])
    assert len(seen) == len(digits.val)
    shuffled = list(batches(digits.train, 32, torch.Generator().manual_seed(0), drop_last=True))
    assert all(len(y) == 32 for _, y in shuffled) and len(shuffled) == len(digits.train) // 32


def test_ndigits_events_are_deterministic_tonic_arrays_inside_the_sensor():
    images, _ = digits_arrays()
    first, second = simulate(images[:20]), simulate(images[:20])
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    events = sample_events(first, 3)
    assert events.dtype.names == ("x", "y", "t", "p")
    assert len(events) > 100
    assert events["x"].max() < SENSOR_SIZE[0] and events["y"].max() < SENSOR_SIZE[1] and events["x"].min() >= 0
    assert np.all(np.diff(events["t"]) >= 0) and 0 < events["p"].mean() < 1


def test_ndigits_frames_are_tonic_toframe_and_cached(cache_dir):
    data = load(dataset="ndigits", timesteps=4, cache_dir=cache_dir)
    events, labels = event_store(cache_dir)
    frames = tonic.transforms.ToFrame(sensor_size=SENSOR_SIZE, n_time_bins=4)(sample_events(events, 0))
    cached = [f for f in os.listdir(os.path.join(cache_dir, "ndigits")) if f.startswith("frames") and "T4-d1" in f]
    assert cached and data.train.x.dtype == torch.int16
    all_frames = torch.load(os.path.join(cache_dir, "ndigits", cached[0]), weights_only=True)["frames"]
    np.testing.assert_array_equal(all_frames[0].numpy(), frames)
    small = load(dataset="ndigits", timesteps=4, downsample=2, cache_dir=cache_dir)
    assert small.resolution == 11


def test_cifar100_loads_the_release_format_with_augmentation(cache_dir, cifar_root):
    data = load(dataset="cifar100", data_root=str(cifar_root), cache_dir=cache_dir)
    assert data.num_classes == 100 and data.train.x.dtype == torch.uint8
    assert data.train.x.shape[1:] == (3, 32, 32) and len(data.test) == 100
    assert len(data.train) + len(data.val) == 300
    x = data.train.x[:8].float()
    out = random_crop_flip(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and not torch.equal(out, x)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    found = [any(torch.equal(o, padded[i, :, r:r + 32, c:c + 32]) or torch.equal(o, padded[i, :, r:r + 32, c:c + 32].flip(-1))
                 for r in range(9) for c in range(9)) for i, o in enumerate(out)]
    assert all(found)  # every output is a crop of its own padded image, maybe mirrored


def test_a_cifar_file_carrying_a_pickled_object_is_refused(tmp_path, cifar_root):
    root = tmp_path / "evil"
    shutil.copytree(cifar_root, root)

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with open(root / "cifar-100-python" / "train", "wb") as f:
        pickle.dump({"data": Payload()}, f)
    with pytest.raises(UsageError, match="refused global"):
        load(dataset="cifar100", data_root=str(root))
    assert not (tmp_path / "pwned").exists()


def test_missing_cifar100_says_which_files_are_expected_where(tmp_path):
    with pytest.raises(UsageError, match=r"cifar100: expected .*cifar-100-python/\{train,test,meta\}.*download=true"):
        load(dataset="cifar100", data_root=str(tmp_path))


def test_dvsgesture_frames_are_computed_once_and_cached(tmp_path, dvs_root):
    cfg = dict(dataset="dvsgesture", data_root=str(dvs_root), cache_dir=str(tmp_path), timesteps=4, downsample=4)
    data = load(**cfg)
    assert data.num_classes == 11 and data.train.x.shape[1:] == (4, 2, 32, 32)
    assert len(data.train) + len(data.val) == 110 and len(data.test) == 110
    files = sorted((tmp_path / "dvsgesture").glob("frames-*.pt"))
    assert len(files) == 2
    stamps = [f.stat().st_mtime_ns for f in files]
    again = load(**cfg)
    assert [f.stat().st_mtime_ns for f in files] == stamps
    torch.testing.assert_close(again.test.x, data.test.x)


def test_incomplete_dvsgesture_is_refused_without_trying_to_download(tmp_path, dvs_root):
    root = tmp_path / "partial"
    shutil.copytree(dvs_root, root)
    for f in list((root / "DVSGesture" / "ibmGestureTest").rglob("*.npy"))[:20]:
        f.unlink()
    with pytest.raises(UsageError, match=r"dvsgesture: expected .*ibmGestureTest/userNN_<lighting>/<label>.npy \(at least 100 files, found 90\)"):
        load(dataset="dvsgesture", data_root=str(root))
