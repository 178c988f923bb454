"""Which Ray a rekd command runs on: the cluster RAY_ADDRESS names, checked first so that a dead one fails in
seconds, or else a private Ray on 127.0.0.1 that no other process can find or join.

`ray.init()` with no address joins the cluster the last `ray start` recorded in `<ray temp>/ray_current_cluster`
(ray 2.60: written by `ray start`, read by Ray's own address lookup, which is private). With
that cluster alive a search would silently run on someone else's Ray; with it dead (a `ray start --block`
killed by a signal leaves the record) `ray.init()` retried its GCS without end. So the private Ray is
started with `address="local"`, which never reads the record, and `ray.init()` never writes one.

A cluster address is checked before `ray.init`, each step bounded by PROBE_TIMEOUT_S: something accepts a
TCP connection there, and (dashboard addresses aside) it speaks gRPC, as a GCS and a Ray Client server do;
`ray.init` would retry a closed port, or an HTTP one, without end. RAY_ADDRESS may be:
- `host:port`: a GCS, joined as a driver (what `ray job submit` sets inside a job);
- `ray://host:port`: a Ray Client server;
- `auto`: the cluster the last `ray start` on this machine recorded, checked and joined like host:port.
  Ray's `canonicalize_bootstrap_address("auto")` would take the one GCS process running on the machine, when
  there is exactly one, over that record: on a shared machine, someone else's;
- `http(s)://host[:port]`: a dashboard / job API. A driver cannot join it (ray 2.60's `ray.init` raises a
  ValueError for it), but it is what `python -m rekd.service env` exports for `ray job submit`: a command
  run directly in that shell is told to go through `ray job submit`.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from typing import Optional
from urllib.parse import urlsplit

from rekd.errors import UsageError

# Ray binds its processes to this machine's routable address unless told otherwise (ray 2.60); it reads
# this when ray is first imported, so it is set before.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

ENV = "RAY_ADDRESS"
FIXED_CLUSTER_ENV = "REKD_CLUSTER_FIXED"  # "1": no autoscaler, the nodes there are all there will be
PROBE_TIMEOUT_S = 3.0  # how long a cluster address may take to accept a TCP connection, and then a gRPC one
DEFAULT_PORTS = {"http": 80, "https": 443}  # a dashboard behind a proxy may leave the port out
ALLOWED = "host:port, ray://host:port, http(s)://host[:port] or auto"
FIX = f"start that cluster, or unset {ENV} to run on a private Ray"

MAX_TEMP_ROOT = 18  # characters of the temp root that Ray's socket paths leave room for
RAY_TEMP_NAME = "ray"  # the folder Ray makes its temp folder under $RAY_TMPDIR (ray 2.60)
ADDRESS_FILE = "ray_current_cluster"  # where, in that folder, `ray start` records its cluster
_private_dir: Optional[str] = None  # the 0700 folder holding the private Ray's temp folder, while it runs
_cleanup_registered = False
TEMP_VARIABLES = ("RAY_TMPDIR", "TMPDIR")  # pointed at the private folder while the private Ray runs
_saved_env: dict[str, Optional[str]] = {}  # what start_private_ray changed in os.environ, put back by stop_ray


def start_ray(worker_output: bool = True) -> None:
    """Connect this process to its Ray: the cluster RAY_ADDRESS names, else a new private one. Idempotent.

    `worker_output=False` keeps a private Ray's workers' output off this process's console (Tune keeps a
    failed trial's traceback in its folder; Ray's workers print their own shutdown noise when the private
    Ray stops). A cluster's job keeps it: `ray job logs` is where that output is read."""
    import ray

    if ray.is_initialized():
        return
    # ray.init puts in its own SIGTERM handlers (the process ends at once: status 15, or an abort in Ray's
    # core); a command's own (rekd.cli: end its runs KILLED, status 143) stays. Without one (SIG_DFL), Ray's is
    # kept: it exits through atexit, where stop_ray removes the private Ray's folder.
    own = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    own = own if callable(own) else None
    try:
        address = os.environ.get(ENV, "").strip()
        if address:  # Ray ignores an empty RAY_ADDRESS too
            join_cluster(address)
        else:
            start_private_ray(worker_output)
    finally:
        if own is not None:
            signal.signal(signal.SIGTERM, own)


def stop_ray() -> None:
    """Shut Ray down in this process and remove the private Ray's folder, if this process started one."""
    global _private_dir
    import ray

    if ray.is_initialized() or _private_dir is not None:
        # The private Ray's processes must have exited before their folder goes: they write logs into it.
        # (Also after a failed start: ray.init may have launched some before it failed.)
        ray.shutdown(wait_for_processes=True)
    if _private_dir is not None:
        remove_folder(_private_dir)
        _private_dir = None
    for key, saved in list(_saved_env.items()):
        del _saved_env[key]
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


def fixed_cluster() -> bool:
    """Whether this process's Ray has all the nodes it will ever have: the private Ray start_ray started, or a
    cluster whose environment says so (REKD_CLUSTER_FIXED=1, set by rekd.service for its one-machine Ray)."""
    return _private_dir is not None or os.environ.get(FIXED_CLUSTER_ENV) == "1"


def gpu_request(wanted: float, cpu_only: bool, cluster_gpus: float, fixed: bool) -> tuple[float, str]:
    """The GPUs a task asks for, and a line that says why when it is not what the study wants.

    The study's GPU fraction is requested whenever it is set, even if the cluster has no GPU node at this
    moment: Ray's autoscaler starts GPU nodes for requests that wait. Only a Ray that has all the nodes it
    will ever have (`fixed`: a private one, rekd.service's) knows that none will come."""
    if cpu_only or not wanted:
        return 0, ""
    if fixed and not cluster_gpus:
        return 0, "no GPU in this Ray, and none will join: tasks run on CPUs"
    if not cluster_gpus:
        return wanted, ("the cluster has no GPU now: tasks wait for GPU nodes (Ray's autoscaler starts them for "
                        "waiting requests); --cpu-only runs them on CPUs instead")
    return wanted, ""


def check_cluster_address() -> None:
    """RAY_ADDRESS, when set, names a Ray that answers: checked in seconds, before a command writes anything."""
    address = os.environ.get(ENV, "").strip()
    if address:
        cluster_target(address)


def join_cluster(address: str) -> None:
    """Join the cluster at `address` once it answers there, in bounded time; else UsageError (one line)."""
    import ray

    target, named = cluster_target(address)
    try:
        ray.init(address=target, log_to_driver=True)
    except ConnectionError as e:  # a gRPC server, but not a Ray that lets us in
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{named}: {first}; check that it is a Ray GCS or Ray Client address and, for a "
                         "cluster with token authentication, that RAY_AUTH_MODE=token and its token are set; "
                         f"or unset {ENV} to run on a private Ray") from e


def cluster_target(address: str) -> tuple[str, str]:
    """The address to join and how to name it in a message, once something that speaks gRPC answers there."""
    target = recorded_cluster() if address == "auto" else address
    named = f"{ENV}=auto (the cluster recorded at {target})" if address == "auto" else f"{ENV}={address}"
    host, port = cluster_endpoint(target, named)
    reason = unreachable(host, port)
    if reason:
        raise UsageError(f"{named}: nothing answers at {host}:{port} ({reason}); {FIX}")
    if scheme_of(target) in DEFAULT_PORTS:
        raise UsageError(f"{named} is a Ray dashboard (job API) address, which a driver cannot join; "
                         f"submit the command with `ray job submit -- python -m ...`, or unset {ENV} "
                         "to run on a private Ray")
    # ray.init retries a port that answers but does not speak gRPC (a dashboard or MLflow port given as
    # host:port) without end (ray 2.60); a gRPC server that is not a GCS makes it fail after ~20 s.
    if not speaks_grpc(host, port):
        raise UsageError(f"{named}: {host}:{port} answers but is not a Ray GCS or Ray Client port "
                         f"(it does not speak gRPC); allowed: {ALLOWED}, or unset {ENV} to run on a private Ray")
    return target, named


def cluster_endpoint(address: str, named: str) -> tuple[str, int]:
    """The host and TCP port a cluster address should answer on (`named` says where it came from)."""
    scheme = scheme_of(address)
    if scheme not in ("", "ray", *DEFAULT_PORTS):
        raise UsageError(f"{named}: unknown scheme {scheme!r}; allowed: {ALLOWED}")
    parts = urlsplit(address if scheme else f"//{address}")
    try:
        port = parts.port or DEFAULT_PORTS.get(scheme)
    except ValueError:  # a port that is not a number, or out of range
        port = None
    if not parts.hostname or port is None:
        raise UsageError(f"{named}: no host and port in it; allowed: {ALLOWED}")
    return parts.hostname, port


def scheme_of(address: str) -> str:
    # urlsplit would read "localhost:6379" as scheme "localhost": only "://" marks a scheme here, as in Ray.
    return address.split("://", 1)[0].lower() if "://" in address else ""


def recorded_cluster() -> str:
    """What `auto` means to rekd: the address the last `ray start` on this machine recorded (not Ray's
    fallback to any GCS process running here, see the module's docstring)."""
    path = ray_address_file()
    try:
        with open(path) as f:
            recorded = f.read().strip()
    except FileNotFoundError:
        recorded = ""
    if not recorded:
        raise UsageError(f"{ENV}=auto: no `ray start` cluster is recorded on this machine "
                         f"({path}); start one, set {ENV} to its host:port, "
                         f"or unset {ENV} to run on a private Ray")
    return recorded


def ray_address_file() -> str:
    """The file the last `ray start` on this machine wrote its address to. Ray reads it only through private
    helpers (ray 2.60), so its place is found here the way they find it: `ray/ray_current_cluster` in
    $RAY_TMPDIR, else (Linux) $TMPDIR, else /tmp."""
    if "RAY_TMPDIR" in os.environ:
        root = os.environ["RAY_TMPDIR"]
    elif sys.platform.startswith("linux") and "TMPDIR" in os.environ:
        root = os.environ["TMPDIR"]
    elif sys.platform.startswith(("linux", "darwin")):
        root = "/tmp"
    else:
        root = tempfile.gettempdir()
    return os.path.join(root, RAY_TEMP_NAME, ADDRESS_FILE)


def unreachable(host: str, port: int) -> str:
    """Why nothing answers at host:port within PROBE_TIMEOUT_S, or "" when something does."""
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return ""
    except socket.timeout:
        return f"no answer within {PROBE_TIMEOUT_S:g} s"
    except OSError as e:
        return e.strerror or type(e).__name__


def speaks_grpc(host: str, port: int) -> bool:
    """Whether host:port completes a gRPC (HTTP/2) handshake within PROBE_TIMEOUT_S: GCS and Ray Client do."""
    import grpc

    channel = grpc.insecure_channel(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=PROBE_TIMEOUT_S)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()


def start_private_ray(worker_output: bool = True) -> None:
    """A new Ray on 127.0.0.1, no dashboard, its temp folder inside a 0700 folder removed when Ray stops."""
    global _private_dir, _cleanup_registered
    import ray

    if _private_dir is not None:  # the folder of an earlier private Ray ended by a bare ray.shutdown()
        remove_folder(_private_dir)
    _private_dir, _ = private_temp_folder()
    # Ray's Tune and Train keep lock files in `<RAY_TMPDIR or TMPDIR>/_ray_lockfiles` and never remove them,
    # and a trial killed mid-epoch cannot remove its temp files: in the private folder they go with it. Ray's
    # processes inherit both from here, the trials included (this process has chosen its temp folder already).
    # Ray makes its own temp folder (sockets, logs, session) in RAY_TMPDIR too: `<private folder>/ray`.
    for key in TEMP_VARIABLES:
        _saved_env.setdefault(key, os.environ.get(key))
        os.environ[key] = _private_dir
    if not _cleanup_registered:
        # Registered after ray's own atexit shutdown, so it runs before it (atexit is LIFO): stop_ray shuts
        # Ray down first, then removes the folder. Ray's SIGTERM handler exits through atexit too.
        atexit.register(stop_ray)
        _cleanup_registered = True
    try:
        # address="local": never the cluster recorded in ray_current_cluster, never RAY_ADDRESS.
        # `_node_ip_address` binds the private Ray to loopback, so no other machine or process can find or join
        # it. ray.init has no public parameter for it (ray 2.60: `ray start --node-ip-address` is the public
        # form, for a cluster started apart); this call is the one allowed in tests/test_public_apis.py.
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=worker_output)
    except BaseException:
        stop_ray()
        raise


def private_temp_folder() -> tuple[str, str]:
    """(a new 0700 folder, the temp folder for Ray inside it: where Ray puts it with RAY_TMPDIR set to the
    first). Ray makes its temp folders mode 0777 (ray 2.60): inside a 0700 folder no other user reaches its
    sockets, logs or job files. Ray's unix socket paths (<temp>/session_<time>_<pid>/sockets/plasma_store)
    must stay under 108 bytes, which leaves ~18 for the temp root: a longer $TMPDIR gives way to /tmp."""
    root = tempfile.gettempdir()
    if len(root) > MAX_TEMP_ROOT and os.access("/tmp", os.W_OK | os.X_OK):
        root = "/tmp"
    parent = tempfile.mkdtemp(prefix="rekd-ray-", dir=root)
    return parent, os.path.join(parent, RAY_TEMP_NAME)


def remove_folder(path: str, attempts: int = 10) -> None:
    """rmtree that tolerates a Ray process writing its last log line while the folder goes."""
    for _ in range(attempts):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            return
        time.sleep(0.2)
