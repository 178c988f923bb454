"""Sparse students: masks that hold through optimizer steps, the GMP schedule, regrowth that keeps the count,
resume equal to an uninterrupted run, and generations handing over the right teacher."""
import math

import pytest
import torch
from torch import nn

from rekd.config import TrainConfig
from rekd.datasets import load_dataset
from rekd.snn.models import build_model
from rekd.snn.structure import Structure, connection_counts, cubic_sparsity, named_convs, rewire_share
from rekd.snn.teachers import generation_path
from rekd.train.loop import ensure_teacher, train
from rekd.train.optim import Optimization

TIMING = ("epoch_time_s", "samples_per_s")


@pytest.fixture(scope="module")
def digits():
    return load_dataset(TrainConfig())


def student(cfg: TrainConfig, data, steps_per_epoch: int = 10, seed: int = 0):
    torch.manual_seed(seed)
    cfg = cfg.resolved(4)
    model = build_model(cfg, data.in_channels, data.num_classes, data.resolution)
    optimization = Optimization(cfg, model, cfg.epochs * steps_per_epoch, torch.device("cpu"))
    optimization.structure = Structure(cfg, model, steps_per_epoch, seed)
    return model, optimization


def steps(model, optimization, data, n: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(n):
        idx = torch.randint(len(data.train), (16,), generator=generator)
        x, y = data.train.x[idx], data.train.y[idx]
        loss = nn.functional.cross_entropy(model(data.to_input(x, 4)), y)
        optimization.step(loss)


def dead_entries_are_zero(model, optimization) -> bool:
    masks = optimization.structure.masks
    for name, conv in named_convs(model).items():
        dead = ~masks[name]
        if conv.weight[dead].abs().max() != 0:
            return False
        for value in optimization.optimizer.state.get(conv.weight, {}).values():
            if torch.is_tensor(value) and value.shape == conv.weight.shape and value[dead].abs().max() != 0:
                return False
    return True


@pytest.mark.parametrize("structure,optimizer", [("gmp", "sgd"), ("rewire", "sgd"), ("gmp", "adam"),
                                                 ("rewire", "adam")])
def test_pruned_weights_and_their_optimizer_state_stay_exactly_zero(digits, structure, optimizer):
    cfg = TrainConfig(structure=structure, target_sparsity=0.7, epochs=4, prune_every=3, optimizer=optimizer,
                      weight_decay=5e-3, sparsity_end_epoch=3)
    model, optimization = student(cfg, digits)
    for _ in range(8):  # 40 steps: inside the window (30 steps) and after it
        steps(model, optimization, digits, 5)
        assert dead_entries_are_zero(model, optimization)
    live = optimization.structure.live()
    assert live == round(0.3 * optimization.structure.total)  # the target, exactly, at and after the window's end
    assert connection_counts(model, optimization.structure.masks)["density"] == pytest.approx(0.3, abs=1e-4)


def test_the_gmp_schedule_is_cubic_from_dense_to_the_target_between_its_epochs():
    assert cubic_sparsity(0.0, 0.0, 0.8) == 0.0 and cubic_sparsity(1.0, 0.0, 0.8) == pytest.approx(0.8)
    assert cubic_sparsity(0.5, 0.0, 0.8) == pytest.approx(0.8 * (1 - 0.5 ** 3))  # 0.7: most of it early
    assert cubic_sparsity(-1.0, 0.2, 0.8) == pytest.approx(0.2) and cubic_sparsity(2.0, 0.2, 0.8) == pytest.approx(0.8)
    assert rewire_share(0.0, 0.3) == pytest.approx(0.3) and rewire_share(0.5, 0.3) == pytest.approx(0.15)
    assert rewire_share(1.0, 0.3) == pytest.approx(0.0, abs=1e-12)


def test_gmp_prunes_on_its_schedule_and_masks_only_shrink(digits):
    cfg = TrainConfig(structure="gmp", target_sparsity=0.8, epochs=4, prune_every=5, sparsity_start_epoch=1,
                      sparsity_end_epoch=3)
    model, optimization = student(cfg, digits)  # 10 steps per epoch: the ramp runs from step 10 to step 30
    structure = optimization.structure
    previous = {k: v.clone() for k, v in structure.masks.items()}
    for step in range(40):
        steps(model, optimization, digits, 1, seed=step)
        expected = cubic_sparsity((structure.step - 10) / 20, 0.0, 0.8)  # the schedule once this step is taken
        if structure.updates_at(structure.step - 1):
            assert 1 - structure.live() / structure.total == pytest.approx(expected, abs=1 / structure.total)
        assert all(bool((structure.masks[k] <= previous[k]).all()) for k in previous)  # never regrows
        previous = {k: v.clone() for k, v in structure.masks.items()}
        if structure.step <= 10:
            assert structure.live() == structure.total  # dense before the window
    assert structure.live() == round(0.2 * structure.total)


def test_rewiring_keeps_the_count_and_changes_the_connections(digits):
    for regrow in ("gradient", "random"):
        cfg = TrainConfig(structure="rewire", target_sparsity=0.8, epochs=4, prune_every=2, regrow=regrow)
        model, optimization = student(cfg, digits)
        structure = optimization.structure
        first = {k: v.clone() for k, v in structure.masks.items()}
        live = structure.live()
        assert live == round(0.2 * structure.total)
        for _ in range(10):
            steps(model, optimization, digits, 2)
            assert structure.live() == live  # dropped as many as regrown
        changed = sum(int((structure.masks[k] != first[k]).sum()) for k in first)
        assert changed > 0, regrow


def test_a_random_start_spreads_its_connections_by_the_erdos_renyi_kernel_rule():
    cfg = TrainConfig(structure="rewire", target_sparsity=0.8).resolved(8)
    model = build_model(cfg, 2, 10, 22)
    structure = Structure(cfg, model, 10, 0)
    first, second = (structure.masks[name].float().mean() for name in structure.convs)  # 2->32 and 32->64, 3x3
    assert structure.live() == round(0.2 * structure.total)  # exactly the target
    assert first == 1.0  # the rule asks (2+32+3+3)/(2*32*9) x scale > 1 of the small first conv: dense
    # the rest goes to the second conv: (0.2 * 19008 - 576) / 18432 of it
    assert float(second) == pytest.approx((round(0.2 * structure.total) - 576) / 18432, abs=1e-4)
    again = Structure(cfg, build_model(cfg, 2, 10, 22), 10, 0)
    assert all(torch.equal(structure.masks[n], again.masks[n]) for n in structure.masks)  # seeded


def test_gradient_regrowth_picks_the_dead_connections_with_the_largest_gradient(digits):
    cfg = TrainConfig(structure="rewire", target_sparsity=0.5, epochs=4, prune_every=1, rewire_fraction=0.1)
    model, optimization = student(cfg, digits)
    structure = optimization.structure
    structure.step = 1  # an update step, inside the window
    live = structure.flat(structure.masks)
    grads = torch.zeros(structure.total)
    dead = (~live).nonzero().flatten()
    chosen = dead[torch.randperm(len(dead), generator=torch.Generator().manual_seed(1))[:2000]]
    grads[dead] = 0.01
    grads[chosen] = 1.0 + torch.arange(2000, dtype=torch.float32)  # these 2,000 stand out, in rising order
    grads[live] = 100.0  # live weights' gradients must not matter
    for name, g in structure.unflatten(grads).items():
        structure.convs[name].weight.grad = g.clone()
    n = round(rewire_share(structure.progress(1), 0.1) * int(live.sum()))
    assert 0 < n <= 2000
    new = structure.flat(structure.rewired())
    grown = new & ~live
    assert int(grown.sum()) == n and int(new.sum()) == int(live.sum())
    assert set(grown.nonzero().flatten().tolist()) == set(chosen[-n:].tolist())  # the n largest of them


def test_a_sparse_student_on_digits_learns_at_its_target_density(cache_dir):
    history = train(TrainConfig(cache_dir=cache_dir, structure="rewire", target_sparsity=0.8, epochs=4,
                                device="cpu")).history
    assert all(abs(m["density"] - 0.2) <= 0.01 for m in history)  # rewire: the target at every epoch
    assert history[-1]["val_acc"] >= 0.8
    assert history[-1]["connections"] < 0.3 * (18720 + 2560)


class Stop(Exception):
    pass


def interrupted_after(epochs: int):
    def on_epoch(metrics):
        if metrics["epoch"] == epochs:
            raise Stop
    return on_epoch


@pytest.mark.parametrize("settings,stop_at", [
    (dict(structure="gmp", target_sparsity=0.8, epochs=4, prune_every=7), 2),
    (dict(structure="rewire", target_sparsity=0.8, epochs=4, prune_every=7, regrow="random"), 1),
    (dict(mode="sparse_kd", structure="rewire", target_sparsity=0.7, epochs=2, generations=2, prune_every=7,
          prune_ratio=0.3, inherit_mask=True), 3),  # inside generation 2: its teacher comes from the checkpoint
    (dict(mode="sparse_kd", structure="gmp", target_sparsity=0.7, epochs=2, generations=2, prune_every=7), 2),
])
def test_a_resumed_sparse_run_equals_an_uninterrupted_one(tmp_path, cache_dir, settings, stop_at):
    cfg = TrainConfig(cache_dir=cache_dir, device="cpu", teacher_epochs=2, **settings)
    teacher = ensure_teacher(cfg) if cfg.mode == "sparse_kd" else None
    whole = train(cfg, run_dir=tmp_path / "whole", teacher_weights=teacher)
    with pytest.raises(Stop):
        train(cfg, run_dir=tmp_path / "cut", on_epoch=interrupted_after(stop_at), teacher_weights=teacher)
    resumed = train(cfg, run_dir=tmp_path / "cut", teacher_weights=teacher)
    strip = [[{k: v for k, v in m.items() if k not in TIMING} for m in r.history] for r in (whole, resumed)]
    assert strip[0] == strip[1]
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_each_generation_is_taught_by_the_previous_generations_student(cache_dir):
    cfg = TrainConfig(cache_dir=cache_dir, device="cpu", mode="sparse_kd", structure="gmp", target_sparsity=0.6,
                      epochs=2, teacher_epochs=2, generations=3, prune_ratio=0.0)
    history = train(cfg, teacher_weights=ensure_teacher(cfg)).history
    assert [m["generation"] for m in history] == [1, 1, 2, 2, 3, 3]
    assert [m["epoch"] for m in history] == [1, 2, 3, 4, 5, 6]
    for g in (2, 3):  # the teacher is the previous student, unpruned at ratio 0: it scores what that student did
        last_of_previous = history[2 * (g - 1) - 1]
        first = history[2 * (g - 1)]
        assert first["teacher_val_acc"] == pytest.approx(last_of_previous["val_acc"], abs=1e-12)
        assert first["teacher_sparsity"] == pytest.approx(1 - last_of_previous["density"], abs=1e-3)
    resolved = cfg.resolved(4)
    for g in (1, 2, 3):
        assert generation_path(resolved, g).is_file()


def test_a_pruned_teacher_from_a_sparse_student_keeps_its_zeros(cache_dir):
    cfg = TrainConfig(cache_dir=cache_dir, device="cpu", mode="sparse_kd", structure="gmp", target_sparsity=0.5,
                      epochs=1, teacher_epochs=1, generations=2, prune_ratio=0.7, sparsity_end_epoch=1)
    history = train(cfg, teacher_weights=ensure_teacher(cfg)).history
    assert history[0]["density"] == pytest.approx(0.5, abs=1e-3)
    assert history[1]["teacher_sparsity"] >= 0.7 - 1e-3  # the student's 50 % zeros, pruned further to 70 %
    assert not math.isnan(history[1]["val_acc"])


def test_a_sparse_student_taught_by_the_virtual_teacher_keeps_its_target(cache_dir):
    history = train(TrainConfig(cache_dir=cache_dir, device="cpu", mode="default_kd", structure="gmp",
                                target_sparsity=0.9, epochs=2, sparsity_end_epoch=1)).history
    assert history[-1]["density"] == pytest.approx(0.1, abs=1e-4) and history[-1]["train_kd"] > 0


@pytest.mark.slow
def test_a_compiled_sparse_student_keeps_its_removed_weights_at_zero(cache_dir):
    import getpass
    import shutil
    import tempfile
    from pathlib import Path

    result = train(TrainConfig(cache_dir=cache_dir, device="cpu", compile="true", structure="rewire",
                               target_sparsity=0.8, epochs=1, prune_every=5))
    assert result.config.compile == "true"
    zeros = sum(int((conv.weight == 0).sum()) for conv in named_convs(result.model).values())
    total = sum(conv.weight.numel() for conv in named_convs(result.model).values())
    assert zeros >= round(0.8 * total) and result.final["density"] == pytest.approx(0.2, abs=1e-4)
    # torch's own caches outside TORCHINDUCTOR_CACHE_DIR (see tests/test_compile.py)
    shutil.rmtree(Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}", ignore_errors=True)


def test_an_inherited_mask_starts_the_next_generation_where_its_teacher_ended(cache_dir):
    common = dict(cache_dir=cache_dir, device="cpu", mode="sparse_kd", structure="gmp", target_sparsity=0.6,
                  epochs=2, teacher_epochs=2, generations=2, sparsity_end_epoch=2, prune_every=5)
    teacher = ensure_teacher(TrainConfig(**common))
    fresh = train(TrainConfig(**common), teacher_weights=teacher).history
    inherited = train(TrainConfig(**common, inherit_mask=True), teacher_weights=teacher).history
    assert fresh[1]["density"] == pytest.approx(0.4, abs=1e-4) == inherited[1]["density"]  # generation 1's end
    assert inherited[2]["density"] == pytest.approx(0.4, abs=1e-4)  # generation 2 starts at its teacher's mask
    assert fresh[2]["density"] > 0.45  # a fresh student is halfway down its ramp from dense


def test_the_default_window_is_a_proportion_of_the_epochs_kept_unresolved_in_the_recorded_config():
    cfg = TrainConfig(structure="gmp", target_sparsity=0.8, epochs=8).resolved(4)
    assert cfg.sparsity_end_epoch is None and cfg.sparsity_end == 6
    shorter = TrainConfig.from_dict({**cfg.to_dict(), "epochs": 1})  # rekd.final --epochs 1 on a recorded config
    assert shorter.sparsity_end == 1
