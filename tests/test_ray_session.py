"""Which Ray a rekd command runs on (rekd.search.ray_session), and the local service's own Ray (rekd.service): a
private Ray that no other `ray.init()` finds, a cluster address that fails in seconds with one line, and
nothing left behind (folders, state, processes) after a normal exit, SIGTERM, a failed start or Ctrl-C.

Every Ray here is real and on 127.0.0.1, started in a subprocess whose Ray temp root (RAY_TMPDIR) and
system temp folder (TMPDIR) are a folder of the test's own: the machine's /tmp/ray is never read or written.
"""
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from processes import cmdline, descendants, free_port
from usage import assert_usage_error

from rekd.errors import UsageError
from rekd.search.ray_session import join_cluster

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# A process that starts its Ray and says which one it got, and where the private folder is.
START = """
import glob, os, stat, sys, tempfile
from rekd.search.ray_session import start_ray, stop_ray
start_ray()
import ray
print("gcs", ray.get_runtime_context().gcs_address, flush=True)
for folder in glob.glob(os.path.join(tempfile.gettempdir(), "rekd-ray-*")):
    print("private", folder, oct(stat.S_IMODE(os.stat(folder).st_mode)), flush=True)
assert ray.get(ray.remote(lambda: 41).remote()) + 1 == 42
"""


@pytest.fixture
def short_tmp():
    """A temp root of the test's own, short: Ray's unix socket paths (<temp>/session_<time>_<pid>/sockets/
    plasma_store) must stay under 108 bytes, which pytest's tmp_path would exceed."""
    path = Path(tempfile.mkdtemp(prefix="rk", dir="/tmp"))
    yield path
    kill_processes_mentioning(str(path))
    shutil.rmtree(path, ignore_errors=True)


def isolated_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return {**env, "RAY_TMPDIR": str(tmp), "TMPDIR": str(tmp), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **extra}


def run_bounded(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run cmd; past the timeout, kill it and all it started (a hung ray.init ignores SIGTERM) and fail."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in descendants(proc.pid) | {proc.pid}:
            kill(pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:4])} did not finish within {timeout} s; stderr:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def processes_mentioning(marker: str) -> list[str]:
    """Command lines of live processes (zombies excluded) whose command line names marker."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            line = cmdline(int(entry.name))
            if marker in line:
                found.append(f"{entry.name}: {line[:200]}")
    return found


def wait_until_no_process_mentions(marker: str, timeout: float = 20) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := processes_mentioning(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def kill_processes_mentioning(marker: str) -> None:
    for line in processes_mentioning(marker):
        kill(int(line.split(":", 1)[0]), signal.SIGKILL)


def reported(stdout: str, key: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in stdout.splitlines() if line.startswith(key + " ")]


def private_folders(tmp: Path) -> list[Path]:
    return sorted(tmp.glob("rekd-ray-*"))


# --- RAY_ADDRESS: checked in bounded time, one line when nothing answers (no Ray is started here) ---

def closed_port_address() -> str:
    return f"127.0.0.1:{free_port()}"


@pytest.mark.parametrize("template", ["{}", "ray://{}", "http://{}"])
def test_an_address_where_nothing_answers_is_one_line_naming_ray_address(template):
    address = template.format(closed_port_address())
    with pytest.raises(UsageError) as e:
        join_cluster(address)
    message = str(e.value)
    assert f"RAY_ADDRESS={address}" in message and "unset RAY_ADDRESS" in message and "\n" not in message


@pytest.fixture
def answering_port():
    """A loopback port that accepts TCP connections and says nothing (like a dashboard or MLflow port)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def test_a_dashboard_address_that_answers_says_to_use_ray_job_submit(answering_port):
    address = f"http://127.0.0.1:{answering_port}"
    with pytest.raises(UsageError, match="ray job submit") as e:
        join_cluster(address)
    assert f"RAY_ADDRESS={address}" in str(e.value)


def test_a_port_that_answers_but_does_not_speak_grpc_is_refused_before_ray_init_retries_it_forever(answering_port):
    address = f"127.0.0.1:{answering_port}"
    with pytest.raises(UsageError, match="is not a Ray GCS or Ray Client port") as e:
        join_cluster(address)
    assert f"RAY_ADDRESS={address}" in str(e.value)


@pytest.mark.parametrize("address", ["127.0.0.1", "ray://127.0.0.1", "127.0.0.1:http", "grpc://127.0.0.1:6379"])
def test_an_address_without_host_and_port_or_with_an_unknown_scheme_lists_the_allowed_forms(address):
    with pytest.raises(UsageError, match="allowed: host:port, ray://host:port") as e:
        join_cluster(address)
    assert f"RAY_ADDRESS={address}" in str(e.value)


def test_auto_means_the_recorded_ray_start_cluster_and_fails_fast_when_that_record_is_stale(short_tmp, monkeypatch):
    # Ray's own `auto` would take any single GCS running on the machine over the record: whoever's it is.
    stale = closed_port_address()
    (short_tmp / "ray").mkdir()
    (short_tmp / "ray" / "ray_current_cluster").write_text(stale)
    monkeypatch.setenv("RAY_TMPDIR", str(short_tmp))  # where Ray looks for the record
    with pytest.raises(UsageError) as e:
        join_cluster("auto")
    assert "RAY_ADDRESS=auto" in str(e.value) and f"nothing answers at {stale}" in str(e.value)


def test_auto_without_a_recorded_cluster_is_one_line_naming_where_ray_records_it(short_tmp, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(short_tmp))
    with pytest.raises(UsageError, match="RAY_ADDRESS=auto: no `ray start` cluster is recorded") as e:
        join_cluster("auto")
    assert str(short_tmp / "ray" / "ray_current_cluster") in str(e.value)


# --- a private Ray stays private ---

@pytest.mark.slow
def test_a_stale_cluster_record_does_not_hang_start_ray_which_starts_a_private_ray(short_tmp):
    # A `ray start --block` ended by a signal leaves this record behind; `ray.init()` used to retry it forever.
    stale = closed_port_address()
    record = short_tmp / "ray" / "ray_current_cluster"
    record.parent.mkdir()
    record.write_text(stale)
    proc = run_bounded([sys.executable, "-c", START], isolated_env(short_tmp), timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert reported(proc.stdout, "gcs") and reported(proc.stdout, "gcs")[0] != stale
    assert record.read_text() == stale  # the private Ray did not take the record over either


@pytest.fixture(scope="module")
def own_cluster():
    """A live `ray start` cluster whose record lies where a plain `ray.init()` of this test's processes looks
    (RAY_TMPDIR/ray); the address and that temp root."""
    tmp = Path(tempfile.mkdtemp(prefix="rk", dir="/tmp"))
    port = free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
           f"--temp-dir={tmp / 'ray'}", "--num-cpus=1", "--include-dashboard=false",
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
           "--disable-usage-stats"]
    log = tmp / "cluster.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=isolated_env(tmp),
                                start_new_session=True)
    record = tmp / "ray" / "ray_current_cluster"
    deadline = time.monotonic() + 120
    while not record.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    try:
        assert record.is_file(), log.read_text(errors="replace")[-3000:]
        yield record.read_text().strip(), tmp
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` tears its cluster down on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        kill_processes_mentioning(str(tmp))
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_with_another_cluster_alive_on_the_machine_start_ray_gets_its_own(own_cluster):
    address, tmp = own_cluster
    assert address.startswith("127.0.0.1:")  # recorded: a plain ray.init() here would join it
    proc = run_bounded([sys.executable, "-c", START], isolated_env(tmp), timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert reported(proc.stdout, "gcs") and reported(proc.stdout, "gcs")[0] != address
    assert reported(proc.stdout, "private")  # and it made its own folder (the next test checks it closely)


@pytest.mark.slow
def test_ray_address_auto_joins_the_recorded_cluster(own_cluster):
    address, tmp = own_cluster
    # An address given explicitly (auto resolves to one) does not turn token authentication on by itself.
    proc = run_bounded([sys.executable, "-c", START], isolated_env(tmp, RAY_ADDRESS="auto", RAY_AUTH_MODE="token"),
                       timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert reported(proc.stdout, "gcs") == [address]
    assert not reported(proc.stdout, "private")


@pytest.mark.slow
def test_a_private_ray_lives_in_a_0700_folder_that_is_gone_after_a_normal_exit(short_tmp):
    proc = run_bounded([sys.executable, "-c", START], isolated_env(short_tmp), timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    private = reported(proc.stdout, "private")
    assert len(private) == 1 and private[0].endswith(" 0o700"), proc.stdout
    assert private_folders(short_tmp) == []
    assert not (short_tmp / "ray").exists()  # nothing in Ray's machine-wide temp root, no cluster record
    assert wait_until_no_process_mentions(str(short_tmp)) == []


STOP_THEN_AGAIN = START + """
first = glob.glob(os.path.join(tempfile.gettempdir(), "rekd-ray-*"))
stop_ray()
print("after_stop", len(glob.glob(os.path.join(tempfile.gettempdir(), "rekd-ray-*"))), ray.is_initialized(),
      flush=True)
start_ray()
print("again", *[f for f in glob.glob(os.path.join(tempfile.gettempdir(), "rekd-ray-*")) if f not in first],
      flush=True)
import time
time.sleep(600)
"""


@pytest.mark.slow
def test_stop_ray_removes_the_folder_at_once_and_sigterm_removes_the_next_ones(short_tmp):
    proc = subprocess.Popen([sys.executable, "-c", STOP_THEN_AGAIN], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=isolated_env(short_tmp), cwd=ROOT, start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while not any(line.startswith("again") for line in lines) and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        again = reported("".join(lines), "again")
        if not again:
            proc.kill()
            pytest.fail("".join(lines) + proc.communicate()[1][-3000:])
        assert "after_stop 0 False\n" in lines, "".join(lines)  # gone at once, and Ray is down
        assert Path(again[0]).is_dir() and private_folders(short_tmp) == [Path(again[0])]
        proc.send_signal(signal.SIGTERM)  # Ray's SIGTERM handler exits through atexit: stop_ray runs
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            for pid in descendants(proc.pid) | {proc.pid}:
                kill(pid, signal.SIGKILL)
        proc.wait()
    assert private_folders(short_tmp) == []
    assert wait_until_no_process_mentions(str(short_tmp)) == []


# --- a search pointed at a cluster that is not there ---

@pytest.fixture(scope="module")
def unreachable_search(tmp_path_factory):
    tmp = Path(tempfile.mkdtemp(prefix="rk", dir="/tmp"))
    storage = tmp_path_factory.mktemp("unreachable") / "results"
    address = closed_port_address()
    proc = run_bounded([sys.executable, "-m", "rekd.search", "sparse_kd", "--smoke-test", "--storage-path",
                        str(storage)], isolated_env(tmp, RAY_ADDRESS=address), timeout=60)
    yield proc, address, storage, tmp
    kill_processes_mentioning(str(tmp))
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_a_search_pointed_at_a_closed_port_stops_within_a_minute_with_one_line(unreachable_search):
    proc, address, _, tmp = unreachable_search
    assert_usage_error(proc.returncode, proc.stdout, proc.stderr, f"RAY_ADDRESS={address}")
    assert private_folders(tmp) == []  # and it did not fall back to a private Ray


@pytest.mark.slow
def test_a_search_that_cannot_reach_its_cluster_writes_nothing(unreachable_search):
    _, _, storage, _ = unreachable_search
    assert not storage.exists() or list(storage.iterdir()) == []


@pytest.mark.slow
def test_a_reproduction_that_cannot_reach_its_cluster_writes_nothing(tmp_path):
    out = tmp_path / "reproduce-results"
    proc = run_bounded([sys.executable, "-m", "rekd.reproduce", "table2", "--smoke-test", "--out", str(out)],
                       isolated_env(tmp_path, RAY_ADDRESS=closed_port_address()), timeout=60)
    assert_usage_error(proc.returncode, proc.stdout, proc.stderr, "RAY_ADDRESS=")
    assert not out.exists()  # no store, no folder, no FAILED parent run
    assert private_folders(tmp_path) == []


# --- the local service (rekd.service) ---

def service_start(state_dir: Path, *extra: str) -> list[str]:
    ports = [free_port() for _ in range(5)]
    return [sys.executable, "-m", "rekd.service", "start", "--state-dir", str(state_dir), "--num-cpus", "1",
            "--ray-port", str(ports[0]), "--dashboard-port", str(ports[1]), "--client-port", str(ports[2]),
            "--mlflow-port", str(ports[3]), "--agent-port", str(ports[4]), *extra]


def assert_nothing_left(state_dir: Path, tmp: Path) -> None:
    assert not (state_dir / "service.json").exists()
    assert private_folders(tmp) == []
    assert wait_until_no_process_mentions(str(tmp)) == []  # Ray's processes name their temp folder
    assert wait_until_no_process_mentions(str(state_dir)) == []  # the MLflow server names its store


@pytest.mark.slow
def test_a_service_that_does_not_answer_in_time_leaves_no_folder_state_or_process(short_tmp, tmp_path):
    state_dir = tmp_path / "service"
    proc = run_bounded(service_start(state_dir, "--timeout", "1"), isolated_env(short_tmp), timeout=120)
    assert_usage_error(proc.returncode, proc.stdout, proc.stderr, "did not answer within 1 s")
    assert_nothing_left(state_dir, short_tmp)


@pytest.mark.slow
def test_ctrl_c_while_the_service_starts_leaves_nothing_and_its_ray_folder_was_private(short_tmp, tmp_path):
    state_dir = tmp_path / "service"
    # As from a terminal: Ctrl-C at its default. A suite started in the background (`make test &`, nohup)
    # ignores SIGINT, and children inherit that; Python then never turns SIGINT into KeyboardInterrupt.
    proc = subprocess.Popen(service_start(state_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=isolated_env(short_tmp), cwd=ROOT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        state_file = state_dir / "service.json"

        def ray_folder_made() -> bool:
            # The signal must land while the service still waits for Ray and MLflow: once both servers are
            # launched (service.json) and Ray has made its folder, well before either answers.
            try:
                return Path(json.loads(state_file.read_text())["ray_temp_dir"]).is_dir()
            except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or half written
                return False

        while proc.poll() is None and time.monotonic() < deadline and not ray_folder_made():
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1]
        state = json.loads(state_file.read_text())
        parent = Path(state["ray_temp_parent"])
        assert parent.parent == short_tmp and stat.S_IMODE(parent.stat().st_mode) == 0o700
        assert Path(state["ray_temp_dir"]).parent == parent and Path(state["ray_temp_dir"]).is_dir()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.returncode == 0:  # it started before the signal: stop what it started, then fail
            subprocess.run([sys.executable, "-m", "rekd.service", "stop", "--state-dir", str(state_dir)],
                           env=isolated_env(short_tmp), cwd=ROOT, capture_output=True, timeout=120)
    assert proc.returncode == 130, err
    assert_nothing_left(state_dir, short_tmp)
