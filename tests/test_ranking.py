"""One ranking rule: the search's summary (and so its rekd.best_trial tag), rekd.evaluate.best and what rekd.evaluate.final and
rekd.evaluate.reproduce --best take from its file all name the same best trial, ties included."""
import math
import shlex
from types import SimpleNamespace

import optuna
import pytest
import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Result

from rekd.evaluate.best import main as best_main
from rekd.evaluate.final import load_configs
from rekd.search.ranking import rank_key
from rekd.evaluate.reproduce import best_config
from rekd.search.report import best_command, summarize
from rekd.search.study import load_study
from rekd.tracking.tune_callback import MlflowTrialTracker

# (trial id, outcome, val_acc, confidence): three trials tie at the top, created in an order that is
# neither the id order nor its reverse; a stopped trial has a higher value from a shorter budget.
TRIALS = [("c3", "completed", 0.9931, 0.91), ("e5", "stopped_early", 0.9990, 0.95), ("a1", "completed", 0.9931, 0.92),
          ("d4", "completed", 0.9861, 0.93), ("b2", "completed", 0.9931, 0.94), ("f6", "errored", math.nan, 0.96)]
EXPECTED = ["a1", "b2", "c3", "d4", "e5", "f6"]


def test_rank_key_puts_full_budget_first_then_the_metric_then_the_smaller_trial_id():
    ranked = sorted(TRIALS, key=lambda t: rank_key(t[1], t[2], t[0], "max"))
    assert [t[0] for t in ranked] == EXPECTED
    lowest = sorted([("b", "completed", 0.2), ("a", "completed", 0.2), ("c", "completed", 0.1)],
                    key=lambda t: rank_key(t[1], t[2], t[0], "min"))
    assert [t[0] for t in lowest] == ["c", "a", "b"]
    with pytest.raises(ValueError):
        rank_key("completed", 0.5, "a", "maximize")


def test_the_search_summary_and_rekd_best_name_the_same_best_trial_among_ties(tmp_path, capsys, monkeypatch):
    study = load_study("default_kd").smoke()
    epochs = study.epochs
    optuna.create_study(study_name="tied", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    results = [Result(metrics={"trial_id": tid, "epoch": epochs if outcome != "stopped_early" else 1,
                               "config": {"confidence": conf, "temperature": 4.0, "alpha": 0.5},
                               **({"val_acc": value} if math.isfinite(value) else {})},
                      checkpoint=None, error=RuntimeError("x") if outcome == "errored" else None,
                      path=str(tmp_path / f"trial_{tid}"))
               for tid, outcome, value, conf in TRIALS]
    plan = SimpleNamespace(study=study, name="tied")
    summary = summarize(plan, results, f"sqlite:///{tmp_path / 'optuna.db'}", tmp_path)
    assert summary.best.trial_id == "a1"  # what the driver prints and tags as rekd.best_trial

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("rekd-default_kd", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(experiment_id, run_name="tied", tags={"rekd.role": "search", "rekd.search": "tied",
                                                                      "rekd.outcome": "finished"})
    client.log_batch(parent.info.run_id, params=[Param("metric", "val_acc"), Param("mode", "max"),
                                                 Param("num_samples", "6"), Param("space.confidence", "uniform")],
                     tags=[RunTag("rekd.best_trial", summary.best.trial_id)])
    tracker = MlflowTrialTracker(uri, experiment_id, parent.info.run_id, "tied", epochs)
    for tid, outcome, value, conf in TRIALS:
        child = client.create_run(experiment_id, run_name=f"trial-{tid}", tags={
            "mlflow.parentRunId": parent.info.run_id, "rekd.role": "trial", "rekd.trial_id": tid, "rekd.outcome": outcome})
        metrics = [Metric("val_acc", value, 0, 2)] if math.isfinite(value) else []
        client.log_batch(child.info.run_id, metrics=metrics, params=[
            Param("mode", "default_kd"), Param("confidence", str(conf)), Param("epochs", str(epochs))])
        tracker.runs[tid] = child.info.run_id
    summary.log_to(tracker, final=True)  # as the driver does: the summary onto the parent, a rank onto each trial
    assert tracker.close(timeout=30) == []
    children = client.search_runs([experiment_id], filter_string="tags.`rekd.role` = 'trial'")
    # MLflow's runs table sorted by `rank` (the link a search prints) shows rekd's order
    assert [c.data.tags["rekd.trial_id"] for c in sorted(children, key=lambda c: c.data.metrics["rank"])] == EXPECTED
    out = tmp_path / "best.yaml"
    assert best_main(["rekd-default_kd", "--tracking-uri", uri, "--top", "5", "--out", str(out),
                      "--include-stopped"]) == 0
    printed = capsys.readouterr().out
    assert "search tied (the newest in experiment 'rekd-default_kd'" in printed and "6 trials, finished" in printed
    document = yaml.safe_load(out.read_text())
    assert [c["trial_id"] for c in document["configs"]] == EXPECTED[:5]
    assert document["configs"][0]["trial_id"] == client.get_run(parent.info.run_id).data.tags["rekd.best_trial"]
    assert "smaller trial id" in document["ranked_by"]
    # rekd.evaluate.final trains the file's configs in its order; rekd.evaluate.reproduce --best takes its first
    _, configs = load_configs(str(out), None)
    assert configs[0].confidence == pytest.approx(0.92)
    assert best_config(str(out), "default_kd").confidence == pytest.approx(0.92)
    # The rekd.evaluate.best command the search prints runs as printed from another folder, the default store too
    words = shlex.split(best_command(SimpleNamespace(experiment="rekd-default_kd", tracking_uri=uri, study=study)))
    assert words[1:3] == ["-m", "rekd.best"] and words[-2:] == ["--tracking-uri", uri]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert best_main(words[3:]) == 0 and (elsewhere / "best.yaml").is_file()
    # and the rekd.final command it prints names that file wherever it is run from
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.endswith(f"-m rekd.final {elsewhere / 'best.yaml'} --seeds 3"), printed
