"""The MLflow tracker on a real (sqlite) store: every result arrives, in order, gathered into few calls."""
from types import SimpleNamespace

from rekd.tracking.runs import client_for
from rekd.tracking.tags import OUTCOME_TAG
from rekd.tracking.store import ensure_experiment
from rekd.tracking.tune_callback import MlflowTrialTracker


def test_a_search_s_results_reach_mlflow_complete_and_in_far_fewer_calls_than_epochs(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = client_for(uri)
    experiment_id = ensure_experiment(client, "tracking")
    parent = client.create_run(experiment_id).info.run_id
    tracker = MlflowTrialTracker(uri, experiment_id, parent, "search", epochs=20)
    calls = []
    log_batch = client.log_batch
    client.log_batch = lambda *args, **kwargs: (calls.append(args[0]), log_batch(*args, **kwargs))[1]
    tracker._client = client  # the same store, with its calls counted

    trials = [SimpleNamespace(trial_id=f"t{i}", config={"lr": 0.1 * (i + 1)}, last_result=None) for i in range(2)]
    for trial in trials:
        tracker.on_trial_start(0, trials, trial)
    for epoch in range(1, 21):  # two trials reporting in turn, as Tune calls the callback
        for trial in trials:
            trial.last_result = {"epoch": epoch, "val_acc": epoch / 20 + int(trial.trial_id[1]), "timestamp": 100 + epoch}
            tracker.on_trial_result(0, trials, trial, trial.last_result)
    for trial in trials:
        tracker.on_trial_complete(0, trials, trial)
    assert tracker.close(timeout=30) == []

    for i, trial in enumerate(trials):
        run_id = tracker.runs[trial.trial_id]
        history = client.get_metric_history(run_id, "val_acc")
        assert [(m.step, m.value) for m in history] == [(e, e / 20 + i) for e in range(1, 21)]
        run = client.get_run(run_id)
        assert run.data.params["lr"] == str(0.1 * (i + 1)) and run.data.tags[OUTCOME_TAG] == "completed"
        assert run.info.status == "FINISHED"
    assert len(calls) <= 6  # 2 x (params, metrics, outcome) instead of 2 x (1 + 20 + 1)


def test_an_experiment_created_by_another_search_in_the_meantime_is_used(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = client_for(uri)
    get = client.get_experiment_by_name
    other = client_for(uri)
    looked = []

    def look_then_lose_the_race(name):  # the other search creates it right after this look
        found = get(name)
        if not looked:
            looked.append(name)
            other.create_experiment(name)
        return found

    client.get_experiment_by_name = look_then_lose_the_race
    experiment_id = ensure_experiment(client, "shared")
    assert experiment_id == other.get_experiment_by_name("shared").experiment_id


def test_a_call_the_store_refuses_for_good_is_dropped_and_the_rest_of_its_batch_still_arrives(tmp_path):
    import time

    from mlflow.entities import Metric, Param

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = client_for(uri)
    experiment_id = ensure_experiment(client, "tracking")
    parent = client.create_run(experiment_id).info.run_id
    client.log_param(parent, "best.alpha", "0.1")  # logged by an earlier, interrupted driver
    tracker = MlflowTrialTracker(uri, experiment_id, parent, "search", epochs=2)
    tracker.log_parent(metrics=[Metric("trials_completed", 2.0, 1, 0)])
    tracker.log_parent(params=[Param("best.alpha", "0.7")])  # MLflow never lets a param change: 400
    tracker.log_parent(metrics=[Metric("best_val_acc", 0.9, 1, 0)])
    tracker.end_parent("FINISHED")
    start = time.monotonic()
    assert tracker.close(timeout=60) == []
    assert time.monotonic() - start < 20  # not retried as if the server were down (that waits up to 60 s)
    assert [error for _, error in tracker.refused] and "best.alpha" in str(tracker.refused[0][0])
    run = client.get_run(parent)
    assert run.data.metrics == {"trials_completed": 2.0, "best_val_acc": 0.9}  # merged with it, sent without it
    assert run.data.params["best.alpha"] == "0.1" and run.info.status == "FINISHED"
    assert tracker.failures == 0


def test_error_summary_finds_the_exception_in_tunes_failure_text():
    from rekd.tracking.runs import error_summary

    text = ("Failure # 1 (occurred at 2026-11-27_21-22-50)\n\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=1)\n"
            "  File \"x.py\", line 3, in f\n    raise UsageError(msg)\n"
            "rekd.errors.UsageError: checkpoint '/r/s/trial_1/checkpoint_000002/last.pt' is not a readable torch file\n")
    assert error_summary(RuntimeError(text)) == ("rekd.errors.UsageError: checkpoint "
                                                 "'/r/s/trial_1/checkpoint_000002/last.pt' is not a readable torch file")
    assert error_summary(RuntimeError("plain message")) == "plain message"


def test_a_trial_that_stops_itself_before_its_first_epoch_ends_failed_with_its_reason(tmp_path):
    """A trial that reports only epoch 0 (its GPU unusable, say) is a fresh run, not an epoch logged again."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = client_for(uri)
    experiment_id = ensure_experiment(client, "tracking")
    tracker = MlflowTrialTracker(uri, experiment_id, client.create_run(experiment_id).info.run_id, "s", epochs=4)
    trial = SimpleNamespace(trial_id="t0", config={"lr": 0.1}, last_result=None)
    tracker.on_trial_start(0, [trial], trial)
    trial.last_result = {"epoch": 0, "stop_reason": "cuda_unusable", "stop_detail": "GPU 0 unusable", "timestamp": 1}
    tracker.on_trial_result(0, [trial], trial, trial.last_result)
    tracker.on_trial_complete(0, [trial], trial)
    assert tracker.close(timeout=10) == [] and tracker.failures == 0
    run = client.get_run(tracker.runs["t0"])
    assert run.info.status == "FAILED" and run.data.tags[OUTCOME_TAG] == "cuda_unusable"
    assert run.data.tags["rekd.stop_detail"] == "GPU 0 unusable" and "rekd.rerun_epochs" not in run.data.tags


def test_a_bug_in_the_writer_is_raised_not_retried_as_an_outage(tmp_path):
    """Only the store's trouble is waited for; rekd's own error stops the writer with the queue kept (to be
    saved as unsent) and is raised when the search has said what it could."""
    import pytest

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = client_for(uri)
    experiment_id = ensure_experiment(client, "tracking")
    tracker = MlflowTrialTracker(uri, experiment_id, client.create_run(experiment_id).info.run_id, "s", epochs=4)
    tracker._client = client
    client.log_batch = lambda *a, **k: {}["a bug"]  # KeyError, as a bug in rekd would raise
    trial = SimpleNamespace(trial_id="t0", config={"lr": 0.1}, last_result=None)
    tracker.on_trial_start(0, [trial], trial)
    tracker.on_trial_result(0, [trial], trial, {"epoch": 1, "val_acc": 0.5, "timestamp": 1})
    unsent = tracker.close(timeout=10)
    assert tracker.crashed and tracker.failures == 0  # never counted as an outage
    assert [op[0] for op in unsent] == ["start", "log"]
    with pytest.raises(KeyError, match="a bug"):
        tracker.raise_if_crashed()


def test_a_writer_makes_each_key_s_child_run_as_its_command_names_it(tmp_path):
    """The writer under final runs and reproductions: a parent made with its versions, children named and
    tagged by the command, each key's settings, metrics and end in order."""
    from mlflow.entities import Metric, Param

    from rekd.tracking.runs import create_parent_run
    from rekd.tracking.tags import PARENT_TAG, ROLE_TAG
    from rekd.tracking.writer import RunWriter

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = client_for(uri)
    experiment_id = ensure_experiment(client, "writer")
    parent = create_parent_run(client, experiment_id, "final-x", tags={ROLE_TAG: "final"}, params=[Param("seeds", "2")])
    writer = RunWriter(uri, experiment_id, parent,
                       child_run=lambda key: (key, {ROLE_TAG: "final_run", "rekd.label": key.split()[0]}))
    for key in ("baseline seed 0", "kd seed 0"):
        writer.start(key, {"lr": 0.1, "note": None})
        for epoch in (1, 2):
            writer.log(key, [Metric("val_acc", epoch / 10, 1000 + epoch, epoch)])
        writer.end(key, "FINISHED")
    writer.log(None, [Metric("test_acc_mean", 0.5, 0, 0)])
    writer.end(None, "FINISHED")
    assert writer.close(timeout=30) == [] and writer.failures == 0 and not writer.refused

    run = client.get_run(parent)
    assert run.info.run_name == "final-x" and run.info.status == "FINISHED" and run.data.params == {"seeds": "2"}
    assert run.data.tags[ROLE_TAG] == "final" and "rekd.code_version" in run.data.tags
    assert run.data.metrics == {"test_acc_mean": 0.5}
    children = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'")
    assert sorted(c.info.run_name for c in children) == ["baseline seed 0", "kd seed 0"]
    for child in children:
        assert writer.runs[child.info.run_name] == child.info.run_id and child.info.status == "FINISHED"
        assert child.data.tags[ROLE_TAG] == "final_run"
        assert child.data.tags["rekd.label"] == child.info.run_name.split()[0]
        assert child.data.params == {"lr": "0.1", "note": "none"}
        history = client.get_metric_history(child.info.run_id, "val_acc")
        assert [(m.step, m.value) for m in history] == [(1, 0.1), (2, 0.2)]
