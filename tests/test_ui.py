"""`python -m rekd.ui` over a real SQLite MLflow store: it serves on 127.0.0.1 only, shows a run's artifacts,
writes nothing in the current folder, and Ctrl-C or SIGTERM leaves no process and no listener; bad input is
one line and exit 2 before anything starts; the links `ui_hint` prints select the runs they say."""
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import pytest
from mlflow.tracking import MlflowClient

from rekd import ui
from rekd.tracking import links
from rekd.cli import python_command
from rekd.tracking.tags import ROLE_TAG
from processes import cmdline, descendants, free_port
from usage import assert_usage_error

NOTE = "hello from a rekd artifact\n"
START_TIMEOUT_S = 180  # a first MLflow server start takes ~12 s alone, longer on a busy 2-core machine


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A results folder as a search leaves it: mlflow.db, a rekd experiment whose artifacts live beside the
    store, a parent run with an artifact and a child run; and an experiment without rekd runs."""
    root = tmp_path_factory.mktemp("ui")
    folder = root / "rekd-results"
    folder.mkdir()
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    experiment_id = client.create_experiment("rekd-demo", artifact_location=(folder / "artifacts" / "rekd-demo").as_uri())
    other_id = client.create_experiment("notes", artifact_location=(folder / "artifacts" / "notes").as_uri())
    parent = client.create_run(experiment_id, run_name="search", tags={ROLE_TAG: "search"}).info.run_id
    children = [client.create_run(experiment_id, run_name=f"trial-{i}",
                                  tags={ROLE_TAG: "trial", "mlflow.parentRunId": parent}).info.run_id for i in range(2)]
    note = root / "note.txt"
    note.write_text(NOTE)
    client.log_artifact(parent, str(note), artifact_path="tables")
    return SimpleNamespace(folder=folder, db=folder / "mlflow.db", client=client, experiment_id=experiment_id,
                           other_id=other_id, parent=parent, children=children)


class Ui:
    """`python -m rekd.ui` in a session of its own, as a terminal runs a foreground command; its stdout read
    line by line as it comes."""

    def __init__(self, argv: list[str], cwd: Path):
        self.process = subprocess.Popen([sys.executable, "-m", "rekd.ui", *argv], cwd=cwd, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for_line(self, text: str, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"no {text!r} in {self.lines}; stderr: {self.process.stderr.read()}")
            time.sleep(0.2)

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        code = self.process.wait(timeout)
        self._reader.join(10)
        return code, self.process.stderr.read()

    def kill(self) -> None:
        for pid in descendants(self.process.pid):  # only what this test started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.kill()


def get(url: str, host: str = "") -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on `port` (hex, as /proc/net/tcp writes them)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                found.add(address)
    return found


def live(pid: int) -> bool:
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        return False
    except ConnectionRefusedError:
        return True


def test_ctrl_c_stops_the_ui_and_its_workers_after_it_served_the_store_and_its_artifacts_on_loopback_only(
        store, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    ui_process = Ui([str(store.folder), "--port", str(port)], cwd)
    link = f"{base}/#/experiments/{store.experiment_id}?workflowType=machine_learning"
    ui_process.wait_for_line(link)
    try:
        assert not any(f"#/experiments/{store.other_id}?" in line for line in ui_process.lines)  # no rekd runs there
        server = [pid for pid in descendants(ui_process.process.pid) if "mlflow server" in cmdline(pid)]
        assert len(server) == 1 and os.getsid(server[0]) == server[0] == os.getpgid(server[0])  # a session of its own
        started = descendants(ui_process.process.pid)
        assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1, and no other interface

        status, body = get(f"{base}/api/2.0/mlflow/experiments/get?experiment_id={store.experiment_id}")
        assert status == 200 and json.loads(body)["experiment"]["name"] == "rekd-demo"
        status, body = get(f"{base}/ajax-api/2.0/mlflow/artifacts/list?run_id={store.parent}&path=tables")
        assert status == 200 and [f["path"] for f in json.loads(body)["files"]] == ["tables/note.txt"]
        status, body = get(f"{base}/get-artifact?path=tables/note.txt&run_uuid={store.parent}")
        assert (status, body.decode()) == (200, NOTE)
        status, _ = get(f"{base}/api/2.0/mlflow/experiments/get?experiment_id={store.experiment_id}",
                        host="rebound.example")
        assert status == 403  # a foreign Host header: a page that rebinds its name to 127.0.0.1 is refused
        status, _ = get(f"{base}/api/2.0/mlflow-artifacts/artifacts/probe.txt")
        assert status == 503  # no upload API, which would write into ./mlartifacts
    except BaseException:
        ui_process.kill()
        raise

    os.killpg(ui_process.process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does to the foreground group
    code, err = ui_process.finish()
    assert code == 0, err
    assert ui_process.lines[-2:] == ["SIGINT: stopping the MLflow server", "stopped: no process of it is left"]
    assert not [pid for pid in started if live(pid)]
    assert refuses_connections(port)
    assert list(cwd.iterdir()) == []
    assert not {"mlruns", "mlartifacts"} & {p.name for p in store.folder.iterdir()}


def test_sigterm_stops_the_ui_started_on_a_sqlite_uri_for_one_experiment(store, tmp_path):
    port = free_port()
    ui_process = Ui([f"sqlite:///{store.db}", "--port", str(port), "--experiment", "notes"], tmp_path)
    ui_process.wait_for_line("Ctrl-C stops it.")
    started = descendants(ui_process.process.pid)
    assert ui_process.lines[1:] == [f"  notes: http://127.0.0.1:{port}/#/experiments/{store.other_id}"
                                    "?workflowType=machine_learning", "Ctrl-C stops it."]
    os.kill(ui_process.process.pid, signal.SIGTERM)
    code, err = ui_process.finish()
    assert code == 0, err
    assert ui_process.lines[-1] == "stopped: no process of it is left"
    assert not [pid for pid in started if live(pid)]
    assert refuses_connections(port)
    assert list(tmp_path.iterdir()) == []


BAD = [
    (["{tmp}/nowhere"], "nowhere does not exist"),
    ([], "rekd-results does not exist"),  # the default, in an empty current folder
    (["{tmp}"], "no MLflow store at"),
    (["sqlite:///{tmp}/mlflow.db"], "no MLflow store at"),
    (["sqlite:///relative/mlflow.db"], "the path is not absolute"),
    (["sqlite:///{tmp}/missing/mlflow.db"], "does not exist"),
    (["http://127.0.0.1:5000"], "is a tracking server, which serves its own UI"),
    (["{tmp}/junk"], "is not an MLflow store"),
    (["{store}", "--experiment", "rekd-nope"], "unknown experiment 'rekd-nope'"),
    (["{store}", "--port", "70000"], "--port 70000 is not allowed"),
    (["{store}", "--port", "many"], "invalid int value: 'many'"),
]


def snapshot(*folders: Path) -> dict:
    return {p: p.stat().st_mtime_ns for folder in folders for p in folder.rglob("*")}


@pytest.mark.parametrize("argv, message", BAD)
def test_bad_input_is_one_line_exit_2_and_creates_nothing(argv, message, store, tmp_path, monkeypatch, capsys):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "mlflow.db").write_text("not a database\n")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path, store.folder)
    try:
        code = ui.main([a.format(tmp=tmp_path, store=store.folder) for a in argv])
    except SystemExit as e:  # argparse's errors
        code = e.code
    out, err = capsys.readouterr()
    assert_usage_error(code, out, err, message)
    assert snapshot(tmp_path, store.folder) == before


def test_a_port_in_use_is_one_line_exit_2_before_anything_starts(store, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        before = snapshot(store.folder)
        code = ui.main([str(store.folder), "--port", str(port)])
    out, err = capsys.readouterr()
    assert_usage_error(code, out, err, f"--port {port} is in use on 127.0.0.1")
    assert snapshot(store.folder) == before  # no server log, no lock file


def test_the_hint_for_a_tracking_server_links_the_child_runs_and_the_parent_run(store):
    lines = links.ui_hint("https://alice:secret@mlflow.example.org/prefix/", "rekd-demo", store.experiment_id,
                       store.parent)
    base = "https://mlflow.example.org/prefix"
    assert lines[0] == f"MLflow: experiment 'rekd-demo', parent run {store.parent}; open"
    assert lines[2] == f"  the parent run: {base}/#/experiments/{store.experiment_id}/runs/{store.parent}" \
                       "?workflowType=machine_learning"
    children = lines[1].split(": ", 1)[1]
    assert children.startswith(f"{base}/#/experiments/{store.experiment_id}/runs?")
    assert "secret" not in "\n".join(lines)
    query = parse_qs(urlsplit(children.split("#", 1)[1]).query)
    assert query["workflowType"] == ["machine_learning"] and query["orderByAsc"] == ["true"]
    assert query["orderByKey"] == ["tags.`mlflow.runName`"]  # the UI's own key for its run-name sort
    # The filter the UI will send is a valid MLflow search expression that finds exactly the child runs.
    found = store.client.search_runs([store.experiment_id], query["searchFilter"][0])
    assert sorted(run.info.run_id for run in found) == sorted(store.children)


def test_the_hint_for_a_sqlite_store_gives_the_command_that_serves_it_and_the_links_it_will_serve(store):
    lines = links.ui_hint(f"sqlite:///{store.db}", "rekd-demo", store.experiment_id, store.parent)
    assert lines[0] == f"MLflow: experiment 'rekd-demo', parent run {store.parent}; serve the MLflow UI with"
    command = shlex.split(lines[1])
    assert command[:3] == [python_command(), "-m", "rekd.ui"]
    args = ui.build_parser().parse_args(command[3:])
    assert ui.store_file(args.store) == store.db and args.experiment == "rekd-demo" and args.port == 5000
    assert lines[2].startswith(f"  then open its child runs: http://127.0.0.1:5000/#/experiments/{store.experiment_id}/runs?")
    assert lines[3] == f"  or the parent run: http://127.0.0.1:5000/#/experiments/{store.experiment_id}/runs/" \
                       f"{store.parent}?workflowType=machine_learning"


def test_the_tag_rekd_ui_looks_for_is_the_one_rekds_tracker_writes():
    assert ui.ROLE_TAG == ROLE_TAG
