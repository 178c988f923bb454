"""The training function: it learns, it is reproducible, it resumes, and all three modes run end to end."""
import math

import pytest
import torch

from rekd.config import TrainConfig
from rekd.errors import UsageError
from rekd.snn.teachers import load_cached_teacher, teacher_key, teacher_path
from rekd.train.loop import ensure_teacher, train

TIMING = ("epoch_time_s", "samples_per_s")


def comparable(history):
    return [{k: v for k, v in m.items() if k not in TIMING} for m in history]


def test_baseline_on_digits_with_tiny_reaches_95_percent_validation_accuracy(cache_dir):
    reports = []
    result = train(TrainConfig(cache_dir=cache_dir), on_epoch=reports.append)
    assert reports == result.history and len(reports) == 8
    assert max(m["val_acc"] for m in reports) >= 0.95
    assert reports[-1]["train_loss"] < reports[0]["train_loss"]


def test_every_epoch_reports_one_flat_dict_naming_each_metric(cache_dir):
    metrics = train(TrainConfig(cache_dir=cache_dir, epochs=1, eval_test=True)).final
    for key in ("epoch", "train_loss", "train_ce", "train_kd", "train_acc", "val_acc", "test_acc", "lr",
                "epoch_time_s", "samples_per_s", "firing_rate", "sops", "macs", "energy_uj"):
        assert key in metrics
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in metrics.values())
    layer_rates = [k for k in metrics if k.startswith("firing_rate/")]
    assert len(layer_rates) == 2 and all(0 <= metrics[k] <= 1 for k in layer_rates)
    assert metrics["sops"] > 0 and metrics["energy_uj"] > 0


def test_the_same_seed_gives_the_same_run_on_cpu(cache_dir):
    cfg = TrainConfig(cache_dir=cache_dir, epochs=2, device="cpu")
    first, second = train(cfg), train(cfg)
    assert comparable(first.history) == comparable(second.history)
    other = train(TrainConfig(cache_dir=cache_dir, epochs=2, device="cpu", seed=1))
    assert comparable(other.history) != comparable(first.history)


def test_an_interrupted_run_resumes_where_it_stopped(cache_dir, tmp_path):
    cfg = TrainConfig(cache_dir=cache_dir, epochs=3, dataset="digits", device="cpu")
    straight = train(cfg, run_dir=tmp_path / "straight")

    def crash_after_epoch_2(metrics):
        if metrics["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, run_dir=tmp_path / "resumed", on_epoch=crash_after_epoch_2)
    reports = []
    resumed = train(cfg, run_dir=tmp_path / "resumed", on_epoch=reports.append)
    assert [m["epoch"] for m in reports] == [3]  # only the missing epoch ran
    assert comparable(resumed.history) == comparable(straight.history)
    for a, b in zip(resumed.model.state_dict().values(), straight.model.state_dict().values()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dataset", ["digits", "ndigits"])
@pytest.mark.parametrize("mode", ["sparse_kd", "default_kd"])
def test_distillation_runs_end_to_end(cache_dir, mode, dataset):
    cfg = TrainConfig(cache_dir=cache_dir, mode=mode, dataset=dataset, epochs=2, teacher_epochs=2,
                      prune_ratio=0.3, timesteps=4)
    weights = ensure_teacher(cfg) if mode == "sparse_kd" else None
    result = train(cfg, teacher_weights=weights)
    final = result.final
    assert final["train_kd"] > 0 and final["train_ce"] > 0
    assert final["val_acc"] > 0.3  # well above chance (0.1) after two epochs
    if mode == "sparse_kd":
        assert final["teacher_sparsity"] == pytest.approx(0.3, abs=1e-3)
        assert 0 < final["teacher_val_acc"] <= 1


def test_sparse_kd_without_a_cached_teacher_says_how_to_get_one(tmp_path):
    cfg = TrainConfig(cache_dir=str(tmp_path), mode="sparse_kd", epochs=1)
    with pytest.raises(UsageError, match="needs a trained baseline teacher"):
        train(cfg)


def test_the_teacher_cache_trains_a_baseline_once_and_keys_on_what_determines_it(tmp_path, capsys):
    cfg = TrainConfig(cache_dir=str(tmp_path), mode="sparse_kd", epochs=1, prune_ratio=0.5)
    weights = ensure_teacher(cfg)
    assert "training the baseline" in capsys.readouterr().err
    path = teacher_path(cfg.resolved(4))
    stamp = path.stat().st_mtime_ns
    again = ensure_teacher(cfg.with_overrides(prune_ratio=0.1, alpha=0.9, temperature=2.0))
    assert "training the baseline" not in capsys.readouterr().err
    assert path.stat().st_mtime_ns == stamp
    for key in weights:
        torch.testing.assert_close(weights[key], again[key])
    entry = load_cached_teacher(cfg.resolved(4))
    assert entry["config"]["mode"] == "baseline" and 0 <= entry["val_acc"] <= 1
    base = cfg.resolved(4)
    assert teacher_key(base) != teacher_key(base.with_overrides(seed=1))
    assert teacher_key(base) != teacher_key(base.with_overrides(arch="vgg16"))
    assert teacher_key(base) != teacher_key(base.with_overrides(teacher_epochs=3))
    assert teacher_key(base) == teacher_key(base.with_overrides(prune_ratio=0.7, confidence=0.9))


def test_confidence_must_exceed_one_over_the_number_of_classes():
    with pytest.raises(UsageError, match=r"confidence=0.05 is not allowed for digits; allowed: 1/10 < confidence < 1"):
        train(TrainConfig(mode="default_kd", confidence=0.05, epochs=1))


def test_cifar100_trains_from_its_release_layout(cache_dir, cifar_root):
    cfg = TrainConfig(cache_dir=cache_dir, dataset="cifar100", data_root=str(cifar_root), epochs=2, eval_test=True)
    result = train(cfg)
    assert result.config.timesteps == 4
    assert result.final["train_acc"] > 0.01 and 0 <= result.final["test_acc"] <= 1


def test_dvsgesture_trains_from_tonics_layout(cache_dir, dvs_root):
    cfg = TrainConfig(cache_dir=cache_dir, dataset="dvsgesture", data_root=str(dvs_root), epochs=2,
                      timesteps=4, downsample=4, eval_test=True)
    result = train(cfg)
    assert result.final["train_loss"] < 2.5 and 0 <= result.final["test_acc"] <= 1
    assert train(TrainConfig(cache_dir=cache_dir, dataset="dvsgesture", data_root=str(dvs_root), epochs=1,
                             downsample=8)).config.timesteps == 16  # the paper's T for DVS-Gesture


def test_precomputed_teacher_logits_are_what_the_teacher_says_per_batch(cache_dir):
    from rekd.datasets import load_dataset
    from rekd.train.optim import Optimization
    from rekd.snn.teachers import PrunedTeacher
    from rekd.train.loop import resolve, teacher_outputs

    cfg = resolve(TrainConfig(cache_dir=cache_dir, mode="sparse_kd", prune_ratio=0.3))
    data = load_dataset(cfg)
    torch.manual_seed(0)
    from rekd.snn.models import build_model
    weights = build_model(cfg, 1, 10, 8).state_dict()
    teacher = PrunedTeacher(cfg, weights, 1, 10, 8)
    all_logits = teacher_outputs(teacher, data, data.train, cfg, Optimization(cfg, teacher, 1, torch.device("cpu")))
    assert all_logits.shape == (len(data.train), 10)
    idx = torch.tensor([5, 0, 77, 300])
    torch.testing.assert_close(all_logits[idx], teacher(data.to_input(data.train.x[idx], cfg.timesteps)))
