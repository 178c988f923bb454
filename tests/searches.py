"""Searches run as a user runs them, for the tests of interruption, concurrency and resume: a real
`python -m rekd.search` in its own session and temp folder, and what it recorded in MLflow and Optuna."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = "rekd-default_kd-smoke"  # --smoke-test searches are tracked apart
SEARCH = ["default_kd", "--smoke-test", "--num-samples", "4", "--epochs", "6"]


def start_search(tmp_path: Path, tmp: Path, name: str, *extra: str) -> tuple[subprocess.Popen, dict]:
    """A search in its own session (like a shell job) with its own temp folder."""
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.Popen([sys.executable, "-m", "rekd.search", *SEARCH, "--storage-path", str(tmp_path / "r"),
                             "--name", name, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=env, start_new_session=True)
    return proc, env


def runs(tmp_path: Path, name: str, experiment: str = EXPERIMENT):
    client = MlflowClient(f"sqlite:///{tmp_path / 'r' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(experiment)
    if experiment is None:
        return client, None, []
    found = client.search_runs([experiment.experiment_id], filter_string=f"tags.`rekd.search` = '{name}'")
    parents = [r for r in found if r.data.tags.get("rekd.role") == "search"]
    children = [r for r in found if r.data.tags.get("rekd.role") == "trial"]
    return client, parents[0] if parents else None, children


def wait_for_an_epoch(proc, tmp_path: Path, name: str, timeout: float = 240, experiment: str = EXPERIMENT) -> None:
    """Until some trial has reported an epoch and is still running: a search in mid-flight."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if not (tmp_path / "r" / name / "rekd-search.json").exists():  # the store is made and the search begun
            time.sleep(0.3)
            continue
        client, _, children = runs(tmp_path, name, experiment)
        if any(c.info.status == "RUNNING" and client.get_metric_history(c.info.run_id, "val_acc") for c in children):
            return
        time.sleep(0.3)
    raise AssertionError(f"no trial reported an epoch (exit {proc.poll()}): {proc.stderr.read()[-3000:] if proc.poll() else ''}")


def finish(proc, timeout: float) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return proc.returncode, out, err


def optuna_states(tmp_path: Path, name: str) -> list:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'r' / name / 'optuna.db'}")
    return [t.state for t in study.trials]
