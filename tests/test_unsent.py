"""Calls kept through an MLflow outage, sent later to a real SQLite store: each once, none twice, the rest kept."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.entities import Metric, Param, RunTag

from processes import free_port
from rekd.tracking.runs import client_for
from rekd.tracking.tags import OUTCOME_TAG, PARENT_TAG, ROLE_TAG, SEARCH_TAG
from rekd.tracking.tune_callback import MlflowTrialTracker
from rekd.search.unsent import FILE_NAME, keep_unsent, load, main, write
from usage import assert_usage_error

ROOT = Path(__file__).resolve().parent.parent
EPOCHS = 3


def kept_search(tmp_path, monkeypatch, artifact_location=None):
    """A search whose store went down after trial t0's run and first epoch: the rest is kept in its folder."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the dead server is given up at once
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = client_for(uri)
    # artifacts in the test's folder: MLflow's default for a SQLite store is ./mlruns, in the checkout
    artifact_location = artifact_location or str(tmp_path / "artifacts")
    experiment_id = client.create_experiment("unsent", artifact_location=artifact_location)
    parent = client.create_run(experiment_id, run_name="outage",
                               tags={ROLE_TAG: "search", SEARCH_TAG: "outage"}).info.run_id
    trials = [SimpleNamespace(trial_id=f"t{i}", config={"lr": 0.1 * (i + 1), "note": None}, last_result=None)
              for i in range(2)]
    up = MlflowTrialTracker(uri, experiment_id, parent, "outage", epochs=EPOCHS)
    up.on_trial_start(0, trials, trials[0])
    report(up, trials[0], 1)
    assert up.close(timeout=30) == []

    down = MlflowTrialTracker(f"http://127.0.0.1:{free_port()}", experiment_id, parent, "outage", epochs=EPOCHS)
    down.runs, down.unfinished = dict(up.runs), {"t0"}
    for epoch in range(2, EPOCHS + 1):
        report(down, trials[0], epoch)
    down.on_trial_start(0, trials, trials[1])
    for epoch in range(1, EPOCHS + 1):
        report(down, trials[1], epoch)
    for trial in trials:
        down.on_trial_complete(0, trials, trial)
    study = tmp_path / "study.yaml"
    study.write_text("name: outage\n")
    down.log_parent(metrics=[Metric("best_val_acc", 1.3, 5000, 0)], params=[Param("best.lr", "0.2")],
                    tags=[RunTag(OUTCOME_TAG, "completed")])
    down.log_parent_artifact(str(study), "study")
    down.end_parent("FINISHED")
    ops = down.close(timeout=0)
    assert len(ops) == 13 and "t1" not in down.runs
    down.tracking_uri = uri  # the store is back where it was
    folder = tmp_path / "results" / "outage"
    folder.mkdir(parents=True)
    keep_unsent(ops, folder, down)
    return SimpleNamespace(client=client, parent=parent, folder=folder, ops=ops, tracker=down, study=study,
                           experiment_id=experiment_id)


def report(tracker, trial, epoch):
    trial.last_result = {"epoch": epoch, "val_acc": epoch / 10 + int(trial.trial_id[1]), "timestamp": 100 + epoch}
    tracker.on_trial_result(0, [], trial, trial.last_result)


def send(capsys, *argv):
    capsys.readouterr()  # what building the store printed is not the command's
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # the parser's own errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_all_arrived_once(search):
    client = search.client
    children = client.search_runs([search.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{search.parent}'")
    assert sorted(r.data.tags["rekd.trial_id"] for r in children) == ["t0", "t1"]  # one run per trial
    for run in children:
        i = int(run.data.tags["rekd.trial_id"][1])
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert sorted((m.step, m.timestamp, m.value) for m in history) == [
            (e, (100 + e) * 1000, e / 10 + i) for e in range(1, EPOCHS + 1)]
        assert run.data.params == {"lr": str(0.1 * (i + 1)), "note": "none"}
        assert run.data.tags[OUTCOME_TAG] == "completed" and run.info.status == "FINISHED"
    parent = client.get_run(search.parent)
    assert [(m.value, m.timestamp) for m in client.get_metric_history(search.parent, "best_val_acc")] == [(1.3, 5000)]
    assert parent.data.params == {"best.lr": "0.2"} and parent.data.tags[OUTCOME_TAG] == "completed"
    assert parent.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(search.parent, "study")] == ["study/study.yaml"]


def test_the_kept_calls_read_back_exactly_as_the_tracker_queued_them_with_what_sending_them_needs(
        tmp_path, monkeypatch):
    search = kept_search(tmp_path, monkeypatch)
    header, ops = load(search.folder / FILE_NAME)
    assert header == {"tracking_uri": search.tracker.tracking_uri, "experiment_id": search.experiment_id,
                      "parent_run_id": search.parent, "search": "outage", "runs": search.tracker.runs}

    def sent(op):  # what MLflow would receive for an op: the tracker logs a start's settings as params
        if op[0] == "start":
            return op[0], op[1], sorted((k, "none" if v is None else str(v)) for k, v in op[2].items())
        if op[0] == "log":
            return (op[0], op[1], [(m.key, m.value, m.timestamp, m.step) for m in op[2]],
                    [(p.key, p.value) for p in op[3]], [(t.key, t.value) for t in op[4]])
        return op

    assert [sent(op) for op in ops] == [sent(op) for op in search.ops]
    odd = [Metric("loss", math.inf, 1, 2), Metric("loss", -math.inf, 1, 3), Metric("loss", math.nan, 1, 4)]
    write(tmp_path / "odd.json", header, [("log", "t0", odd, [], [])])
    metrics = load(tmp_path / "odd.json")[1][0][2]
    assert [m.value for m in metrics[:2]] == [math.inf, -math.inf] and math.isnan(metrics[2].value)


def test_every_kept_call_arrives_exactly_once_and_the_file_is_removed(tmp_path, monkeypatch, capsys):
    search = kept_search(tmp_path, monkeypatch)
    code, out, err = send(capsys, search.folder)
    assert code == 0, err
    assert "13 calls of search outage sent" in out and "0 already there, 0 refused" in out and err == ""
    assert not (search.folder / FILE_NAME).exists()
    assert_all_arrived_once(search)


def test_a_replay_after_the_first_half_already_arrived_makes_no_duplicate_metrics_and_no_second_child_run(
        tmp_path, monkeypatch, capsys):
    search = kept_search(tmp_path, monkeypatch)
    path = search.folder / FILE_NAME
    full = path.read_bytes()
    half = len(search.ops) // 2  # t1's run, its params and metrics: their responses lost, say
    assert search.ops[2][0] == "start" and search.ops[half][0] == "log" and search.ops[half][2] == []
    write(path, load(path)[0], search.ops[:half])
    assert send(capsys, search.folder)[0] == 0
    path.write_bytes(full)  # as kept: it does not know t1's run

    code, out, err = send(capsys, search.folder)
    assert code == 0, err
    assert f"{len(search.ops) - half} calls of search outage sent" in out and f"{half} already there" in out
    assert_all_arrived_once(search)


def test_a_replay_cut_off_by_the_store_keeps_what_remains_and_a_second_one_finishes(tmp_path, monkeypatch, capsys):
    blocked = tmp_path / "blocked"
    blocked.write_text("")  # a file where the artifact folder should be: the artifact store cannot be written
    search = kept_search(tmp_path, monkeypatch, artifact_location=str(blocked / "artifacts"))
    path = search.folder / FILE_NAME
    code, out, err = send(capsys, search.folder)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "11 calls sent" in err and "the other 2 stay in" in err and "run this again" in err
    header, left = load(path)
    assert [op[0] for op in left] == ["artifact", "end"] and "t1" in header["runs"]

    blocked.unlink()
    code, out, err = send(capsys, search.folder)
    assert code == 0 and "2 calls of search outage sent" in out, err
    assert not path.exists()
    assert_all_arrived_once(search)


def test_a_param_conflict_and_a_vanished_artifact_are_named_and_the_rest_arrives(tmp_path, monkeypatch, capsys):
    search = kept_search(tmp_path, monkeypatch)
    search.client.log_param(search.parent, "best.lr", "0.5")  # an earlier driver logged another best
    search.study.unlink()
    code, out, err = send(capsys, search.folder)
    assert code == 1 and len(err.strip().splitlines()) == 1 and out == ""
    assert "2 refused (the first: log: param 'best.lr' is '0.5' in the store, not '0.2')" in err
    assert not (search.folder / FILE_NAME).exists()  # nothing in it could ever go through
    parent = search.client.get_run(search.parent)
    assert parent.data.params["best.lr"] == "0.5" and parent.data.metrics["best_val_acc"] == 1.3
    assert parent.info.status == "FINISHED" and not search.client.list_artifacts(search.parent)


def test_an_unreachable_store_costs_one_line_and_leaves_the_file_as_it_was(tmp_path):
    folder = tmp_path / "outage"
    folder.mkdir()
    write(folder / FILE_NAME, document("sqlite:////nowhere/mlflow.db"), [("end", None, "FINISHED")])
    before = (folder / FILE_NAME).read_bytes()
    dead = f"http://127.0.0.1:{free_port()}"
    result = subprocess.run([sys.executable, "-m", "rekd.unsent", str(folder), "--tracking-uri", dead], cwd=ROOT,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "Traceback" not in result.stderr
    assert f"the MLflow store {dead} cannot be reached" in result.stderr and "stay in" in result.stderr
    assert (folder / FILE_NAME).read_bytes() == before


def document(uri, parent="0123456789abcdef"):
    """A file's header: the store and the search its calls belong to."""
    return {"tracking_uri": uri, "experiment_id": "1", "parent_run_id": parent, "search": "outage", "runs": {}}


def kept(content):
    """A folder whose file holds `content`: text as it is, anything else as JSON."""
    def setup(tmp_path, folder):
        folder.mkdir()
        (folder / FILE_NAME).write_text(content if isinstance(content, str) else json.dumps(content))
        return []
    return setup


def valid(*flags):
    """A folder with a good file, sent with `flags` ({tmp} is the test's folder)."""
    def setup(tmp_path, folder):
        folder.mkdir()
        write(folder / FILE_NAME, document(f"sqlite:///{tmp_path}/mlflow.db"), [("end", None, "FINISHED")])
        return [flag.format(tmp=tmp_path) for flag in flags]
    return setup


def other_store(tmp_path, folder):
    client_for(f"sqlite:///{tmp_path}/other.db").create_experiment("other")
    return valid(f"--tracking-uri=sqlite:///{tmp_path}/other.db")(tmp_path, folder)


END = {"call": "end", "trial": None, "status": "FINISHED"}
OURS = {"format": "rekd-mlflow-unsent", "version": 1}
BAD_INPUTS = {
    "no such folder": (lambda tmp_path, folder: [], "no such folder or file"),
    "a folder without kept calls": (lambda tmp_path, folder: folder.mkdir() or [], "has no mlflow-unsent.json"),
    "a corrupt file": (kept('{"format": '), "is corrupt: not JSON"),
    "another version": (kept({**OURS, **document("x"), "version": 9, "calls": [END]}),
                        "has version 9; allowed: version 1"),
    "the old lossy list": (kept([["end", None, "FINISHED"]]), "is not a file of unsent MLflow calls"),
    "a damaged call": (kept({**OURS, **document("x"), "calls": [{"call": "end"}]}), "is corrupt: KeyError"),
    "a relative SQLite path": (valid("--tracking-uri=sqlite:///mlflow.db"),
                               "--tracking-uri 'sqlite:///mlflow.db' is not allowed"),
    "a saved URI that is no URI": (kept({**OURS, **document("mlflow.db"), "calls": [END]}),
                                   "the tracking URI saved in"),
    "a SQLite store that is not there": (valid("--tracking-uri=sqlite:///{tmp}/none.db"), "no MLflow store at"),
    "a store without the search": (other_store, "is not in sqlite:///"),
}


@pytest.mark.parametrize("setup,message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_one_line_with_exit_status_2_and_leaves_the_file_alone(tmp_path, capsys, setup, message):
    folder = tmp_path / "outage"
    flags = setup(tmp_path, folder)
    path = folder / FILE_NAME
    before = path.read_bytes() if path.exists() else None
    code, out, err = send(capsys, folder, *flags)
    assert_usage_error(code, out, err, message)
    assert (path.read_bytes() if path.exists() else None) == before
    assert not (tmp_path / "none.db").exists()


def test_the_drivers_warning_ends_with_the_command_that_sends_the_calls(tmp_path, monkeypatch, capsys):
    from rekd.search.driver import report_unsent

    search = kept_search(tmp_path, monkeypatch)
    capsys.readouterr()
    report_unsent(search.ops[-1:], search.folder, search.tracker)  # a resumed search, down again at its end
    err = capsys.readouterr().err
    assert err.startswith("warning: the MLflow store stayed unreachable; 1 logging calls were not made")
    assert err.rstrip().endswith(f" -m rekd.unsent {search.folder}")
    assert len(load(search.folder / FILE_NAME)[1]) == len(search.ops) + 1  # added to what was kept
