"""The benchmark's pieces that are not timings: the synthetic objective and the search simulation."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rekd.bench.__main__ import main
from rekd.bench.rows import Row
from rekd.bench.search_efficiency import CURVES, MAX_T, OPTIMUM, STRATEGIES, accuracy, budget_to_reach, final_accuracy, one_search, regret_at


def test_the_synthetic_objective_has_its_known_optimum_and_rising_curves():
    best = {"prune_ratio": 0.3, "temperature": 4.0, "alpha": 0.7}
    assert math.isclose(final_accuracy(best), OPTIMUM)
    assert final_accuracy({"prune_ratio": 0.9, "temperature": 1.0, "alpha": 0.0}) < OPTIMUM
    for shape in CURVES:
        curve = [accuracy(best, t, shape) for t in range(1, MAX_T + 1)]
        assert curve == sorted(curve) and curve[-1] < OPTIMUM
    # slow starters: a config that ends worse leads after one epoch
    fast = {**best, "alpha": 0.0}
    assert accuracy(fast, 1, "slow starters") > accuracy(best, 1, "slow starters")
    assert final_accuracy(fast) < final_accuracy(best)


def test_every_strategy_stays_within_its_budget_and_regret_never_rises():
    for name, (make, early) in STRATEGIES.items():
        curve = one_search(make, early, seed=0, budget=12 * MAX_T, curve="ranking kept")
        spent = [s for s, _ in curve]
        regrets = [r for _, r in curve]
        assert spent == sorted(spent) and 11 * MAX_T < spent[-1] <= 12 * MAX_T
        assert all(b <= a for a, b in zip(regrets, regrets[1:])), name
        if early:  # trials stopped early leave epochs for more trials
            assert len(curve) > 12, name
        else:
            assert len(curve) == 12
    assert regret_at([(10, 0.5), (20, 0.1)], 15) == 0.5 and budget_to_reach([(10, 0.5), (20, 0.001)], 0.01) == 20


def test_rows_compare_with_their_targets(tmp_path, capsys):
    assert Row("a", 1.1, "ratio", 1.25).meets_target is True
    assert Row("a", 1.3, "ratio", 1.25).meets_target is False
    assert Row("a", 1.3, "ratio", None).meets_target is None
    out = tmp_path / "rows.json"
    assert main(["--only", "search", "--quick", "--json", str(out)]) == 0
    import json
    rows = json.loads(out.read_text())
    assert {"name", "value", "unit", "target", "meets_target"} <= set(rows[0])
    assert "regret with the PRUNED fix" in capsys.readouterr().out


def test_the_gpu_throughput_measurement_runs_on_a_cpu_in_its_own_process():
    import torch

    from rekd.bench.gpu import VARIANTS, measure, variant_in_subprocess

    direct = measure("cpu", batch=2, steps=1, **VARIANTS["fp32"][1])
    assert direct["images_per_s"] > 0
    assert variant_in_subprocess("bf16 + channels_last", "cpu", 2, 1)["images_per_s"] > 0
    if not torch.cuda.is_available():  # a failing variant becomes a row that says why, not a crash
        assert "error" in variant_in_subprocess("fp32", "cuda", 2, 1)


ROOT = Path(__file__).resolve().parent.parent

# A lent GPU machine has torch and rekd's training wheels, not Ray, Optuna or MLflow: the GPU group must run there.
WITHOUT_RAY = """
import runpy, sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "optuna", "mlflow"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Absent())
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def without_ray(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_RAY, *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


@pytest.mark.slow
def test_the_gpu_group_runs_where_ray_optuna_and_mlflow_are_not_installed(tmp_path):
    from rekd.datasets.synthetic import make_cifar100_folder

    bench = without_ray("rekd.bench", "--only", "gpu")
    assert bench.returncode == 0, bench.stderr[-3000:]
    if not torch.cuda.is_available():
        assert "no GPU here" in bench.stderr
    variant = without_ray("rekd.bench_gpu", "fp32", "--device", "cpu", "--batch", "2", "--steps", "1")
    assert variant.returncode == 0 and json.loads(variant.stdout)["images_per_s"] > 0, variant.stderr[-3000:]
    root = make_cifar100_folder(tmp_path / "data", n_train=64, n_test=32)
    epochs = without_ray("rekd.bench_gpu", "epochs", "sparse_kd", "--device", "cpu", "--arch", "tiny", "--batch", "16",
                         "--data-root", str(root), "--cache-dir", str(tmp_path / "cache"))
    assert epochs.returncode == 0 and json.loads(epochs.stdout), epochs.stderr[-3000:]


def test_without_ray_the_gpu_search_rows_say_why_they_did_not_run(monkeypatch):
    import importlib.util

    from rekd.bench import gpu

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    [row] = gpu.sharing_rows_if_ray()
    assert math.isnan(row.value) and row.detail.startswith("did not run: ray not installed here")


@pytest.mark.slow
def test_the_gpu_epoch_and_sharing_rows_run_on_a_cpu():
    """The rows `--only gpu` adds, at a CPU's size: three modes through train() in processes of their own,
    then 1, 2 and 4 processes at once (no timing is asserted, only that each row measured something)."""
    from rekd.bench.gpu import epoch_rows

    rows = epoch_rows(quick=True, device="cpu", arch="tiny", batch=32, n_train=256)
    assert [r.name.split(" whole")[0].split(",")[0] for r in rows] == [
        "tiny baseline", "tiny sparse_kd", "tiny default_kd", "tiny baseline", "tiny baseline", "tiny baseline"]
    assert all(r.value > 0 for r in rows), [(r.name, r.detail) for r in rows]
    assert "compile false" in rows[0].detail and "amp False" in rows[0].detail
    assert "4 trial(s) sharing the GPU" in rows[-1].name


def test_the_two_objective_problem_trades_accuracy_for_energy_and_gmp_hides_the_final_energy_early():
    from rekd.bench import pareto_efficiency as pe

    best = {"target_sparsity": 0.5, "prune_ratio": 0.3, "temperature": 4.0, "alpha": 0.7}
    sparse = {**best, "target_sparsity": 0.95}
    assert math.isclose(pe.final_accuracy(best), pe.BEST_ACCURACY)
    # accuracy falls with sparsity, most of it near the top; energy falls with density
    drops = [pe.final_accuracy({**best, "target_sparsity": s}) for s in (0.5, 0.7, 0.75, 0.95)]
    assert drops[0] - drops[1] < drops[2] - drops[3]
    for scenario in pe.SCENARIOS:
        (acc_dense, energy_dense), (acc_sparse, energy_sparse) = (
            pe.SCENARIOS[scenario](c, pe.MAX_T) for c in (best, sparse))
        assert acc_sparse < acc_dense and energy_sparse < energy_dense / 5
    # rewire: the final energy from the first epoch; gmp: at epoch 1 the two students' energies barely differ
    assert pe.sparse_from_the_start(sparse, 1)[1] == pe.sparse_from_the_start(sparse, pe.MAX_T)[1]
    early = pe.pruned_while_training(sparse, 1)[1] / pe.pruned_while_training(best, 1)[1]
    final = pe.pruned_while_training(sparse, pe.MAX_T)[1] / pe.pruned_while_training(best, pe.MAX_T)[1]
    assert final == pytest.approx(0.1) and early > 0.8
    # the weighted sum prefers the better of two points
    scenario = "sparse from the start"
    assert pe.weighted_score(0.9, 2.0, scenario) > max(pe.weighted_score(0.8, 2.0, scenario),
                                                       pe.weighted_score(0.9, 3.0, scenario))


def test_the_true_front_is_a_trade_off_that_no_search_exceeds():
    from rekd.bench import pareto_efficiency as pe
    from rekd.search.pareto import normalized_hypervolume, pareto_front

    for scenario in pe.SCENARIOS:
        front = pe.true_front(scenario)
        sample = front[::len(front) // 40]
        assert len(sample) >= 40 and pareto_front(sample) == list(range(len(sample)))  # mutually non-dominated
        accuracies, energies = [-p[0] for p in front], [p[1] for p in front]
        assert max(accuracies) - min(accuracies) > 0.3 and max(energies) > 10 * min(energies)
        # the one-sweep hypervolume is pareto's, and the true front's own share is 1
        ideal, reference = pe.normalisation(scenario)
        assert pe.front_hypervolume(sample, ideal, reference) == pytest.approx(
            normalized_hypervolume(sample, ideal, reference), rel=1e-12)
        assert pe.share(sample, scenario) < 1.0
        assert pe.front_hypervolume(front[::2], ideal, reference) / pe.attainable_hypervolume(scenario) > 0.999
        for strategy in pe.STRATEGIES:
            curve = pe.share_curve(pe.one_search(strategy, seed=0, budget=10 * pe.MAX_T, scenario=scenario), scenario)
            assert 0.0 < curve[-1][1] <= 1.0 + 1e-6, (scenario, strategy)  # 1e-6: the front is sampled, to ~1e-8


def test_every_two_objective_strategy_stays_within_its_budget_and_its_share_never_falls():
    from rekd.bench import pareto_efficiency as pe

    budget = 12 * pe.MAX_T
    for strategy in pe.STRATEGIES:
        trials = pe.one_search(strategy, seed=1, budget=budget, scenario="pruned while training")
        spent = [t.spent for t in trials]
        assert spent == sorted(spent) and budget - pe.MAX_T < spent[-1] <= budget, strategy
        assert spent[-1] == sum(t.epochs for t in trials)
        shares = [share for _, share in pe.share_curve(trials, "pruned while training")]
        assert all(b >= a for a, b in zip(shares, shares[1:])), strategy
    curve = [(10, 0.5), (20, 0.95)]
    assert pe.share_at(curve, 15) == 0.5 and pe.share_at(curve, 5) == 0.0 and pe.budget_to_reach(curve, 0.9) == 20


def test_mo_asha_stops_trials_at_its_rungs_and_no_early_stopping_runs_every_trial_to_max_t():
    from rekd.bench import pareto_efficiency as pe

    budget = 16 * pe.MAX_T
    rungs = {pe.GRACE_PERIOD * pe.REDUCTION_FACTOR ** k for k in range(3)}  # 1, 3, 9 below max_t 16
    for strategy in pe.STRATEGIES:
        trials = pe.one_search(strategy, seed=2, budget=budget, scenario="sparse from the start")
        epochs = [t.epochs for t in trials]
        if "asha" in strategy:
            assert sum(epochs) / len(epochs) < 0.75 * pe.MAX_T and len(trials) > budget // pe.MAX_T, strategy
            assert set(epochs) <= rungs | {pe.MAX_T} and pe.MAX_T in epochs, strategy
        else:
            assert epochs == [pe.MAX_T] * (budget // pe.MAX_T), strategy


def test_only_full_budget_trials_make_the_weighted_sum_strategys_front():
    from rekd.bench import pareto_efficiency as pe
    from rekd.search.pareto import minimised, pareto_front

    scenario = "sparse from the start"
    trials = pe.one_search("tpe on a weighted sum + asha", seed=3, budget=10 * pe.MAX_T, scenario=scenario)
    curve = pe.share_curve(trials, scenario)
    stopped = [n for n, t in enumerate(trials) if t.epochs < pe.MAX_T]
    assert stopped and len(stopped) < len(trials)
    for n in stopped:  # a trial stopped early never moves the share
        assert curve[n][1] == (curve[n - 1][1] if n else 0.0)
    full = [minimised((t.val_acc, t.energy_uj), pe.MODES) for t in trials if t.epochs == pe.MAX_T]
    assert curve[-1][1] == pe.share([full[i] for i in pareto_front(full)], scenario)
    # however good its values, a trial stopped early adds nothing: they are not what it would have reached
    excellent_but_stopped = pe.TrialRecord(spent=1, epochs=1, val_acc=0.95, energy_uj=0.5)
    finished = pe.TrialRecord(spent=17, epochs=pe.MAX_T, val_acc=0.8, energy_uj=5.0)
    assert [s for _, s in pe.share_curve([excellent_but_stopped, finished], scenario)] == [
        0.0, pe.share([minimised((0.8, 5.0), pe.MODES)], scenario)]


def test_the_pareto_rows_compare_every_strategy_and_say_whether_mo_asha_pays_off():
    from rekd.bench import pareto_efficiency as pe

    rows = pe.scenario_rows("pruned while training", seeds=range(2), budget=8 * pe.MAX_T)
    assert len(rows) == len(pe.STRATEGIES) + 1
    for row, strategy in zip(rows, pe.STRATEGIES):
        assert strategy in row.name and row.unit == "hv share" and row.higher_is_better and 0 < row.value <= 1
        assert "mean over 2 seeds" in row.detail and "reached by" in row.detail
    ratio = rows[-1]
    assert ratio.target == 1.0 and ratio.higher_is_better and ratio.value == pytest.approx(rows[0].value / rows[1].value)
