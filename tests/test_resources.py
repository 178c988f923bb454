"""What trials request: the study's GPU fraction wherever GPUs may come, CPUs only by choice or where none
ever will; and where each trial ran, as its MLflow run's tags say."""
import dataclasses
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from cluster import BIN, ROOT, start_service, stop_service
from mlflow.tracking import MlflowClient

from rekd.search.driver import trial_resources
from rekd.errors import UsageError
from rekd.search.plan import build_parser, plan_from_args
from rekd.search.study import load_study
from rekd.tracking.tune_callback import MlflowTrialTracker
from rekd.search.trainable import unusable_gpu


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


def test_a_gpu_torch_cannot_use_is_named_unless_the_trial_was_told_to_use_the_cpu(tmp_path):
    assert not torch.cuda.is_available()  # this machine: a GPU Ray declares is one torch cannot use
    assert unusable_gpu("none", "auto") == "" and unusable_gpu("0", "cpu") == ""
    reason = unusable_gpu("0", "auto")
    assert "Ray gave this trial GPU 0" in reason and "cpu_fallback: true" in reason
    study = tmp_path / "s.yaml"
    text = (ROOT / "search_spaces" / "baseline.yaml").read_text()
    study.write_text(text.replace("resources: {cpu: 1, gpu: 0.25}", "resources: {cpu: 1, gpu: 0.25, cpu_fallback: yes}"))
    assert load_study(str(study)).cpu_fallback is True
    study.write_text(text.replace("resources: {cpu: 1, gpu: 0.25}", "resources: {cpu: 1, gpu: 0.25, cpu_fallback: 2}"))
    with pytest.raises(UsageError, match="resources.cpu_fallback: 2 has the wrong type; allowed: true or false"):
        load_study(str(study))


def most_at_once(runs) -> int:
    """The largest number of runs that were running at the same moment."""
    events = sorted([(r.info.start_time, 1) for r in runs] + [(r.info.end_time, -1) for r in runs])
    running = best = 0
    for _, step in events:
        running += step
        best = max(best, running)
    return best


@pytest.mark.slow
def test_on_a_ray_with_one_gpu_trials_share_it_in_quarters_and_never_hide_that_they_used_the_cpu(tmp_path):
    """A Ray that declares one GPU (Ray schedules GPU fractions and sets CUDA_VISIBLE_DEVICES whether or not a
    card is there): the study's 0.25 is requested, so trials run side by side on GPU 0 where whole-GPU
    requests would run one at a time. torch cannot use that GPU here: a study that allows it trains on the
    CPU and each run says so (GPU 0 given, device cpu); a study that does not stops its trials with the
    reason, rather than passing CPU results off as a GPU search."""
    tmp = Path(tempfile.mkdtemp(prefix="rg-", dir="/tmp"))  # short: Ray's socket paths
    env = {**os.environ, "TMPDIR": str(tmp)}
    study = yaml.safe_load((ROOT / "search_spaces" / "sparse_kd.yaml").read_text())
    study["resources"] = {**study["resources"], "cpu_fallback": True}
    (tmp_path / "fallback.yaml").write_text(yaml.safe_dump(study))
    try:
        service = start_service(tmp / "service", env, 4, "--num-gpus", "1")

        def search(*args):
            return subprocess.run([str(BIN / "ray"), "job", "submit", "--", "python", "-m", "rekd.search", *args,
                                   "--smoke-test", "--storage-path", str(tmp_path / "r")],
                                  capture_output=True, text=True, cwd=ROOT, env=service["env"], timeout=600)

        client = MlflowClient(service["env"]["MLFLOW_TRACKING_URI"])

        def trials(experiment: str, name: str):
            found = client.get_experiment_by_name(experiment)
            return client.search_runs([found.experiment_id],
                                      filter_string=f"tags.`rekd.search` = '{name}' and tags.`rekd.role` = 'trial'")

        job = search("sparse_kd", "--search-space", str(tmp_path / "fallback.yaml"), "--num-samples", "4",
                     "--max-concurrency", "4", "--name", "gpu-share")
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "4 at once, {'cpu': 1.0, 'gpu': 0.25} each" in job.stdout
        children = trials("rekd-sparse_kd-smoke", "gpu-share")
        assert len(children) == 4
        for run in children:
            assert run.data.tags["rekd.gpu_ids"] == "0" and run.data.tags["rekd.device"] == "cpu", run.data.tags
        assert most_at_once(children) >= 2  # a whole GPU each would have run them one at a time

        job = search("baseline", "--num-samples", "2", "--name", "no-fallback")
        assert job.returncode == 1, job.stdout[-3000:] + job.stderr[-3000:]
        assert "no trial produced a result" in job.stdout + job.stderr and "MLflow unreachable" not in job.stdout + job.stderr
        runs = trials("rekd-baseline-smoke", "no-fallback")
        assert len(runs) == 2
        for run in runs:
            tags = run.data.tags
            assert run.info.status == "FAILED" and tags["rekd.outcome"] == "cuda_unusable", tags
            assert "Ray gave this trial GPU 0" in tags["rekd.stop_detail"]
            assert "resources.cpu_fallback: true" in tags["rekd.stop_detail"]
    finally:
        stop_service(tmp / "service")
        shutil.rmtree(tmp, ignore_errors=True)
