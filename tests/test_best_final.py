"""rekd.evaluate.best and rekd.evaluate.final refuse bad input in one line with exit status 2, leaving nothing behind;
rekd.final's runs go on through a tracking server outage and lose nothing of what they log."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from processes import free_port, wait_for_line
from rekd.evaluate.best import main as best_main
from rekd.evaluate.final import main as final_main

ROOT = Path(__file__).resolve().parent.parent


def run(main, argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_best_refuses_a_missing_sqlite_store_without_creating_it(tmp_path, capsys):
    store = tmp_path / "nothing.db"
    code, err = run(best_main, ["rekd-sparse_kd", "--tracking-uri", f"sqlite:///{store}", "--out", str(tmp_path / "b.yaml")], capsys)
    assert code == 2 and "no MLflow store at" in err and len(err.strip().splitlines()) == 1
    assert not store.exists() and not (tmp_path / "b.yaml").exists()


def test_best_names_the_experiments_there_are(tmp_path, capsys):
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    MlflowClient(uri).create_experiment("rekd-sparse_kd")
    code, err = run(best_main, ["rekd-nope", "--tracking-uri", uri, "--out", str(tmp_path / "b.yaml")], capsys)
    assert code == 2 and "unknown experiment 'rekd-nope'" in err and "rekd-sparse_kd" in err
    code, err = run(best_main, ["rekd-sparse_kd", "--tracking-uri", uri, "--out", str(tmp_path / "b.yaml")], capsys)
    assert code == 2 and "no search in this experiment" in err
    code, err = run(best_main, ["rekd-sparse_kd", "--top", "0", "--tracking-uri", uri], capsys)
    assert code == 2 and "--top 0 is not allowed" in err
    assert not (tmp_path / "b.yaml").exists()


@pytest.mark.parametrize("content,message", [
    ("- 1\n", "expected a mapping"),
    ("configs: []\n", "configs: expected a non-empty list"),
    ("configs: [3]\n", "configs[0]: expected a mapping with 'settings'"),
    ("configs:\n- settings: {mode: sparse_kd, prune_ratio: 4.0}\n", "prune_ratio=4.0 is not allowed"),
    ("configs:\n- settings: {mode: sparse_kd, arch: alexnet}\n", "unknown arch 'alexnet'"),
])
def test_final_refuses_a_malformed_best_file(content, message, tmp_path, capsys):
    path = tmp_path / "best.yaml"
    path.write_text(content)
    code, err = run(final_main, [str(path), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}",
                                 "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.db").exists()


def test_final_refuses_zero_seeds(tmp_path, capsys):
    code, err = run(final_main, [str(tmp_path / "x.yaml"), "--seeds", "0"], capsys)
    assert code == 2 and "--seeds 0 is not allowed" in err


def test_final_runs_a_sparse_config_beside_a_dense_baseline_and_reports_what_each_costs(tmp_path, capsys, cache_dir):
    path = tmp_path / "best.yaml"
    path.write_text("searched: [target_sparsity]\nconfigs:\n- settings: {mode: sparse_kd, structure: gmp, "
                    "target_sparsity: 0.8, generations: 2, prune_ratio: 0.3, cache_dir: " + cache_dir + "}\n")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    code = final_main([str(path), "--seeds", "1", "--epochs", "1", "--tracking-uri", uri, "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert "| 100.0 % |" in rows["baseline"]  # the baseline stays dense and of one generation
    assert "target_sparsity=0.8" in rows["#1 sparse_kd"] and "| 20.0 % |" in rows["#1 sparse_kd"]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("rekd-final").experiment_id],
                              filter_string="tags.`rekd.role` = 'final_run'")
    sparse = [r for r in runs if r.data.tags["rekd.label"] == "#1 sparse_kd"][0]
    assert sparse.data.params["structure"] == "gmp" and sparse.data.params["generations"] == "2"
    assert [m.step for m in client.get_metric_history(sparse.info.run_id, "density")] == [1, 2]


# -- a tracking server outage during the final runs -----------------------------------------------------------
def first_epoch_logged(client, experiment: str) -> bool:
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], filter_string="tags.`rekd.role` = 'final_run'") if found else []
    return any(client.get_metric_history(run.info.run_id, "val_acc") for run in runs)


@pytest.mark.slow
def test_final_runs_go_on_through_a_tracking_server_restart_and_every_epoch_reaches_mlflow(tmp_path):
    """The server stops after the first epoch is in MLflow and comes back on the same port and store while
    the runs train: the writer keeps what it could not send and sends it when the server is back."""
    from test_search_faults import start_mlflow, stop  # the tracking server as the search's outage test runs it

    port, store, log = free_port(), tmp_path / "store", tmp_path / "mlflow.log"
    store.mkdir()
    uri, experiment, epochs = f"http://127.0.0.1:{port}", "final-outage", 3
    best = tmp_path / "best.yaml"
    best.write_text(f"experiment: {experiment}\nconfigs:\n- settings: {{mode: default_kd, epochs: {epochs}}}\n")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"  # each try at the dead server fails at once; the writer retries
    server = start_mlflow(port, store, log)
    final = subprocess.Popen([sys.executable, "-m", "rekd.final", str(best), "--seeds", "1", "--epochs", str(epochs),
                              "--tracking-uri", uri, "--out", str(tmp_path / "out")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             cwd=ROOT)
    try:
        client = MlflowClient(uri)
        deadline = time.monotonic() + 180
        while not first_epoch_logged(client, experiment):
            assert time.monotonic() < deadline and final.poll() is None, "no epoch of the final runs reached MLflow"
            time.sleep(0.3)
        stop(server)
        time.sleep(5)  # the runs train on while nothing can be logged
        assert final.poll() is None, "the final runs ended during the outage: it did not overlap them"
        server = start_mlflow(port, store, log)
        out, err = final.communicate(timeout=400)
    finally:
        if final.poll() is None:
            final.kill()
            final.communicate()
    try:
        assert final.returncode == 0, err[-3000:]
        assert "MLflow unreachable" in err and "were not made" not in err, err[-3000:]
        assert "| baseline |" in out and len(list((tmp_path / "out").glob("final-*.json"))) == 1
        client = MlflowClient(uri)
        experiment_id = client.get_experiment_by_name(experiment).experiment_id
        [parent] = client.search_runs([experiment_id], filter_string="tags.`rekd.role` = 'final'")
        assert parent.info.status == "FINISHED" and "baseline/test_acc_mean" in parent.data.metrics
        assert "rekd.code_version" in parent.data.tags
        assert sorted(a.path for a in client.list_artifacts(parent.info.run_id, "final")) == [
            f"final/{p.name}" for p in sorted((tmp_path / "out").glob("final-*.*"))]
        children = client.search_runs([experiment_id],
                                      filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        assert sorted(c.info.run_name for c in children) == ["#1 default_kd seed 0", "baseline seed 0"]
        for child in children:
            assert child.info.status == "FINISHED" and child.data.tags["rekd.role"] == "final_run"
            assert child.data.params["mode"] == ("baseline" if child.data.tags["rekd.label"] == "baseline"
                                                 else "default_kd")
            for key in ("val_acc", "test_acc", "train_loss"):  # every epoch, once
                assert sorted(m.step for m in client.get_metric_history(child.info.run_id, key)) == \
                    list(range(1, epochs + 1)), key
    finally:
        stop(server)


# -- Ctrl-C and SIGTERM during the final runs ----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_ends_the_final_runs_killed_with_the_shells_status_and_no_traceback(signum, tmp_path):
    """SIGTERM is what `ray job stop` and batch schedulers send: the runs it ends are KILLED, as Ctrl-C's are,
    not left RUNNING in MLflow, and no table is written from half of the runs."""
    uri, experiment = f"sqlite:///{tmp_path / 'mlflow.db'}", "final-signal"
    best = tmp_path / "best.yaml"
    best.write_text(f"experiment: {experiment}\nconfigs:\n- settings: {{mode: default_kd}}\n")
    final = subprocess.Popen([sys.executable, "-m", "rekd.final", str(best), "--seeds", "1", "--epochs", "200",
                              "--tracking-uri", uri, "--out", str(tmp_path / "out")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                             start_new_session=True)
    try:
        wait_for_line(final, "baseline, seed 0: training 200 epochs", timeout=180)
        time.sleep(2)  # into its epochs
        os.kill(final.pid, signum)
        out, err = final.communicate(timeout=120)
    finally:
        if final.poll() is None:
            final.kill()
            final.communicate()
    assert final.returncode == 128 + signum, err[-3000:]
    assert err.strip().splitlines()[-1] == f"python -m rekd.final: interrupted ({signum.name})" and "Traceback" not in err
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    [parent] = client.search_runs([experiment_id], filter_string="tags.`rekd.role` = 'final'")
    children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert parent.info.status == "KILLED" and [c.info.status for c in children] == ["KILLED"]
    assert not list((tmp_path / "out").glob("final-*"))
