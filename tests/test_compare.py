"""Two reproductions side by side: each one's improvement, and B's KD students minus A's, paired by seed."""
import json

import pytest

from rekd.evaluate.compare import main


def write(folder, table, kd, ratios=(0.0, 0.3), baseline=(0.90, 0.80, 0.70), dataset="digits", epochs=16):
    """A reproduction folder as rekd.reproduce writes it: kd[ratio] holds each seed's KD test accuracy."""
    folder.mkdir()
    seeds = list(range(len(baseline)))
    config = {"mode": "baseline", "dataset": dataset, "arch": "tiny", "epochs": epochs}
    runs = [{"kind": "baseline", "seed": s, "prune_ratio": None, "variant": "", "test_acc": acc}
            for s, acc in zip(seeds, baseline)]
    for ratio, values in kd.items():
        runs += [{"kind": "kd", "seed": s, "prune_ratio": ratio, "variant": "", "test_acc": acc,
                  "teacher_test_acc": 0.5, "teacher_sparsity": ratio or 0.0} for s, acc in zip(seeds, values)]
    (folder / "runs.json").write_text(json.dumps({"table": table, "seeds": seeds, "runs": runs}))
    (folder / "plan.json").write_text(json.dumps({"table": table, "seeds": seeds, "prune_ratios": list(ratios),
                                                  "runs": [{"config": config}]}))
    return str(folder)


def test_the_difference_of_the_kd_students_is_paired_by_seed(tmp_path, capsys):
    a = write(tmp_path / "a", "table1", {0.0: (0.90, 0.80, 0.70), 0.3: (0.91, 0.81, 0.71)})
    # B's students: +1, +2, +3 points over A's at ratio 0 -> mean +2, sd 1, t(0.975, 2) = 4.303: [-0.48, +4.48].
    b = write(tmp_path / "b", "table1", {0.0: (0.91, 0.82, 0.73), 0.5: (0.5, 0.5, 0.5)}, ratios=(0.0, 0.5))
    assert main([a, b, "--names", "untuned,tuned"]) == 0
    out = capsys.readouterr().out
    assert "untuned: improvement [95% CI]" in out and "Baselines identical in both" in out
    rows = [line for line in out.splitlines() if line.startswith("| 0")]
    assert rows == ["| 0 | 80.00 | 80.00 | +0.00 [+0.00, +0.00] | 82.00 | +2.00 [-0.48, +4.48] | +2.00 [-0.48, +4.48] |"]


def test_table2_has_one_row_and_says_when_baselines_differ(tmp_path, capsys):
    a = write(tmp_path / "a", "table2", {None: (0.91, 0.81, 0.71)}, ratios=())
    b = write(tmp_path / "b", "table2", {None: (0.92, 0.82, 0.72)}, ratios=(), baseline=(0.9, 0.8, 0.6))
    assert main([a, b]) == 0
    out = capsys.readouterr().out
    assert "Baselines differ" in out and "| 80.00 / 76.67 | 81.00 |" in out
    assert "B − A (KD students)" in out and "+1.00 [+1.00, +1.00]" in out


@pytest.mark.parametrize("change,message", [
    ({"table": "table2"}, "A is table1 and B is table2; allowed: two reproductions of the same table"),
    ({"dataset": "ndigits"}, "A has dataset=digits and B dataset=ndigits"),
    ({"epochs": 8}, "A has epochs=16 and B epochs=8"),
    ({"ratios": (0.7,)}, "share no teacher prune ratio"),
    ({"missing": True}, "is not a finished reproduction"),
])
def test_reproductions_that_do_not_compare_are_one_line_exit_2(change, message, tmp_path, capsys):
    a = write(tmp_path / "a", "table1", {0.0: (0.9, 0.8, 0.7)}, ratios=(0.0,))
    if change.get("missing"):
        b = str(tmp_path / "nothing")
    else:
        table = change.get("table", "table1")
        ratios = change.get("ratios", (0.0,))
        b = write(tmp_path / "b", table, {(None if table == "table2" else ratios[0]): (0.9, 0.8, 0.7)},
                  ratios=() if table == "table2" else ratios, dataset=change.get("dataset", "digits"),
                  epochs=change.get("epochs", 16))
    assert main([a, b]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
