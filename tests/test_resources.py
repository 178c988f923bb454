"""What trials request: the study's GPU fraction wherever GPUs may come, CPUs only by choice or where none
ever will; and where each trial ran, as its MLflow run's tags say."""
import dataclasses
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from cluster import BIN, ROOT, start_service, stop_service
from mlflow.tracking import MlflowClient

from rekd.driver import trial_resources
from rekd.search import build_parser, plan_from_args
from rekd.tracking import MlflowTrialTracker


def plan(tmp_path, *extra):
    args = ["sparse_kd", "--smoke-test", "--storage-path", str(tmp_path), *extra]
    return plan_from_args(build_parser().parse_args(args), args)


def test_a_cluster_that_may_grow_gets_the_studys_gpu_fraction_even_with_no_gpu_up_yet(tmp_path):
    p = plan(tmp_path)
    assert p.study.gpus == 0.25
    resources, note = trial_resources(p, cluster_gpus=0, fixed=False)
    assert resources == {"cpu": p.study.cpus, "gpu": 0.25}
    assert "tasks wait for GPU nodes" in note and "--cpu-only" in note
    assert trial_resources(p, cluster_gpus=8, fixed=False) == ({"cpu": p.study.cpus, "gpu": 0.25}, "")
    assert trial_resources(p, cluster_gpus=1, fixed=True) == ({"cpu": p.study.cpus, "gpu": 0.25}, "")


def test_cpus_only_by_choice_by_the_study_or_where_no_gpu_will_ever_join(tmp_path):
    p = plan(tmp_path, "--cpu-only")
    assert p.cpu_only
    assert trial_resources(p, cluster_gpus=8, fixed=False) == ({"cpu": p.study.cpus, "gpu": 0}, "")
    no_gpu_study = dataclasses.replace(plan(tmp_path), study=dataclasses.replace(p.study, gpus=0.0), cpu_only=False)
    assert trial_resources(no_gpu_study, cluster_gpus=8, fixed=False)[0]["gpu"] == 0
    resources, note = trial_resources(plan(tmp_path), cluster_gpus=0, fixed=True)
    assert resources["gpu"] == 0 and "none will join" in note


def test_a_trial_restored_on_another_node_lists_both_and_tags_only_what_changed():
    tracker = MlflowTrialTracker("sqlite:///unused.db", "0", "parent", "s", 4)
    first = {"node_id": "n1", "device": "cuda:0", "gpu_ids": "3"}
    tags = {t.key: t.value for t in tracker.placement_tags("t1", {**first, "epoch": 1})}
    assert tags == {"rekd.node_id": "n1", "rekd.device": "cuda:0", "rekd.gpu_ids": "3", "rekd.node_ids": "n1"}
    assert tracker.placement_tags("t1", {**first, "epoch": 2}) == []  # unchanged: nothing sent again
    moved = {"node_id": "n2", "device": "cuda:0", "gpu_ids": "0",
             "restored_from": "s3://b/s/trial_t1/checkpoint_000001/last.pt"}
    tags = {t.key: t.value for t in tracker.placement_tags("t1", moved)}
    assert tags["rekd.node_ids"] == "n1,n2" and tags["rekd.gpu_ids"] == "0"
    assert tags["rekd.restored_from"].startswith("s3://b/")
    assert tracker.get_state()["nodes"] == {"t1": ["n1", "n2"]}  # kept with Tune's experiment state
    assert tracker.placement_tags("t2", {"epoch": 1}) == []  # a result that says nothing about where


def most_at_once(runs) -> int:
    """The largest number of runs that were running at the same moment."""
    events = sorted([(r.info.start_time, 1) for r in runs] + [(r.info.end_time, -1) for r in runs])
    running = best = 0
    for _, step in events:
        running += step
        best = max(best, running)
    return best


@pytest.mark.slow
def test_on_a_ray_with_one_gpu_trials_share_it_in_quarters_and_say_what_they_used(tmp_path):
    """A Ray that declares one GPU (Ray schedules GPU fractions and sets CUDA_VISIBLE_DEVICES whether or not a
    card is there): the study's 0.25 is requested, so trials run side by side on GPU 0 where whole-GPU
    requests would run one at a time; each run says which GPU Ray gave it and which device it really used
    (no CUDA on this machine: the CPU)."""
    tmp = Path(tempfile.mkdtemp(prefix="rg-", dir="/tmp"))  # short: Ray's socket paths
    env = {**os.environ, "TMPDIR": str(tmp)}
    try:
        service = start_service(tmp / "service", env, 4, "--num-gpus", "1")
        job = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--", "python", "-m", "rekd.search", "sparse_kd", "--smoke-test",
             "--num-samples", "4", "--max-concurrency", "4", "--storage-path", str(tmp_path / "r"),
             "--name", "gpu-share"], capture_output=True, text=True, cwd=ROOT, env=service["env"], timeout=600)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "4 at once, {'cpu': 1.0, 'gpu': 0.25} each" in job.stdout
        client = MlflowClient(service["env"]["MLFLOW_TRACKING_URI"])
        experiment = client.get_experiment_by_name("rekd-sparse_kd-smoke")
        children = client.search_runs([experiment.experiment_id],
                                      filter_string="tags.`rekd.search` = 'gpu-share' and tags.`rekd.role` = 'trial'")
        assert len(children) == 4
        for run in children:
            assert run.data.tags["rekd.gpu_ids"] == "0" and run.data.tags["rekd.device"] == "cpu", run.data.tags
        assert most_at_once(children) >= 2  # a whole GPU each would have run them one at a time
    finally:
        stop_service(tmp / "service")
        shutil.rmtree(tmp, ignore_errors=True)
