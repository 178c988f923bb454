"""Small synthetic CIFAR-100 and DVS-Gesture folders in the releases' real on-disk formats.

For the tests and the benchmark: the loaders read them exactly as they read the real releases.
"""
import pickle
from pathlib import Path

import numpy as np


def make_cifar100_folder(root: Path, n_train: int = 300, n_test: int = 100, seed: int = 0) -> Path:
    """<root>/cifar-100-python/{train,test,meta}: pickled dicts as in the official python release.

    Each class gets a distinct colour pattern so that a network can learn something from 300 images.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 100, n)
        base = np.stack([(labels * 37) % 256, (labels * 91) % 256, (labels * 53) % 256], 1)  # (N, 3)
        images = base[:, :, None] + rng.integers(-20, 20, (n, 3, 1024))
        content = {
            "filenames": [f"img_{i}.png" for i in range(n)],
            "batch_label": f"{name} batch",
            "fine_labels": labels.tolist(),
            "coarse_labels": (labels // 5).tolist(),
            "data": np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(content, f)
    meta = {"fine_label_names": [f"class_{i}" for i in range(100)],
            "coarse_label_names": [f"super_{i}" for i in range(20)]}
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f)
    return root


def make_dvsgesture_folder(root: Path, users: int = 10, events: int = 400, seed: int = 0) -> Path:
    """tonic's preprocessed DVS-Gesture layout: DVSGesture/ibmGesture{Train,Test}/userNN_<light>/<label>.npy.

    Each file is an int [N, 4] array of x, y, p, t (ms); each gesture class fires in its own region.
    """
    rng = np.random.default_rng(seed)
    base = root / "DVSGesture"
    for split, first_user in (("ibmGestureTrain", 1), ("ibmGestureTest", 24)):
        (base / f"{split}.tar.gz").parent.mkdir(parents=True, exist_ok=True)
        (base / f"{split}.tar.gz").write_bytes(b"")  # tonic only checks that the archive is there
        for user in range(first_user, first_user + users):
            folder = base / split / f"user{user:02d}_fluorescent"
            folder.mkdir(parents=True, exist_ok=True)
            for label in range(11):
                cx, cy = 12 + (label % 4) * 32, 12 + (label // 4) * 40
                x = np.clip(cx + rng.integers(-10, 10, events), 0, 127)
                y = np.clip(cy + rng.integers(-10, 10, events), 0, 127)
                p = rng.integers(0, 2, events)
                t = np.sort(rng.integers(0, 1500, events))  # ms
                np.save(folder / f"{label}.npy", np.stack([x, y, p, t], 1).astype(np.int64))
    return root
