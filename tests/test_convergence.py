"""The convergence check: budgets under the same seeds, the paired change per step, bad input, and reruns that
keep what was trained."""
import json

import pytest

from rekd.evaluate.convergence import main, summary


def runs_of(finals):
    return [{"epochs": e, "seed": s, "test_acc": [0.5, acc], "val_acc": [0.5, acc]} for (e, s), acc in finals.items()]


def test_summary_pairs_each_budget_with_the_one_before_by_seed():
    # seeds move both budgets together: the change +1, +2, +3 points has mean 2, sd 1, t(0.975, 2) = 4.303.
    finals = {(4, 0): 0.90, (4, 1): 0.80, (4, 2): 0.70, (8, 0): 0.91, (8, 1): 0.82, (8, 2): 0.73}
    rows = summary(runs_of(finals), (4, 8), (0, 1, 2))
    assert "change" not in rows[0] and rows[0]["test_acc_mean"] == pytest.approx(80.0)
    assert rows[1]["change"] == pytest.approx(2.0)
    half = 4.302653 * 1.0 / 3 ** 0.5
    assert (rows[1]["change_low"], rows[1]["change_high"]) == pytest.approx((2 - half, 2 + half), abs=1e-4)


@pytest.mark.parametrize("argv,message", [
    (["--budgets", "8,4"], "--budgets 8,4 is not allowed; allowed: distinct ascending integers >= 1"),
    (["--budgets", "4,x"], "--budgets 4,x is not allowed"),
    (["--seeds", "2"], "--seeds 2 is not allowed; allowed: an integer >= 3"),
    (["--dataset", "mnist"], "mnist"),
    (["--set", "epochs=3"], "the check sets epochs itself"),
    (["--set", "lr=-1"], "lr=-1.0 is not allowed"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_check_writes_its_table_and_plot_and_a_rerun_trains_only_what_is_new(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--budgets", "1,2", "--seeds", "3", "--workers", "2", "--out", str(out)]) == 0
    first = json.loads((out / "convergence.json").read_text())
    assert sorted((r["epochs"], r["seed"]) for r in first["runs"]) == [(e, s) for e in (1, 2) for s in range(3)]
    assert all(len(r["test_acc"]) == r["epochs"] for r in first["runs"])
    assert (out / "convergence.png").stat().st_size > 0 and "| 2 |" in (out / "convergence.md").read_text()
    capsys.readouterr()
    assert main(["--budgets", "1,2,3", "--seeds", "3", "--workers", "2", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert said.startswith("3 baseline runs") and "6 kept from" in said
    second = json.loads((out / "convergence.json").read_text())
    kept = [r for r in second["runs"] if r["epochs"] < 3]
    assert kept == first["runs"]  # not trained again
    assert main(["--budgets", "1,2", "--seeds", "3", "--set", "lr=0.05", "--out", str(out)]) == 2


def test_a_folder_another_check_is_writing_is_refused_in_one_line(tmp_path, capsys):
    from rekd.locks import FileLock

    out = tmp_path / "out"
    out.mkdir()
    with FileLock(out / "convergence.lock").acquire():
        assert main(["--budgets", "1,2", "--seeds", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is being written by another convergence check" in err and "\n" not in err
    assert not (out / "convergence.json").exists()
