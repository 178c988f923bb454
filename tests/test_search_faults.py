"""Faults inside a search: a trial whose loss turns NaN stops with that reason, is tagged in MLflow and
failed in Optuna, and the search goes on to its last trial."""
import dataclasses
import math
import os
import sys
from pathlib import Path

import optuna
import pytest
from processes import cmdline, descendants, free_port
import torch
from mlflow.tracking import MlflowClient

from rekd.config import TrainConfig
from rekd.datasets import Split, load_dataset
from rekd.search.plan import build_parser, plan_from_args
from rekd.train.loop import NonFiniteLoss, resolve, train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def poisoned_digits():
    data = load_dataset(resolve(TrainConfig()))
    x = data.train.x.clone()
    x[:, :, 3, 3] = math.nan  # corrupted samples: every batch carries NaN into the network
    return dataclasses.replace(data, train=Split(x, data.train.y))


def test_train_raises_after_reporting_the_epoch_and_keeps_the_last_good_checkpoint(tmp_path):
    reports = []
    with pytest.raises(NonFiniteLoss, match="training diverged in epoch 1: non-finite loss or weights"):
        train(TrainConfig(epochs=2), data=poisoned_digits(), on_epoch=reports.append, run_dir=tmp_path)
    assert len(reports) == 1  # the epoch is reported before the run stops
    assert not (tmp_path / "last.pt").exists()  # a diverged state is never saved as the checkpoint


@pytest.fixture
def local_ray():
    """run_search starts a private Ray in this process; end it so later tests find the machine free."""
    yield
    import ray
    ray.shutdown()


def test_a_search_whose_trials_diverge_tags_them_and_finishes(tmp_path, capsys, local_ray):
    from rekd.search.driver import run_search
    from rekd.tracking.runs import client_for
    from rekd.tracking.store import ensure_experiment

    args = build_parser().parse_args(["default_kd", "--smoke-test", "--num-samples", "3", "--storage-path",
                                      str(tmp_path), "--name", "nan-search"])
    plan = plan_from_args(args)
    client = client_for(plan.tracking_uri)
    experiment_id = ensure_experiment(client, plan.experiment)
    code = run_search(plan, poisoned_digits(), (client, experiment_id))
    assert code == 1 and "no trial produced a result" in capsys.readouterr().err
    client = MlflowClient(plan.tracking_uri)
    parent = client.search_runs([experiment_id], filter_string="tags.`rekd.role` = 'search'")[0]
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_non_finite_loss"] == 3
    children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 3  # every trial ran: one diverging trial does not end the search
    for child in children:
        assert child.info.status == "FAILED"
        assert child.data.tags["rekd.outcome"] == "non_finite_loss"
        assert "training diverged in epoch 1" in child.data.tags["rekd.stop_detail"]
    study = optuna.load_study(study_name="nan-search", storage=f"sqlite:///{tmp_path / 'nan-search' / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to run out of its memory")
def test_cuda_out_of_memory_stops_the_trial_with_that_reason(tmp_path):
    cfg = TrainConfig(arch="vgg16", dataset="digits", epochs=1, batch_size=2**20, device="cuda")
    with pytest.raises(torch.OutOfMemoryError):
        train(cfg)



def start_mlflow(port: int, store: Path, log: Path):
    import subprocess
    import time
    import urllib.request
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                             str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
                             "--artifacts-destination", str(store / "artifacts")],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise AssertionError(f"mlflow server did not start; see {log}")


def stop(proc) -> None:
    proc.terminate()
    proc.wait(timeout=60)


def test_a_tracking_server_outage_delays_logging_but_loses_nothing(tmp_path):
    import subprocess
    import time
    port, store = free_port(), tmp_path / "store"
    store.mkdir()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow(port, store, tmp_path / "mlflow.log")
    search = subprocess.Popen(
        [sys.executable, "-m", "rekd.search", "default_kd", "--smoke-test", "--num-samples", "4", "--epochs", "3",
         "--tracking-uri", uri, "--storage-path", str(tmp_path / "results"), "--name", "outage"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        client = MlflowClient(uri)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # the outage starts once trials are being tracked
            experiment = client.get_experiment_by_name("rekd-default_kd-smoke")
            if experiment and client.search_runs([experiment.experiment_id],
                                                 filter_string="tags.`rekd.role` = 'trial'"):
                break
            time.sleep(0.5)
        stop(server)
        time.sleep(12)  # trials keep training while nothing can be logged
        server = start_mlflow(port, store, tmp_path / "mlflow.log")
        output, _ = search.communicate(timeout=400)
    finally:
        if search.poll() is None:
            search.kill()
        stop(server)
    assert search.returncode == 0, output[-3000:]
    assert "MLflow unreachable" in output and "were not made" not in output
    server = start_mlflow(port, store, tmp_path / "mlflow.log")
    try:
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("rekd-default_kd-smoke")
        parent = client.search_runs([experiment.experiment_id], filter_string="tags.`rekd.role` = 'search'")[0]
        assert parent.info.status == "FINISHED" and "best_val_acc" in parent.data.metrics
        children = client.search_runs([experiment.experiment_id],
                                      filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        assert len(children) == 4
        for child in children:
            steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_acc")]
            assert steps == list(range(1, len(steps) + 1)) and steps  # continuous, nothing lost or doubled
            expected = 3 if child.data.tags["rekd.outcome"] == "completed" else int(child.data.tags["rekd.stopped_at_epoch"])
            assert len(steps) == expected
    finally:
        stop(server)
    assert not (tmp_path / "results" / "outage" / "mlflow-unsent.json").exists()




def tracked_children(uri: str, experiment: str):
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return client, []
    return client, client.search_runs([found.experiment_id], filter_string="tags.`rekd.role` = 'trial'")


def test_a_killed_trial_resumes_from_its_checkpoint_in_the_same_mlflow_run(tmp_path):
    import signal
    import subprocess
    import time
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    search = subprocess.Popen(
        [sys.executable, "-m", "rekd.search", "default_kd", "--dataset", "ndigits", "--num-samples", "2",
         "--max-concurrency", "1", "--epochs", "4", "--tracking-uri", uri, "--storage-path", str(tmp_path / "r"),
         "--name", "killed-trial"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    killed = None
    try:
        deadline = time.monotonic() + 300
        while killed is None and time.monotonic() < deadline and search.poll() is None:
            client, children = tracked_children(uri, "rekd-default_kd")
            if children and client.get_metric_history(children[0].info.run_id, "val_acc"):
                workers = [p for p in descendants(search.pid) if "ImplicitFunc" in cmdline(p)]
                if workers:
                    time.sleep(1.0)  # into the next epoch
                    os.kill(workers[0], signal.SIGKILL)
                    killed = workers[0]
            time.sleep(0.3)
        output, _ = search.communicate(timeout=600)
    finally:
        if search.poll() is None:
            search.kill()
    assert killed is not None, "no trial process was found to kill"
    assert search.returncode == 0, output[-3000:]
    client, children = tracked_children(uri, "rekd-default_kd")
    assert len(children) == 2  # the retried trial kept its run: no duplicate
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_acc")]
        assert steps == list(range(1, len(steps) + 1))  # continuous: resumed, not restarted from epoch 1
        assert child.data.tags["rekd.outcome"] in ("completed", "stopped_early")


def test_a_killed_driver_resumes_its_search_without_rerunning_finished_trials(tmp_path, own_tmp):
    import signal
    import subprocess
    import time
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--tracking-uri", uri, "--storage-path", str(tmp_path / "r")]
    first = subprocess.Popen(
        [sys.executable, "-m", "rekd.search", "default_kd", "--smoke-test", "--num-samples", "6", "--epochs", "3",
         "--name", "resumed", *common], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        env={**os.environ, "TMPDIR": str(own_tmp)})  # a killed driver cannot remove its private Ray's folder
    before = {}
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and first.poll() is None:
            client, children = tracked_children(uri, "rekd-default_kd-smoke")
            done = [c for c in children if "rekd.outcome" in c.data.tags]
            if len(done) >= 2:
                ours = descendants(first.pid)
                os.kill(first.pid, signal.SIGKILL)  # the driver dies mid-search
                for pid in ours:  # and the private Ray it had started with it
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                before = {c.info.run_id: len(client.get_metric_history(c.info.run_id, "val_acc")) for c in done}
                break
            time.sleep(0.3)
        first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert before, "the search ended before it could be interrupted"
    resumed = subprocess.run([sys.executable, "-m", "rekd.search", "default_kd", "--resume", "resumed", *common],
                             capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    client, children = tracked_children(uri, "rekd-default_kd-smoke")
    experiment = client.get_experiment_by_name("rekd-default_kd-smoke")
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.`rekd.role` = 'search'")
    assert len(parents) == 1 and parents[0].data.tags.get("rekd.resumed") == "true"  # the parent run is reused
    assert parents[0].info.status == "FINISHED"
    lost = [c for c in children if c.data.tags.get("rekd.outcome") == "lost_with_driver"]
    assert all(c.info.status == "KILLED" for c in lost)  # started after the dead driver's last snapshot
    children = [c for c in children if c not in lost]
    assert len(children) == 6  # num_samples trials in all, none duplicated
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_acc")]
        assert steps == list(range(1, len(steps) + 1))
        assert child.data.tags["rekd.outcome"] in ("completed", "stopped_early"), (
            child.data.tags, resumed.stdout[-3000:] + resumed.stderr[-3000:])
        if child.info.run_id in before:  # finished before the kill: not run again
            assert len(steps) == before[child.info.run_id]
    study = optuna.load_study(study_name="resumed", storage=f"sqlite:///{tmp_path / 'r' / 'resumed' / 'optuna.db'}")
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    assert len([t for t in study.trials if t.state in finished]) == 6
    # a trial asked just before the driver died, unknown to the restored searcher, is closed as failed
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in study.trials)


def test_a_store_down_when_a_resumed_search_closes_the_lost_trials_runs_is_a_warning_not_a_failure(monkeypatch, capsys):
    from rekd.search.driver import close_lost_runs

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's client would retry for minutes
    close_lost_runs(MlflowClient(f"http://127.0.0.1:{free_port()}"), "1", "parent", [])  # nothing listens there
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: the runs of trials lost with the earlier driver could "
                                               "not be closed (they stay RUNNING in MLflow): "), err
    with pytest.raises(AttributeError):  # a bug is still raised, not taken for an outage
        close_lost_runs(None, "1", "parent", [])
