"""One writer per search, one creator per store: first searches started together on one fresh storage path
all succeed (none corrupts the MLflow store), the same --name twice at once is refused for one of them,
and a --resume while the search runs is refused naming the running driver."""
import os
import signal
import socket
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient
from searches import ROOT, finish, runs, start_search, wait_for_an_epoch

pytestmark = pytest.mark.slow
SMALL = ["default_kd", "--smoke-test", "--num-samples", "2", "--epochs", "1", "--max-concurrency", "1"]


def test_first_searches_started_together_on_a_fresh_path_succeed_or_are_refused_cleanly(tmp_path):
    storage = tmp_path / "r"
    procs = [subprocess.Popen([sys.executable, "-m", "rekd.search", *SMALL, "--storage-path", str(storage),
                               "--name", name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for name in ("a", "b", "a")]  # all at once; two of them want the same name
    results = [(p.pid, *finish(p, timeout=600)) for p in procs]
    by_name = {"a": [r for r in (results[0], results[2])], "b": [results[1]]}
    assert results[1][1] == 0, results[1][3][-3000:]
    codes = sorted(r[1] for r in by_name["a"])
    assert codes == [0, 2], [r[3][-2000:] for r in by_name["a"]]
    refused = next(r for r in by_name["a"] if r[1] == 2)
    lines = refused[3].strip().splitlines()
    assert len(lines) == 1 and "--name 'a'" in lines[0], refused[3]
    # the other 'a' is running (named by PID) or, in the instant between its folder and its lock, only exists
    assert "is being run by PID" in lines[0] or "already exists" in lines[0], refused[3]
    # the store is healthy: both searches are in it, each with its own parent and trials
    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rekd-default_kd-smoke")
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.`rekd.role` = 'search'")
    assert sorted(p.data.tags["rekd.search"] for p in parents) == ["a", "b"]
    assert all(p.info.status == "FINISHED" for p in parents)
    # and a later search on the same path works
    later = subprocess.run([sys.executable, "-m", "rekd.search", *SMALL, "--storage-path", str(storage),
                            "--name", "c"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert later.returncode == 0, later.stderr[-3000:]


def test_a_resume_while_the_search_runs_is_refused_naming_the_running_driver(tmp_path, own_tmp):
    proc, env = start_search(tmp_path, own_tmp, "busy", "--epochs", "60")  # still running when resumed
    try:
        wait_for_an_epoch(proc, tmp_path, "busy")
        second = subprocess.run([sys.executable, "-m", "rekd.search", "default_kd", "--resume", "busy",
                                 "--storage-path", str(tmp_path / "r")], capture_output=True, text=True, cwd=ROOT,
                                env=env, timeout=120)
        assert second.returncode == 2, second.stderr[-3000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"is being run by PID {proc.pid} on host" in lines[0], second.stderr
        _, parent, _ = runs(tmp_path, "busy")
        assert parent.info.status == "RUNNING"  # the refused resume touched nothing
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        finish(proc, timeout=120)


def test_a_default_name_taken_in_the_same_second_gets_a_suffix_and_a_chosen_one_is_refused(tmp_path):
    from rekd.errors import UsageError
    from rekd.search.__main__ import claim_name
    from rekd.search.plan import build_parser, plan_from_args

    argv = ["default_kd", "--smoke-test", "--storage-path", str(tmp_path)]
    plan = plan_from_args(build_parser().parse_args(argv), argv)
    (tmp_path / plan.name).mkdir()  # another `make run` started this second
    claimed, lock = claim_name(plan, chosen=False)
    assert claimed.name == f"{plan.name}-2" and (tmp_path / claimed.name).is_dir()
    assert claimed.argv[claimed.argv.index("--name") + 1] == claimed.name  # what --resume will rebuild
    lock.release()
    with pytest.raises(UsageError, match="already exists"):
        claim_name(plan, chosen=True)


def test_a_new_search_given_the_name_of_a_running_one_is_refused_naming_its_driver(tmp_path):
    from rekd.errors import UsageError
    from rekd.locks import holder_of
    from rekd.search.__main__ import claim_name
    from rekd.search.plan import build_parser, plan_from_args
    from rekd.search.state import LOCK_FILE

    argv = ["default_kd", "--smoke-test", "--storage-path", str(tmp_path), "--name", "a"]
    plan = plan_from_args(build_parser().parse_args(argv), argv)
    _, running = claim_name(plan, chosen=True)  # flock: this process's second open of the file is refused too
    assert holder_of(tmp_path / "a" / LOCK_FILE) == f"PID {os.getpid()} on host {socket.gethostname()}"
    with pytest.raises(UsageError, match=rf"--name 'a': a search of that name is being run by PID {os.getpid()} "
                                         rf"on host .*--resume a$"):
        claim_name(plan, chosen=True)
    lock_text = (tmp_path / "a" / LOCK_FILE).read_text()
    running.release()
    assert "pid" in lock_text  # the probe wrote nothing into the holder's record
    assert holder_of(tmp_path / "a" / LOCK_FILE) is None and holder_of(tmp_path / "none") is None
    with pytest.raises(UsageError, match="already exists"):  # a search that ended: continue it or rename
        claim_name(plan, chosen=True)
