"""Checkpoints and cached weights load with weights_only: no pickled objects, no other architectures."""
import os

import pytest
import torch

from rekd.train.checkpoint import FILENAME, load_checkpoint
from rekd.config import TrainConfig
from rekd.errors import UsageError
from rekd.storage import load_tensors, save_atomic
from rekd.train.loop import train


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_file_carrying_a_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "extra": Payload()}, path)
    with pytest.raises(UsageError, match="holds pickled Python objects, which rekd refuses to load"):
        load_tensors(path, "checkpoint")


def test_a_corrupt_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(UsageError, match="checkpoint .* is"):
        load_checkpoint(path)


def test_saves_are_atomic_and_round_trip(tmp_path):
    path = save_atomic({"w": torch.ones(2), "n": 3}, tmp_path / "sub" / "x.pt")
    assert load_tensors(path, "x")["n"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["x.pt"]


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path, cache_dir):
    train(TrainConfig(cache_dir=cache_dir, epochs=1), run_dir=tmp_path)
    assert (tmp_path / FILENAME).is_file()
    with pytest.raises(UsageError, match="was made with arch='tiny'; this run needs arch='vgg16'"):
        train(TrainConfig(cache_dir=cache_dir, epochs=2, arch="vgg16"), run_dir=tmp_path)


def test_a_checkpoint_whose_weights_do_not_fit_is_refused(tmp_path, cache_dir):
    train(TrainConfig(cache_dir=cache_dir, epochs=1), run_dir=tmp_path)
    state = torch.load(tmp_path / FILENAME, weights_only=True)
    state["model"].pop(next(iter(state["model"])))
    torch.save(state, tmp_path / FILENAME)
    with pytest.raises(UsageError, match="does not fit this network"):
        train(TrainConfig(cache_dir=cache_dir, epochs=2), run_dir=tmp_path)
