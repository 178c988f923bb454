"""Picking from a Pareto front: `rekd.best --pareto` writes exactly the non-dominated full-budget trials of a
search with several objectives, in the Pareto rule's order; `--top` on such a search ranks by that rule; a
single-objective search reads as before; and `rekd.final` on a front reports every objective over seeds
and whether each point stays non-dominated. The searches are real MLflow stores shaped as the driver
writes them."""
import json
import math
import re

import pytest
import yaml
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from rekd.cli import python_command
from rekd.config import TrainConfig
from rekd.evaluate.best import main as best_main
from rekd.evaluate.final import main as final_main
from rekd.search.pareto import dominates
from rekd.search.ranking import PARETO_RULE, RULE
from rekd.tracking.runs import flat_params
from usage import assert_usage_error, run_command

EXPERIMENT = "rekd-sparse_kd"
TWO = "val_acc:max,energy_uj:min"
# (trial id, outcome, val_acc, energy_uj, prune_ratio, alpha), created in neither id order nor its reverse.
# On the front of the completed trials: t1 (least energy), t3 (most accurate), t2 between them. t4 is
# dominated by t2; t5 would dominate everything but ASHA stopped it; t6 has the least energy but a NaN
# accuracy; t7 errored.
TRIALS = [("t3", "completed", 0.97, 4.0, 0.3, 0.7), ("t6", "completed", math.nan, 0.1, 0.6, 0.2),
          ("t1", "completed", 0.90, 1.0, 0.1, 0.5), ("t5", "stopped_early", 0.99, 0.5, 0.5, 0.4),
          ("t4", "completed", 0.92, 3.0, 0.4, 0.6), ("t7", "errored", 0.98, 0.2, 0.7, 0.1),
          ("t2", "completed", 0.95, 2.0, 0.2, 0.3)]
FRONT = ["t1", "t3", "t2"]  # extremes first (infinite crowding distance, then the smaller id), then t2


def make_search(tmp_path, trials, objectives=TWO, cache_dir=None) -> str:
    """A finished search in a SQLite store: the parent run and one child run per trial, as the driver logs
    them (objectives=None: a search made before there could be several objectives)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    (tmp_path / "artifacts").mkdir()  # as rekd's store makes it: rekd.final's tables go there
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment_id, run_name="front", tags={
        "rekd.role": "search", "rekd.search": "front", "rekd.outcome": "finished"}).info.run_id
    params = [Param("metric", "val_acc"), Param("mode", "max"), Param("num_samples", str(len(trials))),
              Param("space.prune_ratio", "uniform"), Param("space.alpha", "uniform")]
    client.log_batch(parent, params=params + ([Param("objectives", objectives)] if objectives else []))
    for trial_id, outcome, val_acc, energy, prune_ratio, alpha in trials:
        child = client.create_run(experiment_id, run_name=f"trial-{trial_id}", tags={
            "mlflow.parentRunId": parent, "rekd.role": "trial", "rekd.trial_id": trial_id,
            "rekd.outcome": outcome}).info.run_id
        cfg = TrainConfig(dataset="digits", arch="tiny", mode="sparse_kd", epochs=1, teacher_epochs=1,
                          prune_ratio=prune_ratio, alpha=alpha, **({"cache_dir": cache_dir} if cache_dir else {}))
        last = cfg.epochs
        client.log_batch(child, params=flat_params(cfg.to_dict()), metrics=[
            Metric("val_acc", val_acc, 0, last), Metric("energy_uj", energy, 0, last),
            Metric("train_loss", 1.0, 0, last)])
    return uri


def best(argv, capsys):
    capsys.readouterr()  # what MLflow said while the store was made is not the command's output
    return run_command(best_main, argv, capsys)


def test_pareto_writes_exactly_the_full_budget_front_in_the_pareto_rule_order(tmp_path, capsys):
    uri, out = make_search(tmp_path, TRIALS), tmp_path / "front.yaml"
    code, printed, err = best([EXPERIMENT, "--pareto", "--out", str(out), "--tracking-uri", uri], capsys)
    assert code == 0, err
    document = yaml.safe_load(out.read_text())
    assert [c["trial_id"] for c in document["configs"]] == FRONT
    assert document["pareto"] is True and document["objectives"] == [
        {"metric": "val_acc", "mode": "max"}, {"metric": "energy_uj", "mode": "min"}]
    assert (document["metric"], document["mode"], document["searched"]) == ("val_acc", "max", ["alpha", "prune_ratio"])
    assert document["tracking_uri"] == uri and "Pareto front" in document["ranked_by"]
    by_id = {t[0]: t for t in TRIALS}
    for rank, c in enumerate(document["configs"], start=1):
        _, outcome, val_acc, energy, prune_ratio, alpha = by_id[c["trial_id"]]
        assert c["rank"] == rank and c["outcome"] == outcome == "completed"
        assert c["val_acc"] == val_acc and c["objectives"] == {"val_acc": val_acc, "energy_uj": energy}
        assert (c["settings"]["prune_ratio"], c["settings"]["alpha"]) == (prune_ratio, alpha)
        assert TrainConfig.from_dict(c["settings"]).mode == "sparse_kd"
    lines = printed.splitlines()
    assert lines[1:4] == ["#1 val_acc=0.9 energy_uj=1 trial t1: alpha=0.5, prune_ratio=0.1",
                          "#2 val_acc=0.97 energy_uj=4 trial t3: alpha=0.7, prune_ratio=0.3",
                          "#3 val_acc=0.95 energy_uj=2 trial t2: alpha=0.3, prune_ratio=0.2"]
    assert lines[4] == (f"wrote 3 configuration(s) of the Pareto front of search front to {out}; "
                        f"next: {python_command()} -m rekd.final {out} --seeds 3")


@pytest.mark.parametrize("trials,objectives,extra,message", [
    (TRIALS, TWO, ["--include-stopped"], "drop --include-stopped"),
    (TRIALS, TWO, ["--top", "3"], "--pareto writes the whole Pareto front, however many points it has; drop --top 3"),
    (TRIALS, None, [], "has one objective, val_acc (max): it has no Pareto front; --top ranks its trials by val_acc"),
    (TRIALS, "val_acc:max", [], "has one objective, val_acc (max)"),
    ([t for t in TRIALS if t[0] in ("t5", "t6")], TWO, [], "no completed trial with every objective finite"),
])
def test_pareto_refuses_what_has_no_full_budget_front_in_one_line_and_writes_nothing(
        trials, objectives, extra, message, tmp_path, capsys):
    uri, out = make_search(tmp_path, trials, objectives), tmp_path / "front.yaml"
    code, printed, err = best([EXPERIMENT, "--pareto", *extra, "--out", str(out), "--tracking-uri", uri], capsys)
    assert_usage_error(code, printed, err, message)
    assert list(tmp_path.glob("*.yaml")) == [] and list(tmp_path.glob(".*.tmp")) == []


def test_a_search_with_several_objectives_ranks_its_top_trials_by_front_then_crowding_without_pareto(tmp_path, capsys):
    uri, out = make_search(tmp_path, TRIALS), tmp_path / "best.yaml"
    code, printed, err = best([EXPERIMENT, "--top", "5", "--out", str(out), "--tracking-uri", uri], capsys)
    assert code == 0, err
    document = yaml.safe_load(out.read_text())
    assert document["ranked_by"] == PARETO_RULE and document["pareto"] is False
    # front 1 by crowding distance, then t4 (dominated by t2), then the NaN point in a front of its own
    assert [(c["trial_id"], c["front"]) for c in document["configs"]] == [
        ("t1", 1), ("t3", 1), ("t2", 1), ("t4", 2), ("t6", 3)]
    assert "note: search front has 2 objectives" in printed and "--pareto writes the whole front" in printed
    assert "#4 front 2 val_acc=0.92 energy_uj=3 trial t4: alpha=0.6, prune_ratio=0.4" in printed
    # The stopped trial comes after every full-budget one, whatever its values
    code, _, err = best([EXPERIMENT, "--top", "10", "--include-stopped", "--out", str(out), "--tracking-uri", uri], capsys)
    assert code == 0, err
    assert [c["trial_id"] for c in yaml.safe_load(out.read_text())["configs"]] == FRONT + ["t4", "t6", "t5"]


@pytest.mark.parametrize("objectives", [None, "val_acc:max"])
def test_a_single_objective_search_is_ranked_and_written_as_before(objectives, tmp_path, capsys):
    uri, out = make_search(tmp_path, TRIALS, objectives), tmp_path / "best.yaml"
    code, printed, err = best([EXPERIMENT, "--out", str(out), "--tracking-uri", uri], capsys)
    assert code == 0, err
    document = yaml.safe_load(out.read_text())
    assert list(document) == ["experiment", "search", "parent_run_id", "tracking_uri", "metric", "mode", "searched",
                              "ranked_by", "configs"]
    assert document["ranked_by"] == RULE
    assert [(c["trial_id"], c["val_acc"]) for c in document["configs"]] == [("t3", 0.97), ("t2", 0.95), ("t4", 0.92)]
    assert list(document["configs"][0]) == ["rank", "run_id", "trial_id", "val_acc", "outcome", "settings"]
    assert "#1 val_acc=0.9700 trial t3: alpha=0.7, prune_ratio=0.3" in printed and "note:" not in printed


@pytest.mark.parametrize("objectives,message", [
    ("[{metric: val_loss, mode: max}, {metric: energy_uj, mode: min}]", "objectives[0]: {'metric': 'val_loss'"),
    ("[{metric: val_acc, mode: max}, {metric: energy_uj, mode: lowest}]", "objectives[1]:"),
    ("val_acc", "objectives: expected a list"),
])
def test_final_refuses_a_front_file_with_unknown_objectives_before_it_trains(objectives, message, tmp_path, capsys):
    path = tmp_path / "front.yaml"
    path.write_text(f"objectives: {objectives}\nconfigs:\n- settings: {{mode: sparse_kd}}\n")
    code = final_main([str(path), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert_usage_error(code, captured.out, captured.err, message)
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.db").exists()


def test_final_on_a_front_reports_every_objective_over_seeds_and_which_points_stay_non_dominated(
        tmp_path, capsys, cache_dir):
    trials = [t for t in TRIALS if t[0] in ("t1", "t2", "t4")]  # front: t1 and t2
    uri, front = make_search(tmp_path, trials, cache_dir=cache_dir), tmp_path / "front.yaml"
    assert best([EXPERIMENT, "--pareto", "--out", str(front), "--tracking-uri", uri], capsys)[0] == 0
    out_dir = tmp_path / "out"
    code = final_main([str(front), "--seeds", "2", "--out", str(out_dir)])  # the store: the file's tracking_uri
    printed, err = capsys.readouterr()
    assert code == 0 and "refused" not in err, printed + err
    assert "SOPs and energy per sample over the validation split" in printed
    assert "| config | trial | test_acc (max) | energy_uj (min) | non-dominated |" in printed
    rows = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ")
            for line in printed.split("non-dominated |")[-1].splitlines() if line.startswith("| #")}
    assert list(rows) == ["#1 sparse_kd", "#2 sparse_kd"]
    [results_file] = out_dir.glob("final-*.json")
    results = json.loads(results_file.read_text())
    assert results["objectives"] == [{"metric": "val_acc", "mode": "max", "final": "test_acc"},
                                     {"metric": "energy_uj", "mode": "min", "final": "energy_uj"}]
    points = results["points"]
    for label, trial_id in (("#1 sparse_kd", "t1"), ("#2 sparse_kd", "t2")):
        point, row = points[label], rows[label]
        assert point["trial_id"] == trial_id == row[1]
        # the same runs as the accuracy and cost table: test accuracy and the last epoch's energy, per seed
        assert point["test_acc"]["values"] == results["test_acc"][label]
        assert point["energy_uj"]["values"] == [c["energy_uj"] for c in results["costs"][label]]
        for key in ("test_acc", "energy_uj"):
            values = point[key]["values"]
            assert len(values) == 2 and point[key]["mean"] == pytest.approx(sum(values) / 2)
            assert point[key]["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
        assert re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d %", row[2]) and row[2].startswith(f"{100 * point['test_acc']['mean']:.2f} ± ")
        assert re.fullmatch(r"\S+ ± \S+", row[3]) and float(row[3].split(" ± ")[0]) == pytest.approx(
            point["energy_uj"]["mean"], rel=1e-3)
        assert row[4] == ("yes" if point["non_dominated"] else "no")
    means = {label: (-p["test_acc"]["mean"], p["energy_uj"]["mean"]) for label, p in points.items()}
    one, two = means["#1 sparse_kd"], means["#2 sparse_kd"]
    assert points["#1 sparse_kd"]["non_dominated"] == (not dominates(two, one))
    assert points["#2 sparse_kd"]["non_dominated"] == (not dominates(one, two))
    client = MlflowClient(uri)
    [parent] = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id],
                                  filter_string="tags.`rekd.role` = 'final'")
    metrics = parent.data.metrics
    assert metrics["config2_sparse_kd/energy_uj_std"] == pytest.approx(points["#2 sparse_kd"]["energy_uj"]["std"])
    assert metrics["config1_sparse_kd/non_dominated"] == float(points["#1 sparse_kd"]["non_dominated"])
    assert sorted(a.path for a in client.list_artifacts(parent.info.run_id, "final")) == [
        f"final/{p.name}" for p in sorted(out_dir.glob("final-*.*"))]
    assert "| #2 sparse_kd | t2 | " in next(out_dir.glob("final-*.md")).read_text()
