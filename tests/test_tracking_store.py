"""The MLflow store of every command: a bad tracking URI is one line, exit status 2, and creates nothing;
a brand-new SQLite store opened by several processes at once comes out healthy."""
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rekd.evaluate.best import main as best_main
from rekd.errors import UsageError
from rekd.evaluate.final import main as final_main
from rekd.locks import FileLock
from rekd.evaluate.reproduce import main as reproduce_main
from rekd.search.__main__ import main as search_main
from rekd.tracking.store import artifact_location, check_tracking_uri, open_store, resolve_tracking_uri
from usage import assert_usage_error

ROOT = Path(__file__).resolve().parent.parent
ENV = "MLFLOW_TRACKING_URI"

# Each URI rekd refuses, with what the one line says about it ({tmp}: the test's folder, which holds `dir/`).
BAD_URIS = [
    ("file://{tmp}/dir", "MLflow 3 refuses the file store"),
    ("foo://bar", "rekd does not use 'foo' stores"),
    ("sqlite:///{tmp}/nonexistent/dir/mlflow.db", "folder {tmp}/nonexistent/dir does not exist"),
    ("sqlite://", "an in-memory store is lost when the command ends"),
    ("sqlite:///relative.db", "the path is not absolute"),
    ("sqlite:///{tmp}/dir", "{tmp}/dir is a folder"),
]


@pytest.fixture
def place(tmp_path, monkeypatch) -> Path:
    """An empty current folder (a relative store would land there) beside a folder named dir/."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.delenv(ENV, raising=False)
    return tmp_path


def call(main, argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def refuse(main, argv: list[str], uri: str, fragment: str, source: str, place: Path, monkeypatch, capsys) -> None:
    """Run a command with `uri` from `source` (the flag, the variable, or a file the command reads); it must be
    one line naming the value and its source, and leave `place` as it was."""
    uri, fragment = uri.replace("{tmp}", str(place)), fragment.replace("{tmp}", str(place))
    if source == ENV:
        monkeypatch.setenv(ENV, uri)
    elif source == "--tracking-uri":
        argv = [*argv, "--tracking-uri", uri]
    before = sorted(str(p) for p in place.rglob("*"))
    code, out, err = call(main, argv, capsys)
    assert_usage_error(code, out, err, f"{source} {uri!r} is not allowed: {fragment}")
    assert "; allowed: " in err
    assert sorted(str(p) for p in place.rglob("*")) == before  # no store, no folder, no results


@pytest.mark.parametrize("source", ["--tracking-uri", ENV])
@pytest.mark.parametrize("uri,fragment", BAD_URIS, ids=[u for u, _ in BAD_URIS])
def test_search_refuses_a_bad_tracking_uri_in_one_line_and_creates_nothing(uri, fragment, source, place,
                                                                           monkeypatch, capsys):
    argv = ["sparse_kd", "--smoke-test", "--storage-path", str(place / "r")]
    refuse(search_main, argv, uri, fragment, source, place, monkeypatch, capsys)


@pytest.mark.parametrize("source", ["--tracking-uri", ENV])
@pytest.mark.parametrize("uri,fragment", BAD_URIS, ids=[u for u, _ in BAD_URIS])
def test_reproduce_refuses_a_bad_tracking_uri_before_ray_starts(uri, fragment, source, place, monkeypatch, capsys):
    argv = ["table1", "--smoke-test", "--out", str(place / "o")]
    refuse(reproduce_main, argv, uri, fragment, source, place, monkeypatch, capsys)


@pytest.mark.parametrize("uri,fragment,source", [
    ("foo://bar", "rekd does not use 'foo' stores", "--tracking-uri"),
    ("sqlite:///{tmp}/dir", "{tmp}/dir is a folder", ENV),
])
def test_final_refuses_a_bad_tracking_uri_before_training(uri, fragment, source, place, monkeypatch, capsys):
    best = place / "dir" / "best.yaml"
    best.write_text("configs:\n- settings: {mode: baseline}\n")
    argv = [str(best), "--seeds", "1", "--epochs", "1", "--out", str(place / "f")]
    refuse(final_main, argv, uri, fragment, source, place, monkeypatch, capsys)


def test_final_names_the_best_file_when_its_tracking_uri_is_bad(place, monkeypatch, capsys):
    best = place / "dir" / "best.yaml"
    best.write_text(f"tracking_uri: file://{place}/dir\nconfigs:\n- settings: {{mode: baseline}}\n")
    argv = [str(best), "--seeds", "1", "--epochs", "1", "--out", str(place / "f")]
    refuse(final_main, argv, "file://{tmp}/dir", "MLflow 3 refuses the file store", f"{best}: tracking_uri",
           place, monkeypatch, capsys)


@pytest.mark.parametrize("uri,fragment,source", [
    ("foo://bar", "rekd does not use 'foo' stores", "--tracking-uri"),
    ("sqlite://", "an in-memory store is lost when the command ends", ENV),
    ("sqlite:///relative.db", "the path is not absolute", "--tracking-uri"),
    ("sqlite:///{tmp}/dir", "{tmp}/dir is a folder", "--tracking-uri"),
])
def test_best_refuses_a_bad_tracking_uri_in_one_line(uri, fragment, source, place, monkeypatch, capsys):
    argv = ["rekd-sparse_kd", "--out", str(place / "best.yaml")]
    refuse(best_main, argv, uri, fragment, source, place, monkeypatch, capsys)


# -- resolve_tracking_uri and check_tracking_uri ------------------------------------------------------------
def test_the_default_store_is_an_absolute_sqlite_file_in_the_results_folder(place):
    assert resolve_tracking_uri(None, Path("results")) == f"sqlite:///{place / 'cwd' / 'results' / 'mlflow.db'}"
    assert resolve_tracking_uri(None, place / "new" / "r") == f"sqlite:///{place / 'new' / 'r' / 'mlflow.db'}"
    assert not (place / "cwd" / "results").exists() and not (place / "new").exists()  # checking creates nothing


def test_the_flag_wins_over_the_environment_which_wins_over_the_default(place, monkeypatch):
    monkeypatch.setenv(ENV, "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None, place / "r") == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("databricks://team", place / "r") == "databricks://team"
    monkeypatch.setenv(ENV, "")  # set but empty counts as unset, as it does for MLflow
    assert resolve_tracking_uri(None, place / "r") == f"sqlite:///{place / 'r' / 'mlflow.db'}"


def test_a_bad_value_names_where_it_came_from(place, monkeypatch):
    monkeypatch.setenv(ENV, "./mlruns")
    with pytest.raises(UsageError, match=r"^MLFLOW_TRACKING_URI './mlruns' is not allowed: MLflow 3 refuses"):
        resolve_tracking_uri(None, place / "r")
    with pytest.raises(UsageError, match=r"^--out-store 'foo://bar' is not allowed"):
        resolve_tracking_uri("foo://bar", place / "r", flag_name="--out-store")
    with pytest.raises(UsageError, match=r"^--tracking-uri '' is not allowed: it is empty"):
        resolve_tracking_uri("", place / "r")  # an unset shell variable, not a request for the default


def test_only_the_results_folder_may_be_created_for_a_sqlite_store(place):
    inside = f"sqlite:///{place / 'r' / 'sub' / 'mlflow.db'}"
    assert check_tracking_uri(inside, "--tracking-uri", creatable=place / "r") == inside
    with pytest.raises(UsageError, match="does not exist; allowed: a SQLite file in an existing writable folder$"):
        check_tracking_uri(inside, "--tracking-uri")
    (place / "a-file").write_text("")
    with pytest.raises(UsageError, match="a-file is not a folder"):
        check_tracking_uri(f"sqlite:///{place / 'a-file' / 'm.db'}", "--tracking-uri", creatable=place / "a-file")
    assert not (place / "r").exists()


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "https://mlflow.example.org/", "databricks",
                                 "databricks://profile", "sqlite:////tmp/mlflow.db"])
def test_the_allowed_forms_pass(uri):
    assert check_tracking_uri(uri, "--tracking-uri") == uri


@pytest.mark.parametrize("uri,fragment", [
    ("postgresql://rekd:s3cret@db/mlflow", "'postgresql://rekd:***@db/mlflow' is not allowed: rekd does not use"),
    ("http://", "it is not a URL with a host"),
    ("databricks://", "it names no profile"),
    ("sqlite:////tmp/mlflow.db?mode=ro", "without a query"),
    ("sqlite:////dev/null", "/dev/null is not a regular file"),
])
def test_other_forms_are_refused_and_a_password_is_not_printed(uri, fragment):
    with pytest.raises(UsageError, match=r"allowed: ") as error:
        check_tracking_uri(uri, "--tracking-uri")
    assert fragment in str(error.value) and "s3cret" not in str(error.value)


# -- one creator at a time -----------------------------------------------------------------------------------
OPENER = r"""
import sys, time
from pathlib import Path
import rekd.tracking.runs  # the slow imports happen before the start line, so that the opens really overlap
from rekd.tracking.store import open_store
go, ready, uri, experiment = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
ready.touch()
while not go.exists():
    time.sleep(0.002)
client, experiment_id = open_store(uri, experiment)
print(experiment_id)
"""


@pytest.mark.slow
def test_four_processes_opening_a_brand_new_store_at_once_leave_it_healthy(tmp_path):
    uri, n = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}", 4
    env = {k: v for k, v in os.environ.items() if k != ENV}
    procs = [subprocess.Popen([sys.executable, "-c", OPENER, str(tmp_path / "go"), str(tmp_path / f"ready-{i}"), uri,
                               f"exp-{i}"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(n)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{i}").exists() for i in range(n)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "an opener did not start"
        time.sleep(0.05)
    (tmp_path / "go").touch()
    ids = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
        ids.append(out.strip().splitlines()[-1])  # after any "waiting for" progress line
    assert len(set(ids)) == n
    client, experiment_id = open_store(uri, "exp-0")  # a fifth open of the same store
    assert experiment_id == ids[0]
    names = {e.name for e in client.search_experiments()}
    assert {f"exp-{i}" for i in range(n)} <= names and len(names - {"Default"}) == n


@pytest.mark.slow
def test_an_open_waits_for_the_holder_of_the_store_and_says_who_it_is(tmp_path, capsys):
    store = tmp_path / "mlflow.db"
    lock = FileLock(f"{store}.lock").acquire()  # flock: a second open file in this process is refused too
    threading.Timer(3.0, lock.release).start()
    started = time.monotonic()
    _, experiment_id = open_store(f"sqlite:///{store}", "exp")
    assert time.monotonic() - started >= 3.0 and experiment_id
    out = capsys.readouterr().out
    assert f"waiting for PID {os.getpid()} on host" in out and f"the MLflow store {store}" in out


def test_an_experiment_of_a_sqlite_store_keeps_its_artifacts_beside_the_store_not_in_the_current_folder(
        tmp_path, monkeypatch):
    somewhere = tmp_path / "somewhere"
    somewhere.mkdir()
    monkeypatch.chdir(somewhere)
    store = tmp_path / "results" / "mlflow.db"
    client, experiment_id = open_store(f"sqlite:///{store}", "rekd-x y/z")
    location = client.get_experiment(experiment_id).artifact_location
    assert location == (tmp_path / "results" / "artifacts" / "rekd-x_y_z").as_uri()
    run = client.create_run(experiment_id)
    plot = tmp_path / "plot.png"
    plot.write_bytes(b"png")
    client.log_artifact(run.info.run_id, str(plot), artifact_path="summary")
    assert (tmp_path / "results" / "artifacts" / "rekd-x_y_z" / run.info.run_id / "artifacts" / "summary"
            / "plot.png").read_bytes() == b"png"
    assert list(somewhere.iterdir()) == []  # MLflow's default would have been ./mlruns here
    # a tracking server chooses its artifact store itself
    assert artifact_location("http://127.0.0.1:5000", "rekd-x") is None
