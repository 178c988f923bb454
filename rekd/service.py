"""`python -m rekd.service start|stop|status|env`: the local service, a Ray head and an MLflow tracking
server, both bound to 127.0.0.1, Ray with token authentication on.

State (PIDs, ports, the token's path, logs) lives in --state-dir (default ~/.rekd/service). `stop` ends
exactly the two processes `start` launched, by PID: `ray start --block` tears its cluster down on
SIGTERM, and the MLflow server takes its workers with it.

    python -m rekd.service start
    eval "$(python -m rekd.service env)"      # RAY_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH, MLFLOW_TRACKING_URI
    ray job submit -- python -m rekd.search sparse_kd
    python -m rekd.service stop
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

from rekd.cli import Parser, run
from rekd.errors import UsageError
from rekd.tracking.links import HOST
from rekd.search.ray_session import FIXED_CLUSTER_ENV, private_temp_folder

PROG = "python -m rekd.service"
STATE_FILE = "service.json"


def count(text: str) -> int:
    """An integer >= 0, for argparse: a bad one becomes argparse's one-line error."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: an integer >= 0")
    return value


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Start, stop or inspect the local Ray head and MLflow server (127.0.0.1 only).")
    p.add_argument("action", choices=("start", "stop", "status", "env"))
    p.add_argument("--state-dir", default=str(Path.home() / ".rekd" / "service"),
                   help="where PIDs, logs, the Ray token and the MLflow store live (default ~/.rekd/service)")
    p.add_argument("--ray-port", type=int, default=6379, help="Ray GCS port (default 6379)")
    p.add_argument("--dashboard-port", type=int, default=8265, help="Ray dashboard and job API port (default 8265)")
    p.add_argument("--client-port", type=int, default=23001, help="Ray client server port (default 23001)")
    p.add_argument("--agent-port", type=int, default=52365, help="Ray dashboard agent HTTP port (default 52365)")
    p.add_argument("--mlflow-port", type=int, default=5000, help="MLflow tracking server port (default 5000)")
    p.add_argument("--num-cpus", type=int, help="CPUs Ray may use (default: all)")
    p.add_argument("--num-gpus", type=count, help="GPUs Ray may schedule (default: the ones it detects)")
    p.add_argument("--timeout", type=float, default=90, help="seconds to wait for each service to answer")
    return p


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def wait_for(check, what: str, log: Path, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise UsageError(f"{what} exited with status {process.returncode} while starting; see {log}")
        if check():
            return
        time.sleep(0.5)
    raise UsageError(f"{what} did not answer within {timeout:.0f} s; see {log}")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def accepts_jobs(bin_dir: Path, env: dict) -> bool:
    probe = subprocess.run([str(bin_dir / "ray"), "job", "submit", "--submission-id",
                            f"rekd-service-ready-{int(time.time() * 1000)}", "--", "true"],
                           capture_output=True, text=True, env=env, timeout=120)
    return probe.returncode == 0


def alive(pid: Optional[int]) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_state(state_dir: Path) -> Optional[dict]:
    path = state_dir / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def client_env(state: dict) -> dict[str, str]:
    """What clients (ray job submit, rekd.search, rekd.best) need to reach and authenticate to the service."""
    return {
        "RAY_ADDRESS": f"http://{HOST}:{state['dashboard_port']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": state["token_path"],
        "MLFLOW_TRACKING_URI": f"http://{HOST}:{state['mlflow_port']}",
    }


def start(args, state_dir: Path) -> int:
    state = read_state(state_dir)
    if state and (alive(state.get("ray_pid")) or alive(state.get("mlflow_pid"))):
        raise UsageError(f"the service in {state_dir} is already running (stop it first)")
    for flag, port in (("--ray-port", args.ray_port), ("--dashboard-port", args.dashboard_port),
                       ("--client-port", args.client_port), ("--agent-port", args.agent_port),
                       ("--mlflow-port", args.mlflow_port)):
        if not port_free(port):
            raise UsageError(f"{flag} {port} is in use on {HOST}; choose another port")
    state_dir.mkdir(parents=True, exist_ok=True)
    token_path = state_dir / "ray_auth_token"
    if not token_path.is_file():
        token_path.touch(mode=0o600)
        token_path.write_text(secrets.token_hex(32))
    # Ray's folder goes in a private folder under the temp root, not under state_dir: its socket paths
    # must stay short.
    ray_temp_parent, ray_temp_dir = private_temp_folder()
    state = {"ray_temp_parent": ray_temp_parent, "ray_temp_dir": ray_temp_dir, "token_path": str(token_path.resolve())}
    try:
        wait_until_ready(args, state, launch(args, state_dir, state))
    except BaseException:  # a service that fails to start, or Ctrl-C, leaves no process, folder or state
        remove_service(state, state_dir)
        raise
    print(f"ray head: {HOST}:{args.ray_port}, dashboard and jobs http://{HOST}:{args.dashboard_port} (token auth)")
    print(f"mlflow:   http://{HOST}:{args.mlflow_port}")
    print(f'clients:  eval "$({PROG} env --state-dir {state_dir})"')
    return 0


def server_env(args, state: dict) -> dict[str, str]:
    bin_dir = Path(sys.executable).parent
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": state["token_path"],
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # bind every Ray process to 127.0.0.1 (ray 2.60)
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            # Jobs submitted to this Ray inherit its environment: they track to this server by default.
            "MLFLOW_TRACKING_URI": f"http://{HOST}:{args.mlflow_port}",
            # One machine, nothing autoscales: a search here runs on CPUs when the machine has no GPU,
            # instead of waiting for GPU nodes that never come (rekd.search.driver.trial_resources).
            FIXED_CLUSTER_ENV: "1"}


def launch(args, state_dir: Path, state: dict) -> dict[str, subprocess.Popen]:
    """Start the Ray head and the MLflow server; their PIDs (recorded as each starts, for a cleanup that may
    come at any moment), ports and logs go into `state` and service.json."""
    bin_dir = Path(sys.executable).parent
    ray_cmd = [str(bin_dir / "ray"), "start", "--head", "--block", f"--node-ip-address={HOST}",
               f"--port={args.ray_port}", f"--dashboard-host={HOST}", f"--dashboard-port={args.dashboard_port}",
               f"--ray-client-server-port={args.client_port}", f"--dashboard-agent-listen-port={args.agent_port}",
               f"--temp-dir={state['ray_temp_dir']}", "--disable-usage-stats"]
    if args.num_cpus:
        ray_cmd.append(f"--num-cpus={args.num_cpus}")
    if args.num_gpus is not None:
        ray_cmd.append(f"--num-gpus={args.num_gpus}")
    mlflow_cmd = [str(bin_dir / "mlflow"), "server", "--host", HOST, "--port", str(args.mlflow_port),
                  "--workers", "1",
                  "--backend-store-uri", f"sqlite:///{state_dir.resolve() / 'mlflow.db'}",
                  "--artifacts-destination", str(state_dir.resolve() / "mlartifacts"),
                  # Host headers other than these are refused: no DNS rebinding from a browser.
                  "--allowed-hosts", f"{HOST}:{args.mlflow_port},localhost:{args.mlflow_port},{HOST},localhost"]
    env = server_env(args, state)
    state.update({"ray_port": args.ray_port, "dashboard_port": args.dashboard_port, "client_port": args.client_port,
                  "mlflow_port": args.mlflow_port, "ray_log": str(state_dir / "ray.log"),
                  "mlflow_log": str(state_dir / "mlflow.log")})
    processes = {}
    for name, cmd in (("ray", ray_cmd), ("mlflow", mlflow_cmd)):
        with open(state[f"{name}_log"], "ab") as log:
            processes[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                               start_new_session=True)
        state[f"{name}_pid"] = processes[name].pid
    (state_dir / STATE_FILE).write_text(json.dumps(state, indent=2))
    return processes


def wait_until_ready(args, state: dict, processes: dict[str, subprocess.Popen]) -> None:
    ray_log, mlflow_log = Path(state["ray_log"]), Path(state["mlflow_log"])
    env = {**server_env(args, state), **client_env(state)}
    bin_dir = Path(sys.executable).parent
    wait_for(lambda: "Ray runtime started" in ray_log.read_text(errors="replace"), "ray", ray_log,
             args.timeout, processes["ray"])
    # Jobs are refused ("No available agent") until the head's dashboard agent has registered: the
    # service is ready when a no-op job goes through.
    wait_for(lambda: accepts_jobs(bin_dir, env), "ray job API", ray_log, args.timeout, processes["ray"])
    wait_for(lambda: http_ok(f"http://{HOST}:{args.mlflow_port}/health"), "mlflow server", mlflow_log,
             args.timeout, processes["mlflow"])


def remove_service(state: dict, state_dir: Path) -> list[str]:
    """End the service's processes, then remove Ray's private folder and service.json; what was stopped."""
    stopped = stop_processes(state)
    # States written before Ray's folder had a private parent name only Ray's folder.
    shutil.rmtree(state.get("ray_temp_parent") or state.get("ray_temp_dir") or "", ignore_errors=True)
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    return stopped


def stop_processes(state: dict, timeout: float = 40) -> list[str]:
    """SIGTERM to the PIDs this service started (only while they are still the commands it started)."""
    stopped = []
    for key, marker in (("mlflow_pid", "mlflow"), ("ray_pid", "ray")):
        pid = state.get(key)
        if not alive(pid) or marker not in command_line(pid):
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while alive(pid) and time.monotonic() < deadline:
            reap(pid)
            time.sleep(0.2)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
        stopped.append(marker)
    return stopped


def reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(_main, PROG, argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    state_dir = Path(args.state_dir).expanduser()
    if args.action == "start":
        return start(args, state_dir)
    state = read_state(state_dir)
    if state is None:
        raise UsageError(f"no service state in {state_dir}; start one with `{PROG} start`")
    if args.action == "env":
        for key, value in client_env(state).items():
            print(f"export {key}={value}")
    elif args.action == "status":
        for name, key in (("ray", "ray_pid"), ("mlflow", "mlflow_pid")):
            print(f"{name}: {'running' if alive(state.get(key)) else 'stopped'} (pid {state.get(key)})")
    else:
        stopped = remove_service(state, state_dir)
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
