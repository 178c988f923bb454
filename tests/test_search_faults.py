"""Faults inside a search: a trial whose loss turns NaN stops with that reason, is tagged in MLflow and
failed in Optuna, and the search goes on to its last trial."""
import dataclasses
import math

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from rekd.config import TrainConfig
from rekd.datasets import Split, load_dataset
from rekd.search import build_parser, plan_from_args
from rekd.train import NonFiniteLoss, resolve, train

pytestmark = pytest.mark.slow


def poisoned_digits():
    data = load_dataset(resolve(TrainConfig()))
    x = data.train.x.clone()
    x[:, :, 3, 3] = math.nan  # corrupted samples: every batch carries NaN into the network
    return dataclasses.replace(data, train=Split(x, data.train.y))


def test_train_raises_after_reporting_the_epoch_and_keeps_the_last_good_checkpoint(tmp_path):
    reports = []
    with pytest.raises(NonFiniteLoss, match="training diverged in epoch 1: non-finite loss or weights"):
        train(TrainConfig(epochs=2), data=poisoned_digits(), on_epoch=reports.append, run_dir=tmp_path)
    assert len(reports) == 1  # the epoch is reported before the run stops
    assert not (tmp_path / "last.pt").exists()  # a diverged state is never saved as the checkpoint


@pytest.fixture
def local_ray():
    """run_search starts a private Ray in this process; end it so later tests find the machine free."""
    yield
    import ray
    ray.shutdown()


def test_a_search_whose_trials_diverge_tags_them_and_finishes(tmp_path, capsys, local_ray):
    from rekd.driver import run_search
    from rekd.tracking import client_for, ensure_experiment

    args = build_parser().parse_args(["default_kd", "--smoke-test", "--num-samples", "3", "--storage-path",
                                      str(tmp_path), "--name", "nan-search"])
    plan = plan_from_args(args)
    client = client_for(plan.tracking_uri)
    experiment_id = ensure_experiment(client, plan.experiment)
    code = run_search(plan, poisoned_digits(), client, experiment_id)
    assert code == 1 and "no trial produced a result" in capsys.readouterr().err
    client = MlflowClient(plan.tracking_uri)
    parent = client.search_runs([experiment_id], filter_string="tags.`rekd.role` = 'search'")[0]
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_non_finite_loss"] == 3
    children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 3  # every trial ran: one diverging trial does not end the search
    for child in children:
        assert child.info.status == "FAILED"
        assert child.data.tags["rekd.outcome"] == "non_finite_loss"
        assert "training diverged in epoch 1" in child.data.tags["rekd.stop_detail"]
    study = optuna.load_study(study_name="nan-search", storage=f"sqlite:///{tmp_path / 'nan-search' / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to run out of its memory")
def test_cuda_out_of_memory_stops_the_trial_with_that_reason(tmp_path):
    cfg = TrainConfig(arch="vgg16", dataset="digits", epochs=1, batch_size=2**20, device="cuda")
    with pytest.raises(torch.OutOfMemoryError):
        train(cfg)
