"""--resume never hangs and never writes to the wrong place: a missing or corrupt Optuna study, state file or
Tune experiment state is refused in one line before Tune starts; a finished search is not resumed; a
moved results folder resumes where it is now (--storage-path wins); a truncated checkpoint fails its
trial with a message that names the stored file."""
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from searches import ROOT, finish, runs, start_search, wait_for_an_epoch
from usage import assert_usage_error

from rekd.search.__main__ import main as search_main

pytestmark = pytest.mark.slow
NAME = "cut"


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    """A search stopped by Ctrl-C in mid-flight: the folder (results and MLflow store) each test copies."""
    base = tmp_path_factory.mktemp("interrupted")
    tmp = Path(tempfile.mkdtemp(prefix="ri-", dir="/tmp"))
    try:
        proc, _ = start_search(base, tmp, NAME)
        wait_for_an_epoch(proc, base, NAME)
        proc.send_signal(signal.SIGINT)
        code, _, err = finish(proc, timeout=120)
        assert code == 130, err[-3000:]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return base / "r"


def copy_of(interrupted: Path, tmp_path: Path) -> Path:
    storage = tmp_path / "r"
    shutil.copytree(interrupted, storage)
    return storage


def resume_args(storage: Path) -> list[str]:
    return ["default_kd", "--resume", NAME, "--storage-path", str(storage)]


def spoil_optuna_missing(folder: Path) -> None:
    (folder / "optuna.db").unlink()


def spoil_optuna_corrupt(folder: Path) -> None:
    (folder / "optuna.db").write_bytes(b"not a database" * 100)


def spoil_state_corrupt(folder: Path) -> None:
    (folder / "rekd-search.json").write_text('{"argv": ["default_kd"')


def spoil_state_of_an_earlier_rekd(folder: Path) -> None:
    state = json.loads((folder / "rekd-search.json").read_text())
    del state["format"]  # as written before the package layout moved the pickled searcher and tracker
    (folder / "rekd-search.json").write_text(json.dumps(state))


def spoil_tune_state_missing(folder: Path) -> None:
    for path in folder.glob("experiment_state-*.json"):
        path.unlink()


@pytest.mark.parametrize("spoil, message", [
    (spoil_optuna_missing, "its Optuna study"),
    (spoil_optuna_corrupt, "is unreadable"),
    (spoil_state_corrupt, "rekd-search.json is corrupt"),
    (spoil_state_of_an_earlier_rekd, "started by an earlier rekd (search state format 1; this rekd reads 2)"),
    (spoil_tune_state_missing, "Tune's experiment state is missing"),
])
def test_a_resume_with_a_broken_record_is_refused_in_one_line(interrupted, tmp_path, capsys, spoil, message):
    storage = copy_of(interrupted, tmp_path)
    spoil(storage / NAME)
    before = sorted(p.name for p in (storage / NAME).iterdir())
    code = search_main(resume_args(storage))
    out, err = capsys.readouterr()
    assert_usage_error(code, out, err, message)
    assert "the search cannot be resumed" in err
    assert sorted(p.name for p in (storage / NAME).iterdir()) == before  # nothing written, nothing created
    _, parent, _ = runs(tmp_path, NAME)
    assert parent.info.status == "KILLED"


def test_a_moved_folder_resumes_where_it_is_and_a_truncated_checkpoint_names_its_file(interrupted, tmp_path):
    storage = copy_of(interrupted, tmp_path / "moved")
    stopped = [c for c in runs(tmp_path / "moved", NAME)[2] if c.data.tags.get("rekd.outcome") == "interrupted"]
    truncated = [p for c in stopped for p in (storage / NAME).glob(f"trial_{c.data.tags['rekd.trial_id']}/checkpoint_*/last.pt")]
    assert truncated, "the interrupted search left no checkpoint of an interrupted trial"
    for path in truncated:  # a disk that filled up, a copy cut short
        path.write_bytes(path.read_bytes()[:1000])
    away = interrupted.with_name(interrupted.name + "-away")
    interrupted.rename(away)  # the place it was started in is gone, as after `mv`
    try:
        resumed = subprocess.run([sys.executable, "-m", "rekd.search", *resume_args(storage)], capture_output=True,
                                 text=True, cwd=tmp_path, timeout=600)
        assert not interrupted.exists()  # nothing was written at the old place (no new store, no new folder)
    finally:
        away.rename(interrupted)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    _, parent, children = runs(tmp_path / "moved", NAME)
    assert parent.info.status == "FINISHED"
    errored = [c for c in children if c.data.tags.get("rekd.outcome") == "errored"]
    assert errored, [c.data.tags for c in children]  # those Tune restored from a truncated checkpoint
    for child in errored:
        error = child.data.tags["rekd.error"]
        assert "UsageError: checkpoint" in error and "not a readable torch file" in error, error
        assert any(str(path) in error for path in truncated), error  # the stored file, not a temp copy
        assert "Failure #" not in error and "rekd-trial-" not in error
    assert len([c for c in children if c.info.status == "FINISHED"]) + len(errored) == 4

    again = subprocess.run([sys.executable, "-m", "rekd.search", *resume_args(storage)], capture_output=True,
                           text=True, cwd=ROOT, timeout=120)
    assert again.returncode == 2 and "the search has finished" in again.stderr, again.stderr[-2000:]
