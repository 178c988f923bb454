"""The benchmark's pieces that are not timings: the synthetic objective and the search simulation."""
import math

import pytest

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
