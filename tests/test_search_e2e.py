"""End to end on real services: a Ray head and an MLflow server on 127.0.0.1 (rekd.service), a search sent
with `ray job submit`, read back through MLflow's client and Optuna's storage, then rekd.evaluate.best and
rekd.evaluate.final on the result. The services are stopped by PID at the end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from processes import LOOPBACK, descendants, free_port, listening_sockets
import yaml
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent



@pytest.fixture(scope="module")
def service(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("service")
    ports = [free_port() for _ in range(5)]
    start = [sys.executable, "-m", "rekd.service", "start", "--state-dir", str(state_dir), "--num-cpus", "2",
             "--ray-port", str(ports[0]), "--dashboard-port", str(ports[1]), "--client-port", str(ports[2]),
             "--mlflow-port", str(ports[3]), "--agent-port", str(ports[4])]
    proc = subprocess.run(start, capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    state = json.loads((state_dir / "service.json").read_text())
    env_lines = subprocess.run([sys.executable, "-m", "rekd.service", "env", "--state-dir", str(state_dir)],
                               capture_output=True, text=True, cwd=ROOT, check=True).stdout
    client_env = dict(line.removeprefix("export ").split("=", 1) for line in env_lines.splitlines())
    yield {"state": state, "env": {**os.environ, **client_env}, "state_dir": state_dir}
    stop = subprocess.run([sys.executable, "-m", "rekd.service", "stop", "--state-dir", str(state_dir)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert stop.returncode == 0, stop.stderr
    for pid in (state["ray_pid"], state["mlflow_pid"]):
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_ray_job_search_is_tracked_pruned_and_feeds_best_and_final(service, tmp_path):
    env = service["env"]
    storage = tmp_path / "results"
    name = "e2e-sparse"
    job = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--", "python", "-m", "rekd.search", "sparse_kd", "--smoke-test",
         "--storage-path", str(storage), "--name", name],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert "best config" in job.stdout and "early stopping saved" in job.stdout
    # the service's Ray is this machine and nothing more: no GPU will come, so the trials ran on CPUs
    assert "no GPU in this Ray, and none will join: tasks run on CPUs" in job.stdout

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])  # the job tracked to the service's server by default
    experiment = client.get_experiment_by_name("rekd-sparse_kd-smoke")
    parents = client.search_runs([experiment.experiment_id],
                                 filter_string=f"tags.`rekd.search` = '{name}' and tags.`rekd.role` = 'search'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and "best_val_acc" in parent.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    assert "summary/optimization_history.png" in artifacts and "summary/summary.json" in artifacts
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 6  # the smoke test's num_samples
    stopped = []
    for child in children:
        assert {"prune_ratio", "temperature", "alpha"} <= set(child.data.params)
        tags = child.data.tags
        assert tags["rekd.device"] == "cpu" and tags["rekd.gpu_ids"] == "none" and tags["rekd.node_id"]
        assert tags["rekd.node_ids"] == tags["rekd.node_id"]  # one node, never moved
        history = client.get_metric_history(child.info.run_id, "val_acc")
        outcome = child.data.tags["rekd.outcome"]
        assert outcome in ("completed", "stopped_early")
        assert sorted(m.step for m in history) == list(range(1, len(history) + 1))
        if outcome == "stopped_early":
            stopped.append(child)
            assert child.data.tags["rekd.stopped_at_epoch"] == str(len(history))
        else:
            assert len(history) == 2
    assert stopped, "ASHA stopped no trial"

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{storage / name / 'optuna.db'}")
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert len(pruned) == len(stopped) and all(t.intermediate_values for t in pruned)

    best_file = tmp_path / "best.yaml"
    best = subprocess.run([sys.executable, "-m", "rekd.best", "rekd-sparse_kd-smoke", "--top", "2", "--out", str(best_file),
                           "--search", name], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert best.returncode == 0, best.stderr
    document = yaml.safe_load(best_file.read_text())
    assert len(document["configs"]) == 2 and document["configs"][0]["settings"]["mode"] == "sparse_kd"
    assert document["configs"][0]["val_acc"] >= document["configs"][1]["val_acc"]

    final = subprocess.run([sys.executable, "-m", "rekd.final", str(best_file), "--seeds", "2", "--epochs", "1",
                            "--out", str(tmp_path / "final")], capture_output=True, text=True, cwd=ROOT, env=env,
                           timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "| baseline |" in final.stdout and "pts |" in final.stdout
    finals = client.search_runs([experiment.experiment_id], filter_string="tags.`rekd.role` = 'final'")
    assert finals and finals[0].info.status == "FINISHED"
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{finals[0].info.run_id}'")
    assert len(runs) == 2 * 3  # (baseline + 2 configs) x 2 seeds


def test_the_service_listens_on_loopback_only_and_keeps_token_auth(service):
    state = service["state"]
    pids = {state["ray_pid"], state["mlflow_pid"]} | descendants(state["ray_pid"]) | descendants(state["mlflow_pid"])
    addresses = listening_sockets(pids)
    assert addresses, "found none of the service's listening sockets"
    assert set(addresses) <= LOOPBACK, addresses
    without_token = {k: v for k, v in service["env"].items() if not k.startswith("RAY_AUTH")}
    proc = subprocess.run([str(BIN / "ray"), "job", "list"], capture_output=True, text=True, env=without_token,
                          timeout=60)
    assert proc.returncode != 0  # the job API refuses a client without the token
    with_token = subprocess.run([str(BIN / "ray"), "job", "list"], capture_output=True, text=True,
                                env=service["env"], timeout=60)
    assert with_token.returncode == 0, with_token.stderr


def test_the_tracking_server_refuses_a_foreign_host_header(service):
    import urllib.error
    import urllib.request
    url = service["env"]["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/experiments/search?max_results=1"
    with urllib.request.urlopen(urllib.request.Request(url), timeout=10) as ok:
        assert ok.status == 200
    rebound = urllib.request.Request(url, headers={"Host": "attacker.example:5000"})
    with pytest.raises(urllib.error.HTTPError) as refused:  # DNS rebinding: a page on attacker.example
        urllib.request.urlopen(rebound, timeout=10)
    assert refused.value.code in (400, 403)


def test_two_searches_at_once_keep_their_runs_apart(service, tmp_path):
    env = service["env"]
    jobs = [subprocess.Popen([str(BIN / "ray"), "job", "submit", "--", "python", "-m", "rekd.search", "baseline",
                              "--smoke-test", "--num-samples", "3", "--storage-path", str(tmp_path / name),
                              "--name", name], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             cwd=ROOT, env=env) for name in ("twin-a", "twin-b")]
    outputs = [job.communicate(timeout=600)[0] for job in jobs]
    assert all(job.returncode == 0 for job in jobs), outputs[0][-2000:] + outputs[1][-2000:]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("rekd-baseline-smoke")
    for name in ("twin-a", "twin-b"):
        parents = client.search_runs([experiment.experiment_id],
                                     filter_string=f"tags.`rekd.search` = '{name}' and tags.`rekd.role` = 'search'")
        assert len(parents) == 1
        children = client.search_runs([experiment.experiment_id],
                                      filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
        assert len(children) == 3 and {c.data.tags["rekd.search"] for c in children} == {name}
