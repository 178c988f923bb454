"""rekd.evaluate.reproduce: the seed statistics against hand-computed values, the table layouts, the plan, bad input
(one line, exit 2, nothing written), and both tables end to end on digits with real Ray and MLflow."""
import csv
import dataclasses
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from rekd.evaluate import structure_table
from rekd.evaluate.reproduce import PAPER_RATIOS, build_parser, main, plan_from_args
from rekd.evaluate.tables import Row, csv_text, markdown, rows_from, summary_metrics
from rekd.stats import mean_std, paired, paired_ci
from processes import free_port, wait_for_line
from usage import assert_usage_error

ROOT = Path(__file__).resolve().parent.parent
# Two-sided 95% Student t quantiles from a printed table: 1 and 2 degrees of freedom.
T_975 = {1: 12.706, 2: 4.303}


# -- statistics ------------------------------------------------------------------------------------------
def test_mean_std_is_the_sample_deviation_and_zero_for_one_value():
    assert mean_std([1.0, 2.0, 3.0, 4.0]) == pytest.approx((2.5, math.sqrt(5 / 3)))
    assert mean_std([0.7]) == (0.7, 0.0)


def test_paired_ci_of_differences_1_2_3_matches_the_hand_computed_interval():
    # differences 1, 2, 3: mean 2, s = 1, n = 3 -> 2 +- 4.303 / sqrt(3) = 2 +- 2.484
    mean, low, high = paired_ci([11.0, 22.0, 33.0], [10.0, 20.0, 30.0])
    assert mean == pytest.approx(2.0)
    assert (low, high) == pytest.approx((2 - T_975[2] / math.sqrt(3), 2 + T_975[2] / math.sqrt(3)), abs=1e-3)
    assert (low, high) == pytest.approx((-0.4841, 4.4841), abs=1e-4)


def test_paired_ci_of_two_seeds_uses_one_degree_of_freedom():
    # differences 0.01, 0.03: mean 0.02, s = sqrt(2) * 0.01, half-width 12.706 * s / sqrt(2) = 0.12706
    mean, low, high = paired_ci([0.91, 0.93], [0.90, 0.90])
    assert mean == pytest.approx(0.02)
    assert (high - mean) == pytest.approx(T_975[1] * 0.01, abs=1e-4)
    assert (mean - low) == pytest.approx(high - mean)


def test_pairing_by_seed_narrows_the_interval_when_seeds_move_both_scores_together():
    student, kd = [0.80, 0.90, 0.95], [0.81, 0.91, 0.96]  # seeds differ a lot; every gain is +0.01
    mean, low, high = paired_ci(kd, student)
    assert (mean, low, high) == pytest.approx((0.01, 0.01, 0.01))
    assert paired(kd, student) == pytest.approx((0.01, 0.0))


def test_paired_ci_refuses_one_seed_and_unmatched_seeds():
    with pytest.raises(ValueError, match="at least 2"):
        paired_ci([0.9], [0.8])
    with pytest.raises(ValueError, match="one value per seed"):
        paired_ci([0.9, 0.8, 0.7], [0.8, 0.8])


def test_final_uses_the_shared_statistics():
    import rekd.evaluate.final

    assert rekd.evaluate.final.mean_std is mean_std and rekd.evaluate.final.paired is paired


# -- tables ----------------------------------------------------------------------------------------------
HAND_ROW = Row(0.3, student=(0.90, 0.92, 0.94), kd=(0.91, 0.94, 0.97), teacher=(0.80, 0.80, 0.80),
               teacher_sparsity=(0.3, 0.3, 0.3))


def test_table1_markdown_row_in_the_papers_layout_with_the_interval():
    text = markdown([HAND_ROW], "digits", "tiny", "caption")
    lines = text.splitlines()
    assert lines[0] == "caption"
    assert lines[2].startswith("| Dataset | SNN model | Teacher prune ratio | Teacher acc. (%) | Student SNN acc. (%) |")
    # student 92 +- 2, KD 94 +- 3, gains 1, 2, 3 points: +2 +- 1, CI 2 +- 2.484
    assert lines[4] == "| digits | tiny | 0.3 | 80.00 ± 0.00 | 92.00 ± 2.00 | 94.00 ± 3.00 | +2.00 ± 1.00 | [-0.48, +4.48] |"


def test_table2_markdown_has_no_teacher_columns():
    row = Row(None, student=HAND_ROW.student, kd=HAND_ROW.kd)
    lines = markdown([row], "ndigits", "tiny", "c").splitlines()
    assert "Teacher" not in lines[2]
    assert lines[4] == "| ndigits | tiny | 92.00 ± 2.00 | 94.00 ± 3.00 | +2.00 ± 1.00 | [-0.48, +4.48] |"


def test_csv_holds_every_mean_std_and_interval_in_percent_with_the_settings():
    rows = list(csv.DictReader(io.StringIO(csv_text([HAND_ROW], "digits", "tiny", {"temperature": 4.0, "alpha": 0.5}))))
    assert len(rows) == 1
    row = rows[0]
    assert row["prune_ratio"] == "0.3" and row["seeds"] == "3" and row["temperature"] == "4.0"
    assert float(row["teacher_sparsity_pct"]) == pytest.approx(30.0)
    assert float(row["kd_acc_mean_pct"]) == pytest.approx(94.0) and float(row["kd_acc_std_pct"]) == pytest.approx(3.0)
    assert float(row["improvement_mean_pct"]) == pytest.approx(2.0)
    assert float(row["improvement_ci_low_pct"]) == pytest.approx(-0.4841, abs=1e-4)
    assert float(row["improvement_ci_high_pct"]) == pytest.approx(4.4841, abs=1e-4)


def test_summary_metrics_are_fractions_keyed_by_ratio():
    metrics = summary_metrics([HAND_ROW])
    assert metrics["prune_0.3/improvement_mean"] == pytest.approx(0.02)
    assert metrics["prune_0.3/teacher_acc_mean"] == pytest.approx(0.80)
    assert summary_metrics([Row(None, (0.9, 0.9), (0.95, 0.97))])["kd_acc_mean"] == pytest.approx(0.96)


def test_rows_pair_each_seeds_kd_run_with_that_seeds_baseline():
    records = [{"kind": "baseline", "seed": s, "prune_ratio": None, "test_acc": 0.9 + s / 100} for s in (0, 1)]
    records += [{"kind": "kd", "seed": s, "prune_ratio": r, "test_acc": 0.5 + r + s / 100,
                 "teacher_test_acc": 0.8, "teacher_sparsity": r} for s in (1, 0) for r in (0.0, 0.5)]
    rows = rows_from(records, seeds=(0, 1), ratios=(0.0, 0.5))
    assert [r.prune_ratio for r in rows] == [0.0, 0.5]
    assert rows[1].student == (0.90, 0.91) and rows[1].kd == pytest.approx((1.00, 1.01))
    with pytest.raises(ValueError, match="expected one kd run of seed 0, prune ratio 0.3; found 0"):
        rows_from(records, seeds=(0, 1), ratios=(0.0, 0.3))


# -- the plan --------------------------------------------------------------------------------------------
def plan_for(argv, tmp_path):
    return plan_from_args(build_parser().parse_args([*argv, "--out", str(tmp_path / "out")]))


def test_table1_plan_defaults_to_the_papers_ratios_three_seeds_and_states_its_sources(tmp_path):
    plan = plan_for(["table1"], tmp_path)
    assert plan.ratios == PAPER_RATIOS == (0.0, 0.1, 0.3, 0.5, 0.7) and plan.seeds == (0, 1, 2)
    assert plan.kd_sources == {"temperature": "TrainConfig default", "alpha": "TrainConfig default",
                               "kd_reduction": "TrainConfig default"}
    assert plan.kd_settings["kd_reduction"] == "batchmean"  # Eq. 5 as written
    runs = plan.runs()
    assert len(runs) == 3 * (1 + 5)
    assert [r.kind for r in runs[:3]] == ["baseline"] * 3  # stage 1 first
    assert all(r.config.eval_test for r in runs)  # scored on the test split
    assert all(r.config.teacher_epochs == r.config.epochs == 8 for r in runs)  # the baseline is the teacher
    kd_runs = {(r.seed, r.config.prune_ratio) for r in runs if r.kind == "kd"}
    assert kd_runs == {(s, p) for s in range(3) for p in PAPER_RATIOS}
    assert plan.tracking_uri == f"sqlite:///{Path.cwd() / 'rekd-results' / 'mlflow.db'}"  # the folder's one store
    assert not (tmp_path / "out").exists()  # planning writes nothing


def test_smoke_test_keeps_every_ratio_and_shrinks_epochs(tmp_path):
    plan = plan_for(["table1", "--smoke-test"], tmp_path)
    assert plan.ratios == PAPER_RATIOS and len(plan.seeds) == 3 and plan.base.epochs == 2
    plan = plan_for(["table2", "--smoke-test", "--seeds", "3", "--dataset", "ndigits"], tmp_path)
    assert plan.ratios == () and plan.seeds == (0, 1, 2) and plan.base.timesteps == 8
    assert [(r.kind, r.config.mode) for r in plan.runs()] == [("baseline", "baseline")] * 3 + [("kd", "default_kd")] * 3


def test_distillation_settings_come_from_best_then_set(tmp_path):
    best = tmp_path / "best.yaml"
    best.write_text("configs:\n- settings: {mode: default_kd, confidence: 0.97, temperature: 2.5, alpha: 0.3}\n"
                    "- settings: {mode: default_kd, confidence: 0.91}\n")
    plan = plan_for(["table2", "--best", str(best)], tmp_path)
    assert plan.kd_settings == {"confidence": 0.97, "temperature": 2.5, "alpha": 0.3, "kd_reduction": "batchmean"}
    assert set(plan.kd_sources.values()) == {f"--best {best}"}
    assert "confidence=0.97 (--best" in plan.describe()
    plan = plan_for(["table2", "--best", str(best), "--set", "alpha=0.8", "--dataset", "ndigits"], tmp_path)
    assert plan.kd_settings["alpha"] == 0.8 and plan.kd_sources["alpha"] == "--set"
    assert plan.notes and "tuned on digits/tiny" in plan.notes[0]


def test_kd_reduction_comes_from_the_best_file_and_set_overrides_it(tmp_path):
    best = tmp_path / "best.yaml"
    best.write_text("configs:\n- settings: {mode: sparse_kd, temperature: 2.5, alpha: 0.3, kd_reduction: elementwise}\n")
    plan = plan_for(["table1", "--best", str(best)], tmp_path)
    assert plan.kd_settings["kd_reduction"] == "elementwise" and all(
        r.config.kd_reduction == "elementwise" for r in plan.runs())
    assert "kd_reduction=elementwise (--best" in plan.describe()
    plan = plan_for(["table1", "--set", "kd_reduction=elementwise"], tmp_path)
    assert plan.kd_sources["kd_reduction"] == "--set" and "temperature=4 (TrainConfig default)" in plan.describe()


def test_the_structure_plan_runs_each_sparse_student_beside_each_seeds_dense_baseline(tmp_path):
    plan = plan_for(["structure", "--sparsities", "0.5,0.9"], tmp_path)
    assert plan.ratios == (0.5,) and plan.seeds == (0, 1, 2)
    names = [name for name, _ in plan.variants]
    assert names == ["dense + KD", "gmp 0.5", "gmp 0.5 + KD", "gmp 0.9", "gmp 0.9 + KD", "rewire 0.5",
                     "rewire 0.5 + KD", "rewire 0.9", "rewire 0.9 + KD", "gmp 0.9 + KD, 2 generations"]
    runs = plan.runs()
    assert len(runs) == 3 * (1 + len(names)) and [r.kind for r in runs[:3]] == ["baseline"] * 3
    by_name = {r.variant: r.config for r in runs if r.seed == 1}
    assert by_name["gmp 0.9"].mode == "baseline" and by_name["gmp 0.9"].target_sparsity == 0.9  # no teacher
    assert by_name["rewire 0.5 + KD"].mode == "sparse_kd" and by_name["rewire 0.5 + KD"].prune_ratio == 0.5
    assert by_name["gmp 0.9 + KD, 2 generations"].generations == 2 and by_name["dense + KD"].structure == "dense"
    assert all(r.config.eval_test and r.config.seed == r.seed for r in runs)
    assert len({r.key for r in runs}) == len(runs)


def test_structure_rows_pair_each_student_with_the_dense_baseline_of_its_seed():
    costs = {"density": 1.0, "connections": 100.0, "sops": 1000.0, "energy_uj": 1.0}
    records = [{"kind": "baseline", "seed": s, "variant": "", "test_acc": 0.90 + s / 100, **costs} for s in (0, 1, 2)]
    sparse = {"density": 0.2, "connections": 30.0, "sops": 300.0, "energy_uj": 0.4}
    records += [{"kind": "kd", "seed": s, "variant": "gmp 0.8", "test_acc": 0.88 + s / 100 + (s == 2) / 100, **sparse}
                for s in (2, 0, 1)]
    rows = structure_table.rows(records, (0, 1, 2), [("gmp 0.8", {"mode": "baseline"})], 0.5)
    assert [r.name for r in rows] == ["dense baseline", "gmp 0.8"]
    n = rows[1].numbers()
    # differences by seed: -2, -2, -1 points: mean -1.667, std 0.577, t(0.975, 2) = 4.303
    assert n["delta_mean"] == pytest.approx(-5 / 3) and n["delta_std"] == pytest.approx(0.57735, abs=1e-4)
    assert n["delta_ci_low"] == pytest.approx(-5 / 3 - 4.3027 * 0.57735 / 3 ** 0.5, abs=1e-3)
    assert n["density"] == pytest.approx(0.2) and n["sops"] == pytest.approx(300.0)
    assert "delta_mean" not in rows[0].numbers() and rows[1].teacher == "none"
    table = structure_table.markdown(rows, "caption")
    assert "| gmp 0.8 | none | 20.0 | 30 | 89.33 ± 1.53 | -1.67 ± 0.58 |" in table
    metrics = structure_table.summary_metrics(rows)
    assert metrics["gmp_0.8/delta_mean"] == pytest.approx(-5 / 300) and metrics["gmp_0.8/density"] == pytest.approx(0.2)
    named = structure_table.summary_metrics([rows[0], dataclasses.replace(rows[1], name="gmp 0.8 + KD, 2 generations")])
    assert "gmp_0.8_kd/2_generations/acc_mean" in named


# -- bad input -------------------------------------------------------------------------------------------
closed_port = free_port  # nothing listens there once the socket is closed


BAD = [
    (["table3"], "invalid choice: 'table3'"),
    (["table1", "--dataset", "mnist"], "unknown dataset 'mnist'; allowed: cifar100, digits, dvsgesture, ndigits"),
    (["table1", "--arch", "alexnet"], "unknown arch 'alexnet'"),
    (["table1", "--seeds", "2"], "--seeds 2 is not allowed; allowed: an integer >= 3"),
    (["table2", "--seeds", "0"], "--seeds 0 is not allowed"),
    (["table1", "--epochs", "0"], "--epochs 0 is not allowed; allowed: an integer >= 1"),
    (["table1", "--ratios", "0,1.2"], "'1.2' is not allowed; allowed: comma-separated numbers 0 <= r < 1"),
    (["table1", "--ratios", "0,half"], "'half' is not allowed"),
    (["table1", "--ratios", "0.1,0.1"], "0.1 appears twice"),
    (["table2", "--ratios", "0.1"], "table2 has no teacher to prune"),
    (["structure", "--ratios", "0.1,0.5"], "the structure table has one teacher; allowed: one ratio"),
    (["structure", "--sparsities", "0.5,1"], "'1' is not allowed; allowed: comma-separated numbers 0 < s < 1"),
    (["table1", "--sparsities", "0.5"], "table1 has no sparse students"),
    (["structure", "--set", "generations=3"], "the protocol sets generations itself"),
    (["table1", "--set", "prune_ratio=0.2"], "the protocol sets prune_ratio itself"),
    (["table1", "--set", "colour=blue"], "expected key=value with key one of"),
    (["table2", "--set", "confidence=0.05"], "allowed: 1/10 < confidence < 1"),
    (["table1", "--out", "{ws}/a-file/results"], "cannot be written"),
    (["table1", "--best", "{ws}/list.yaml"], "expected a mapping"),
    (["table1", "--best", "{ws}/nothing.yaml"], "cannot be read"),
    (["table1", "--best", "{ws}/default_kd.yaml"], "holds default_kd configs; allowed: the best file of a sparse_kd"),
    (["table1", "--dataset", "cifar100", "--data-root", "{ws}/empty"], "cifar100: expected"),
    (["table2", "--tracking-uri", "http://127.0.0.1:{closed}"], "cannot be used"),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("reproduce-bad")
    (ws / "list.yaml").write_text("- 1\n")
    (ws / "default_kd.yaml").write_text("configs:\n- settings: {mode: default_kd}\n")
    (ws / "a-file").write_text("")
    (ws / "empty").mkdir()
    return ws


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv, message, workspace, tmp_path, capsys):
    argv = [a.replace("{ws}", str(workspace)).replace("{closed}", str(closed_port())) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]  # the default MLflow store would be created in there
    before = sorted(p.name for p in workspace.rglob("*"))
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    assert_usage_error(code, out, err, message)
    assert list(tmp_path.iterdir()) == [] and sorted(p.name for p in workspace.rglob("*")) == before


def test_a_failure_after_the_parent_run_opened_leaves_it_failed(tmp_path, monkeypatch):
    import rekd.evaluate.reproduce_run

    def broken(*args):
        raise RuntimeError("a task failed")

    monkeypatch.setattr(rekd.evaluate.reproduce_run, "run_tasks", broken)  # the driver's bookkeeping, without Ray
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(RuntimeError, match="a task failed"):
        main(["table2", "--out", str(tmp_path / "out"), "--tracking-uri", uri])
    _, parent, children = tracked(uri, "rekd-reproduce")
    assert parent.info.status == "FAILED" and children == []
    [folder] = (tmp_path / "out").iterdir()  # no table from a failed reproduction, only its log
    assert [p.name for p in folder.iterdir()] == ["driver.log"]


# -- end to end ------------------------------------------------------------------------------------------
def reproduce(table: str, tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, Path, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    proc = subprocess.run([sys.executable, "-m", "rekd.reproduce", table, "--smoke-test", *extra, "--out",
                           str(tmp_path / "out"), "--tracking-uri", uri],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [folder] = (tmp_path / "out").iterdir()
    return proc, folder, uri


def tracked(uri: str, experiment: str = "rekd-reproduce-smoke") -> tuple:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(experiment)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    [parent] = [r for r in runs if r.data.tags.get("rekd.role") == "reproduce"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return client, parent, children


@pytest.mark.slow
def test_table1_smoke_end_to_end(tmp_path):
    proc, folder, uri = reproduce("table1", tmp_path)
    assert {"table.md", "table.csv", "accuracy.png", "runs.json", "plan.json"} <= {p.name for p in folder.iterdir()}
    assert (folder / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((folder / "table.csv").open()))
    assert [float(r["prune_ratio"]) for r in rows] == list(PAPER_RATIOS)
    for row in rows:
        assert row["seeds"] == "3"
        for column in ("teacher_acc", "student_acc", "kd_acc", "improvement"):
            assert f"{column}_mean_pct" in row and f"{column}_std_pct" in row
        low, mean, high = (float(row[f"improvement_{k}_pct"]) for k in ("ci_low", "mean", "ci_high"))
        assert low <= mean <= high
    assert "temperature=4 (TrainConfig default), alpha=0.5 (TrainConfig default)" in proc.stdout
    assert "table1 seed 1 prune 0.3: kd test_acc=" in proc.stdout and "(18/18 done)" in proc.stdout

    runs = json.loads((folder / "runs.json").read_text())["runs"]
    for seed in range(3):  # the unpruned teacher is that seed's baseline: the same test accuracy
        baseline = next(r for r in runs if r["kind"] == "baseline" and r["seed"] == seed)
        unpruned = next(r for r in runs if r["kind"] == "kd" and r["seed"] == seed and r["prune_ratio"] == 0.0)
        assert unpruned["teacher_test_acc"] == pytest.approx(baseline["test_acc"], abs=1.01 / 360)
        assert unpruned["teacher_sparsity"] == 0.0
    sparsity = [r["teacher_sparsity"] for r in runs if r["seed"] == 0 and r["kind"] == "kd"]
    assert sparsity == pytest.approx(PAPER_RATIOS, abs=0.01)

    client, parent, children = tracked(uri)
    assert parent.info.status == "FINISHED" and parent.data.params["prune_ratios"] == "0,0.1,0.3,0.5,0.7"
    assert parent.data.params["source.temperature"] == "TrainConfig default" and "rekd.code_version" in parent.data.tags
    assert len(children) == 3 * 6 and {c.info.status for c in children} == {"FINISHED"}
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "reproduce")} >= {
        "reproduce/table.md", "reproduce/table.csv", "reproduce/accuracy.png", "reproduce/runs.json"}
    kd = next(c for c in children if c.data.tags.get("rekd.prune_ratio") == "0.5")
    assert kd.data.params["prune_ratio"] == "0.5" and kd.data.params["eval_test"] == "True"
    assert len(client.get_metric_history(kd.info.run_id, "val_acc")) == 2  # one point per epoch
    assert "teacher_test_acc" in kd.data.metrics and "final_test_acc" in kd.data.metrics


@pytest.mark.slow
def test_table2_smoke_end_to_end(tmp_path):
    proc, folder, uri = reproduce("table2", tmp_path)
    assert {p.name for p in folder.iterdir()} == {"table.md", "table.csv", "runs.json", "plan.json", "driver.log"}
    [row] = list(csv.DictReader((folder / "table.csv").open()))
    assert row["confidence"] == "0.95" and row["seeds"] == "3"
    low, mean, high = (float(row[f"improvement_{k}_pct"]) for k in ("ci_low", "mean", "ci_high"))
    assert low <= mean <= high
    assert "confidence=0.95 (TrainConfig default)" in (folder / "table.md").read_text()
    plan = json.loads((folder / "plan.json").read_text())
    assert plan["seeds"] == [0, 1, 2] and plan["provenance"]["code_version"]
    assert [r["config"]["mode"] for r in plan["runs"]] == ["baseline"] * 3 + ["default_kd"] * 3
    _, parent, children = tracked(uri)
    assert parent.info.status == "FINISHED" and parent.data.params["confidence"] == "0.95"
    assert len(children) == 3 * 2 and {c.info.status for c in children} == {"FINISHED"}
    assert sorted(c.data.tags["rekd.kind"] for c in children) == ["baseline"] * 3 + ["kd"] * 3


@pytest.mark.slow
def test_structure_smoke_end_to_end(tmp_path):
    proc, folder, uri = reproduce("structure", tmp_path, "--sparsities", "0.8")
    assert {"table.md", "table.csv", "accuracy.png", "runs.json", "plan.json"} <= {p.name for p in folder.iterdir()}
    assert (folder / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {r["student"]: r for r in csv.DictReader((folder / "table.csv").open())}
    assert list(rows) == ["dense baseline", "dense + KD", "gmp 0.8", "gmp 0.8 + KD", "rewire 0.8", "rewire 0.8 + KD",
                          "gmp 0.8 + KD, 2 generations"]
    assert float(rows["dense baseline"]["density"]) == 1.0 and rows["dense baseline"]["delta_mean"] == ""
    for name in ("gmp 0.8", "rewire 0.8 + KD", "gmp 0.8 + KD, 2 generations"):
        assert float(rows[name]["density"]) == pytest.approx(0.2, abs=1e-3)
        assert float(rows[name]["sops"]) < float(rows["dense baseline"]["sops"])  # live synapses only
        low, mean, high = (float(rows[name][f"delta_{k}"]) for k in ("ci_low", "mean", "ci_high"))
        assert low <= mean <= high
    assert "(21/21 done)" in proc.stdout
    client, parent, children = tracked(uri)
    assert parent.info.status == "FINISHED" and len(children) == 21
    generations = [c for c in children if c.data.tags.get("rekd.variant") == "gmp 0.8 + KD, 2 generations"]
    assert len(generations) == 3 and generations[0].data.params["generations"] == "2"
    assert [m.step for m in client.get_metric_history(generations[0].info.run_id, "density")] == [1, 2, 3, 4]
    assert "gmp_0.8_kd/2_generations/delta_mean" in parent.data.metrics


@pytest.mark.slow
def test_sigterm_ends_a_reproduction_killed_with_status_143_and_no_table(tmp_path):
    """`ray job stop` (SIGTERM) to a reproduction: its runs end KILLED, not RUNNING, and not as Ray's own
    handler would end it (exit at once, status 15); no table is written from half of the runs."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    proc = subprocess.Popen([sys.executable, "-m", "rekd.reproduce", "table2", "--epochs", "300",
                             "--out", str(tmp_path / "out"), "--tracking-uri", uri],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for_line(proc, "training runs as Ray tasks", timeout=240)
        time.sleep(3)  # into the tasks
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1] == "python -m rekd.reproduce: interrupted (SIGTERM)" and "Traceback" not in err
    _, parent, children = tracked(uri, "rekd-reproduce")
    assert parent.info.status == "KILLED" and children and {c.info.status for c in children} == {"KILLED"}
    [folder] = (tmp_path / "out").iterdir()
    assert not {"table.md", "table.csv", "runs.json"} & {p.name for p in folder.iterdir()}

