"""A Ray cluster of two nodes on this machine, for the tests of node failure: rekd.service's head (Ray and
MLflow on 127.0.0.1) and a second Ray node joined with `ray start --address --block`, each with its own
CPUs and temp folder. The second node's processes are ended by PID, all at once, as a machine that dies
ends them.

Run as a script, this file is Ray's own `ray start` with one gate opened (see SECOND_NODE_GATE)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from processes import descendants, free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# The GCS declares a node dead after this many failed health checks, one a second (ray 2.60's defaults,
# 5 checks 3 s apart after a 10 s timeout each, take 15-50 s). Read by the GCS from its environment.
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "2000",
                   "RAY_health_check_failure_threshold": "3"}

# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which binds every Ray process to 127.0.0.1 (rekd.service sets it),
# also makes ray 2.60's `ray start --address` refuse to start a second node ("Multi-node Ray clusters are
# not supported on Windows and OSX"); with it =1 the same command rewrites --address=127.0.0.1:P to the
# machine's routable address (services.resolve_ip_for_localhost), where a head on 127.0.0.1 does not
# listen. So the second node runs the real CLI with only the CLI's gate opened: its processes keep the
# variable at 0, and bind to 127.0.0.1 like the head's.
SECOND_NODE_GATE = "ENABLE_RAY_CLUSTER"


def start_service(state_dir: Path, env: dict, num_cpus: int, *extra: str) -> dict:
    """`python -m rekd.service start` on free ports; returns its state and the clients' environment."""
    ports = [free_port() for _ in range(5)]
    start = [sys.executable, "-m", "rekd.service", "start", "--state-dir", str(state_dir), "--num-cpus", str(num_cpus),
             "--ray-port", str(ports[0]), "--dashboard-port", str(ports[1]), "--client-port", str(ports[2]),
             "--mlflow-port", str(ports[3]), "--agent-port", str(ports[4]), *extra]
    proc = subprocess.run(start, capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    lines = subprocess.run([sys.executable, "-m", "rekd.service", "env", "--state-dir", str(state_dir)],
                           capture_output=True, text=True, cwd=ROOT, check=True).stdout
    client = dict(line.removeprefix("export ").split("=", 1) for line in lines.splitlines())
    return {"state": json.loads((state_dir / "service.json").read_text()), "env": {**env, **client}}


def stop_service(state_dir: Path) -> None:
    if (state_dir / "service.json").exists():
        stop = subprocess.run([sys.executable, "-m", "rekd.service", "stop", "--state-dir", str(state_dir)],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert stop.returncode == 0, stop.stderr


def start_second_node(service: dict, temp_dir: Path, num_cpus: int, timeout: float = 120) -> subprocess.Popen:
    """`ray start --address=<the head> --block` in its own session, with its own temp folder (Ray's under
    temp_dir/r, and TMPDIR: Tune's lock files); its output in temp_dir/node.log."""
    state = service["state"]
    env = {**service["env"], "TMPDIR": str(temp_dir), "RAY_TMPDIR": str(temp_dir),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)  # the dashboard's address, for clients; the node joins the GCS
    cmd = [sys.executable, __file__, "start", "--block", f"--address=127.0.0.1:{state['ray_port']}",
           "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", "--num-gpus=0", f"--temp-dir={temp_dir / 'r'}",
           "--disable-usage-stats"]
    log = temp_dir / "node.log"
    with open(log, "ab") as out:
        node = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while "Ray runtime started" not in log.read_text(errors="replace"):
        if node.poll() is not None or time.monotonic() > deadline:
            kill_node(node)
            raise AssertionError(f"the second node did not start (exit {node.poll()}):\n"
                                 f"{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.3)
    return node


def node_ids(env: dict, count: int = 2, timeout: float = 60) -> tuple[str, list[str]]:
    """(the head's node id, the other alive nodes' ids), once `count` nodes are alive (`ray list nodes`)."""
    deadline = time.monotonic() + timeout
    while True:
        proc = subprocess.run([str(BIN / "ray"), "list", "nodes", "--format", "json"], capture_output=True,
                              text=True, env=env, cwd=ROOT, timeout=60)
        assert proc.returncode == 0, proc.stderr
        alive = [n for n in json.loads(proc.stdout) if n["state"] == "ALIVE"]
        if len(alive) >= count or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    heads = [n["node_id"] for n in alive if n["is_head_node"]]
    others = [n["node_id"] for n in alive if not n["is_head_node"]]
    assert len(heads) == 1 and len(heads) + len(others) == count, alive
    return heads[0], others


def node_state(env: dict, node_id: str) -> str:
    proc = subprocess.run([str(BIN / "ray"), "list", "nodes", "--format", "json", "--filter", f"node_id={node_id}"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)[0]["state"]


def kill_node(node: subprocess.Popen) -> set[int]:
    """SIGKILL to `ray start` and every process under it (Ray puts its workers in process groups of their
    own): the node is gone at once, with no chance to say so. Returns the PIDs killed."""
    killed = set()
    for _ in range(5):  # a process started while the others were being killed is caught by the next round
        found = descendants(node.pid) - killed
        if not found:
            break
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        killed |= found
        time.sleep(0.1)
    if node.poll() is None:
        node.kill()
        killed.add(node.pid)
    node.wait(timeout=30)
    return killed


def open_gate_and_run_ray_cli() -> int:
    import ray._private.ray_constants as constants
    import ray.scripts.scripts as scripts

    # Only the CLI module sees the gate open: everything else in this process, and every process the node
    # starts, reads the real constant (False with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: loopback).
    gate = type(constants)("ray_constants_for_the_cli")
    gate.__dict__.update(constants.__dict__)
    setattr(gate, SECOND_NODE_GATE, True)
    scripts.ray_constants = gate
    sys.argv[0] = "ray"
    return scripts.main()


if __name__ == "__main__":
    sys.exit(open_gate_and_run_ray_cli())
