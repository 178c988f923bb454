"""A search on a cluster of two Ray nodes on this machine loses no trial when one node dies: sent with `ray
job submit`, its trials spread over both nodes (distinct rekd.node_id); once the second node's trial has
reported an epoch, every process of that node is killed (SIGKILL, by PID); Ray declares the node dead, Tune
restores its trial on the head from its last checkpoint, the job ends with status 0 and every trial's MLflow
history is gap-free. (Ray's release tests kill nodes of real clusters at random; this is the one-machine
version.)"""
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from cluster import (BIN, FAST_NODE_DEATH, ROOT, kill_node, node_ids, node_state, start_second_node, start_service,
                     stop_service)
from mlflow.tracking import MlflowClient
from processes import LOOPBACK, descendants, listening_sockets

pytestmark = pytest.mark.slow
NAME = "two-nodes"
EXPERIMENT = "rekd-two_nodes"
EPOCHS = 6


def study_file(folder: Path) -> Path:
    """The baseline study with two trials at once, one CPU each: one on each node. ASHA stops none (its
    first rung is the last epoch), so both are still training when the node dies; T=12 makes an epoch a
    few seconds long on one CPU, so that the kill lands mid-trial. Its GPU share is asked for, and
    --cpu-only drops it."""
    study = yaml.safe_load((ROOT / "search_spaces" / "baseline.yaml").read_text())
    study.update(study="two_nodes", num_samples=2, max_concurrency=2,
                 asha={"grace_period": EPOCHS, "reduction_factor": 2})
    study["fixed"].update(epochs=EPOCHS, timesteps=12)
    path = folder / "two_nodes.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


@pytest.fixture
def cluster():
    """rekd.service's head (1 CPU) and a second node (1 CPU), each with its own Ray temp folder (the head's a
    private one rekd.service removes, the node's in the test's short folder: Ray's socket paths) and TMPDIR
    (Tune's lock files) in a folder of the test's own, removed at the end."""
    tmp = Path(tempfile.mkdtemp(prefix="tn-", dir="/tmp"))
    (tmp / "head").mkdir()
    (tmp / "node").mkdir()
    env = {**os.environ, **FAST_NODE_DEATH, "TMPDIR": str(tmp / "head")}
    node = None
    try:
        service = start_service(tmp / "service", env, num_cpus=1)
        node = start_second_node(service, tmp / "node", num_cpus=1)
        head_id, (node_id,) = node_ids(service["env"])
        yield {**service, "node": node, "head_id": head_id, "node_id": node_id}
    finally:
        if node is not None and node.poll() is None:
            kill_node(node)
        stop_service(tmp / "service")
        shutil.rmtree(tmp, ignore_errors=True)


def trial_runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`rekd.search` = '{NAME}' and tags.`rekd.role` = 'trial'")


def wait_for_a_trial_on(node_id: str, client: MlflowClient, job: subprocess.Popen, log: Path,
                        timeout: float = 300):
    """Until a trial running on the node has logged an epoch (and so written a checkpoint); returns its run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and job.poll() is None:
        for run in trial_runs(client):
            if (run.info.status == "RUNNING" and run.data.tags.get("rekd.node_id") == node_id
                    and run.data.metrics.get("epoch", 0) >= 1):
                return run
        time.sleep(0.5)
    raise AssertionError(f"no trial trained on node {node_id} (job exit {job.poll()}): "
                         f"{[(r.data.tags.get('rekd.node_id'), r.info.status) for r in trial_runs(client)]}\n"
                         f"{log.read_text(errors='replace')[-3000:]}")


def assert_gap_free(client: MlflowClient, run) -> None:
    """Steps 1..last, none missing; an epoch logged twice (run again after its checkpoint was lost) is said so."""
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "epoch"))
    assert steps and sorted(set(steps)) == list(range(1, steps[-1] + 1)), steps
    twice = sorted({s for s in steps if steps.count(s) > 1})
    assert all(steps.count(s) <= 2 for s in steps), steps
    assert bool(twice) == ("rekd.rerun_epochs" in run.data.tags), (steps, run.data.tags)


def test_a_search_loses_no_trial_when_a_node_dies(cluster, tmp_path):
    env, head, second, node = cluster["env"], cluster["head_id"], cluster["node_id"], cluster["node"]
    # the second node, too, listens on 127.0.0.1 only
    assert set(listening_sockets(descendants(node.pid) | {node.pid})) <= LOOPBACK
    log = tmp_path / "job.log"
    with open(log, "w") as out:
        job = subprocess.Popen([str(BIN / "ray"), "job", "submit", "--", "python", "-m", "rekd.search", "two_nodes",
                                "--search-space", str(study_file(tmp_path)), "--cpu-only",
                                "--storage-path", str(tmp_path / "r"), "--name", NAME],
                               stdout=out, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    try:
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])  # the job tracks to the service's server
        moved = wait_for_a_trial_on(second, client, job, log)
        killed = kill_node(node)
        started = time.monotonic()
        assert len(killed) >= 3 and not [p for p in killed if alive(p)]  # raylet, agents, the trial's worker...
        while node_state(env, second) != "DEAD":
            assert time.monotonic() - started < 120, "Ray did not declare the killed node dead"
            time.sleep(0.5)
        print(f"killed at epoch {moved.data.metrics['epoch']:.0f}; the node declared dead "
              f"{time.monotonic() - started:.1f} s later")  # seen, not asserted
        assert job.wait(timeout=420) == 0, log.read_text(errors="replace")[-4000:]
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert moved.data.metrics["epoch"] < EPOCHS  # the kill landed mid-trial

    children = trial_runs(client)
    assert len(children) == 2
    parents = client.search_runs([children[0].info.experiment_id],
                                 filter_string=f"tags.`rekd.search` = '{NAME}' and tags.`rekd.role` = 'search'")
    assert parents[0].info.status == "FINISHED" and parents[0].data.tags["rekd.outcome"] == "finished"
    metrics = parents[0].data.metrics
    assert metrics["trials_completed"] == 2 and metrics["trials_errored"] == 0
    for run in children:
        tags = run.data.tags
        assert run.info.status == "FINISHED" and tags["rekd.outcome"] == "completed", tags
        assert tags["rekd.device"] == "cpu" and tags["rekd.gpu_ids"] == "none"
        assert_gap_free(client, run)
    moved = next(r for r in children if r.info.run_id == moved.info.run_id)
    stayed = next(r for r in children if r is not moved)
    # spread over both nodes; the trial of the dead node went on on the head, where the other stayed
    assert moved.data.tags["rekd.node_ids"] == f"{second},{head}" and moved.data.tags["rekd.node_id"] == head
    assert stayed.data.tags["rekd.node_ids"] == head and "rekd.restored_from" not in stayed.data.tags
    # continued from the checkpoint it had written on the second node, into the shared results folder
    assert moved.data.tags["rekd.restored_from"].startswith(str(tmp_path / "r" / NAME))


def alive(pid: int) -> bool:
    """Running, not a zombie: a killed process whose parent died with it waits to be reaped by init."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
