"""The PRUNED fix: a trial ASHA stopped early reaches Optuna as PRUNED with its intermediate values,
where Ray's stock OptunaSearch records it as COMPLETE with its partial-budget value."""
import optuna
import pytest

from rekd.search.optuna_searcher import PrunedAwareOptunaSearch, make_searcher
from rekd.search.study import load_study


def drive(stock: bool, tmp_path):
    study = load_study("sparse_kd").with_overrides(fixed={"epochs": 3}, grace_period=1)
    url = f"sqlite:///{tmp_path / ('stock.db' if stock else 'fixed.db')}"
    searcher = make_searcher(study, url, "s", stock=stock)
    assert isinstance(searcher, PrunedAwareOptunaSearch) != stock
    for trial_id in ("full", "stopped", "failed"):
        config = searcher.suggest(trial_id)
        assert set(config) == {"prune_ratio", "temperature", "alpha"}
        assert 0 <= config["prune_ratio"] <= 0.9
    # "full" runs all 3 epochs; ASHA stops "stopped" at its rung after epoch 1 (Tune then calls
    # on_trial_complete with that result instead of on_trial_result); "failed" raises in epoch 2.
    for epoch, value in ((1, 0.5), (2, 0.7)):
        searcher.on_trial_result("full", {"val_acc": value, "epoch": epoch, "training_iteration": epoch})
    searcher.on_trial_complete("full", {"val_acc": 0.8, "epoch": 3, "training_iteration": 3})
    searcher.on_trial_complete("stopped", {"val_acc": 0.3, "epoch": 1, "training_iteration": 1})
    searcher.on_trial_result("failed", {"val_acc": 0.4, "epoch": 1, "training_iteration": 1})
    searcher.on_trial_complete("failed", None, error=True)
    return {t.number: t for t in optuna.load_study(study_name="s", storage=url).trials}


def test_an_asha_stopped_trial_is_pruned_with_its_intermediate_values(tmp_path):
    trials = drive(stock=False, tmp_path=tmp_path)
    full, stopped, failed = trials[0], trials[1], trials[2]
    assert full.state == optuna.trial.TrialState.COMPLETE and full.value == pytest.approx(0.8)
    assert full.intermediate_values == {1: 0.5, 2: 0.7}
    assert stopped.state == optuna.trial.TrialState.PRUNED
    assert stopped.intermediate_values == {1: 0.3}
    assert failed.state == optuna.trial.TrialState.FAIL


def test_stock_optuna_search_records_the_stopped_trial_as_complete(tmp_path):
    trials = drive(stock=True, tmp_path=tmp_path)
    assert trials[1].state == optuna.trial.TrialState.COMPLETE  # the flaw the fix removes
    assert trials[1].value == pytest.approx(0.3) and trials[1].intermediate_values == {}


def test_rays_own_optuna_search_records_the_stopped_trial_as_complete_as_the_stock_comparison_does(tmp_path):
    """The premise of the fix and of `--stock-optuna`, checked against Ray's OptunaSearch itself."""
    from ray.tune.search.optuna import OptunaSearch

    from rekd.search.optuna_searcher import distribution, make_sampler

    study = load_study("sparse_kd").with_overrides(fixed={"epochs": 3}, grace_period=1)
    url = f"sqlite:///{tmp_path / 'ray.db'}"
    searcher = OptunaSearch(space={p.name: distribution(p) for p in study.params}, metric="val_acc", mode="max",
                            sampler=make_sampler(study), study_name="s", storage=optuna.storages.RDBStorage(url))
    for trial_id in ("full", "stopped"):
        assert set(searcher.suggest(trial_id)) == {"prune_ratio", "temperature", "alpha"}
    for epoch, value in ((1, 0.5), (2, 0.7)):
        searcher.on_trial_result("full", {"val_acc": value, "epoch": epoch, "training_iteration": epoch})
    searcher.on_trial_complete("full", {"val_acc": 0.8, "epoch": 3, "training_iteration": 3})
    searcher.on_trial_complete("stopped", {"val_acc": 0.3, "epoch": 1, "training_iteration": 1})
    ray_trials = optuna.load_study(study_name="s", storage=url).trials
    stock = drive(stock=True, tmp_path=tmp_path)
    for ours, rays in ((stock[0], ray_trials[0]), (stock[1], ray_trials[1])):
        assert (ours.state, ours.value, ours.intermediate_values) == (rays.state, rays.value, rays.intermediate_values)
    assert ray_trials[1].state == optuna.trial.TrialState.COMPLETE and ray_trials[1].value == pytest.approx(0.3)


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "random"])
def test_with_two_objectives_a_full_trial_is_complete_with_both_values_and_a_stopped_one_pruned(sampler, tmp_path):
    study = load_study("pareto").with_overrides(fixed={"epochs": 3}, sampler=sampler)
    url = f"sqlite:///{tmp_path / 'mo.db'}"
    searcher = make_searcher(study, url, "s")
    for trial_id in ("full", "stopped", "oom"):
        assert set(searcher.suggest(trial_id)) == {"target_sparsity", "prune_ratio", "temperature", "alpha"}
    for epoch in (1, 2):  # Optuna refuses intermediate values of several objectives: nothing is sent
        searcher.on_trial_result("full", {"val_acc": 0.5, "energy_uj": 2.0, "epoch": epoch, "training_iteration": epoch})
    searcher.on_trial_complete("full", {"val_acc": 0.8, "energy_uj": 1.5, "epoch": 3, "training_iteration": 3})
    searcher.on_trial_complete("stopped", {"val_acc": 0.3, "energy_uj": 0.9, "epoch": 1, "training_iteration": 1})
    searcher.on_trial_complete("oom", {"epoch": 1, "stop_reason": "cuda_oom"})
    ot = optuna.load_study(study_name="s", storage=url)
    assert [d.name for d in ot.directions] == ["MAXIMIZE", "MINIMIZE"]
    full, stopped, oom = ot.trials
    assert full.state == optuna.trial.TrialState.COMPLETE and full.values == pytest.approx([0.8, 1.5])
    assert stopped.state == optuna.trial.TrialState.PRUNED and stopped.values is None
    assert stopped.user_attrs == {"rekd.stopped_values": {"val_acc": 0.3, "energy_uj": 0.9}, "rekd.stopped_at_epoch": 1}
    assert oom.state == optuna.trial.TrialState.FAIL
    assert [t.number for t in ot.best_trials] == [0]  # Optuna's own Pareto front: full-budget trials only
