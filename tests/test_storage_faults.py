"""A results folder that becomes unwritable mid-search (permissions changed, a read-only remount, a full
disk) ends the search as failed with one line that says so, its runs closed, instead of a long traceback
with trials left RUNNING."""
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from searches import EXPERIMENT, ROOT, SEARCH, finish

pytestmark = pytest.mark.slow


def start(storage: Path, args: list[str], env: dict) -> subprocess.Popen:
    """The search, in a mount namespace of its own where `storage` can later be made read-only when this
    runs as root (permission bits do not stop root); as another user, chmod does it."""
    command = [sys.executable, "-m", "rekd.search", *args]
    if os.geteuid() == 0:
        command = ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private", *command]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                            start_new_session=True)


def make_read_only(storage: Path, proc: subprocess.Popen) -> None:
    if os.geteuid() == 0:  # a read-only mount over it, seen only by the search's processes (files it has
        # open stay writable, as on a remount; everything opened or created from now on is refused)
        target = shlex.quote(str(storage))
        subprocess.run(["nsenter", "-t", str(proc.pid), "--user", "--mount", "--preserve-credentials", "sh", "-c",
                        f"mount --bind {target} {target} && mount -o remount,bind,ro {target}"], check=True)
        return
    for path in [storage, *storage.rglob("*")]:  # chmod -R a-w
        if not path.is_symlink():
            path.chmod(path.stat().st_mode & ~0o222)


def test_a_results_folder_that_becomes_unwritable_ends_the_search_in_one_line(own_tmp):
    storage, store = own_tmp / "r", own_tmp / "store"
    storage.mkdir()
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"  # the store elsewhere, so that the runs can be closed
    proc = start(storage, [*SEARCH, "--epochs", "30", "--storage-path", str(storage), "--name", "ro",
                           "--tracking-uri", uri], {**os.environ, "TMPDIR": str(own_tmp)})
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if list((storage / "ro").glob("trial_*/checkpoint_*")):
                break
            time.sleep(0.3)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        make_read_only(storage / "ro", proc)
        code, out, err = finish(proc, timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for path in [storage, *storage.rglob("*")]:  # let the fixture remove it
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | 0o700)
    assert code == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert "error: search ro failed: the results folder" in last and "became unwritable" in last, err[-3000:]
    # SQLite names the same fault several ways, by which write hits it first (its journal: "disk I/O error")
    assert any(word in last for word in ("Read-only file system", "readonly database", "unable to open database file",
                                         "Permission denied", "disk I/O error")), last
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    found = client.search_runs([experiment.experiment_id])
    parent = next(r for r in found if r.data.tags.get("rekd.role") == "search")
    assert parent.info.status == "FAILED" and "became unwritable" in parent.data.tags["rekd.error"]
    assert parent.data.tags["rekd.outcome"] == "failed"
    children = [r for r in found if r.data.tags.get("rekd.role") == "trial"]
    assert children and not [c for c in children if c.info.status == "RUNNING"]
