"""The MLflow server of cluster/mlflow/, started from the repository exactly as its Deployment starts it (the
command, arguments and environment of the manifest), with only what cannot run here swapped: SQLite for
PostgreSQL, a temp folder for S3 and for the in-memory volume, 127.0.0.1 and a free port, one worker.
Then the user-creating Job runs against it as the manifest runs it."""
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = [d for p in sorted((ROOT / "cluster").rglob("*.yaml")) if p.name != "ray-cluster.yaml"
        for d in yaml.safe_load_all(p.read_text()) if d is not None]


def one(kind: str, name: str) -> dict:
    [doc] = [d for d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def image_to_repository(path: str) -> str:
    """A file's path in the image -> its path here, by the Dockerfile's COPY line."""
    copies = re.findall(r"^COPY (\S+) (\S+)$", (ROOT / "docker" / "Dockerfile").read_text(), re.M)
    [source] = [src for src, dst in copies if dst == path]
    return str(ROOT / source)


class FakeSecrets(dict):
    """One made-up value per Secret key, the same wherever a manifest refers to it."""
    def __missing__(self, ref):
        self[ref] = "rekd" if ref[1] == "username" else secrets.token_hex(16)
        return self[ref]


def container_env(container: dict, fake: FakeSecrets, swap) -> dict:
    """The container's environment as Kubernetes makes it: Secret values, $(VAR) of earlier entries expanded."""
    env = {}
    for entry in container.get("env", []):
        if "valueFrom" in entry:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = fake[(ref["name"], ref["key"])]
        else:
            env[entry["name"]] = swap(expand(entry["value"], env))
    return env


def expand(text: str, env: dict) -> str:
    return re.sub(r"\$\(([A-Za-z_]\w*)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, whatever proxy is set


def request(url: str, user: tuple = None, data: bytes = None) -> int:
    """The HTTP status, or 0 while nothing listens."""
    headers = {"Content-Type": "application/json"}
    if user:
        headers["Authorization"] = "Basic " + b64encode(f"{user[0]}:{user[1]}".encode()).decode()
    try:
        with DIRECT.open(urllib.request.Request(url, data=data, headers=headers), timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except urllib.error.URLError:
        return 0


def test_mlflow_server_starts_as_its_deployment_starts_it_and_the_job_creates_the_client_user(tmp_path):
    pod = one("Deployment", "mlflow")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    port, fake = free_port(), FakeSecrets()
    database = f"sqlite:///{tmp_path}/mlflow.db"

    def swap(text: str) -> str:
        return re.sub(r"postgresql://\S+", database, text)

    env = container_env(container, fake, swap)
    # the auth config (it holds the database password) must sit on the in-memory volume
    volumes = {v["name"]: v for v in pod["volumes"]}
    [(mount_path, volume)] = [(m["mountPath"], volumes[m["name"]]) for m in container["volumeMounts"]
                              if env["MLFLOW_AUTH_CONFIG_PATH"].startswith(m["mountPath"] + "/")]
    assert volume["emptyDir"]["medium"] == "Memory"
    auth_config = tmp_path / "auth-config" / env["MLFLOW_AUTH_CONFIG_PATH"][len(mount_path) + 1:]
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_config)
    args = []
    for arg in container["args"]:
        arg = swap(expand(arg, env))
        flag, _, value = arg.partition("=")
        arg = {"--host": "--host=127.0.0.1", "--port": f"--port={port}", "--workers": "--workers=1",
               "--artifacts-destination": f"--artifacts-destination={tmp_path / 'artifacts'}",
               "--allowed-hosts": f"--allowed-hosts={value},127.0.0.1:{port}"}.get(flag, arg)
        args.append(arg)
    assert container["command"][0] == "python"
    command = [sys.executable, image_to_repository(container["command"][1]), *container["command"][2:], *args]
    (tmp_path / "tmp").mkdir()
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "TMPDIR": str(tmp_path / "tmp")}
    log = open(tmp_path / "mlflow.log", "w")
    server = subprocess.Popen(command, env={**base, **env}, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)  # its own process group: stopped whole, by its id
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while request(f"{url}/health") != 200:
            assert server.poll() is None, (tmp_path / "mlflow.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "mlflow.log").read_text()[-3000:]
            time.sleep(0.5)
        assert oct(auth_config.stat().st_mode & 0o777) == "0o600"
        assert f"database_uri = {database}" in auth_config.read_text()  # users in the tracking database
        assert not (tmp_path / "basic_auth.db").exists()
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert request(search) == 401  # basic auth is on
        admin = (env["MLFLOW_AUTH_ADMIN_USERNAME"], env["MLFLOW_AUTH_ADMIN_PASSWORD"])
        assert request(search, admin) == 200

        # the Job, with the same Secrets, against the Service it names (mlflow:5000 -> this server)
        [job] = one("Job", "mlflow-create-user")["spec"]["template"]["spec"]["containers"]
        service = one("Service", "mlflow")["spec"]["ports"][0]
        job_env = container_env(job, fake, lambda text: text.replace(f"http://mlflow:{service['port']}", url))
        job_command = [sys.executable, image_to_repository(job["command"][1]), *job["command"][2:]]
        client = (job_env["REKD_MLFLOW_USERNAME"], job_env["REKD_MLFLOW_PASSWORD"])
        for said in (f"created MLflow user {client[0]}", f"MLflow user {client[0]} exists already"):
            done = subprocess.run(job_command, env={**base, **job_env}, cwd=tmp_path, capture_output=True,
                                  text=True, timeout=300)
            assert done.returncode == 0 and said in done.stdout, done.stdout + done.stderr[-3000:]
        # the client user is the one the Ray head logs as, and it can create its experiments
        head = one("RayCluster", "rekd")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        head_env = {e["name"]: e for e in head["env"]}
        for variable, key in (("MLFLOW_TRACKING_USERNAME", "username"), ("MLFLOW_TRACKING_PASSWORD", "password")):
            assert head_env[variable]["valueFrom"]["secretKeyRef"] == {"name": "rekd-mlflow-client", "key": key}
        create = f"{url}/api/2.0/mlflow/experiments/create"
        assert request(create, client, b'{"name": "rekd-sparse_kd"}') == 200
        assert request(create, (client[0], "wrong-password-12"), b'{"name": "other"}') == 401
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
