"""Cluster configs against Ray's own schema and KubeRay's structure (the local token-auth stack: see the
end of this file)."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import yaml

from tests.fixtures_infra import REPO

SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_USERNAME",
)


def _yaml(rel: str):
    return yaml.safe_load((REPO / rel).read_text())


# --------------------------------------------------------------------------------------- ray_cluster.yaml
def test_ray_cluster_yaml_validates_against_rays_schema():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _yaml("ray_cluster.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    # What `ray up` does before touching AWS: merge the provider defaults, then Ray's own checks.
    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_ray_cluster_yaml_node_types_placement_and_security():
    cfg = _yaml("ray_cluster.yaml")
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert cfg["provider"]["type"] == "aws"
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "no work besides the driver on the head"
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    cpu = [t for t in workers.values() if t["resources"].get("preprocess", 0) > 0]
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) > 0]
    assert len(cpu) == 1 and len(gpu) == 1
    assert cpu[0]["min_workers"] == 0 and cpu[0]["max_workers"] >= 1 and "GPU" not in cpu[0]["resources"]
    assert gpu[0]["max_workers"] >= 1 and "preprocess" not in gpu[0]["resources"]
    assert cpu[0]["labels"] == {"pyoco/node-kind": "cpu"} and gpu[0]["labels"] == {"pyoco/node-kind": "gpu"}
    assert sum(t.get("min_workers", 0) for t in workers.values()) <= cfg["max_workers"]

    # Token auth on every node, the dashboard on the head's loopback only, the token shipped over SSH.
    head_start = " ".join(cfg["head_start_ray_commands"])
    worker_start = " ".join(cfg["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in worker_start
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    rules = cfg["provider"].get("security_group", {}).get("IpPermissions", [])
    assert all(not (r.get("FromPort", 0) <= 8265 <= r.get("ToPort", -1)) for r in rules)

    # Setup commands install the project shipped by file_mounts on every node type.
    assert cfg["file_mounts"]["~/pyoco"] == "."
    installs = [cfg["head_setup_commands"], cfg["worker_setup_commands"], cpu[0]["worker_setup_commands"]]
    for commands in installs:
        assert any("pip install" in c and "~/pyoco" in c for c in commands), commands
    assert any("RAY_AUTH_MODE=token" in c for c in cpu[0]["worker_setup_commands"])
    assert ".pyoco-local" in cfg["rsync_exclude"] and ".venv" in cfg["rsync_exclude"]


# ------------------------------------------------------------------------------------------------ KubeRay
def _custom_resources(params: dict) -> dict:
    raw = params.get("resources")
    if raw is None:
        return {}
    return json.loads(json.loads(raw) if raw.startswith('"') else raw)


def _check_cluster_spec(spec: dict) -> None:
    assert str(spec["rayVersion"]).startswith("2.")
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "the dashboard must not be exposed"
    assert head["rayStartParams"].get("num-cpus") == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    cpu = [g for g in groups.values() if _custom_resources(g["rayStartParams"]).get("preprocess", 0) > 0]
    gpu = [g for g in groups.values() if "num-gpus" in g["rayStartParams"]]
    assert len(cpu) == 1 and len(gpu) == 1
    assert cpu[0]["minReplicas"] == 0 and cpu[0]["maxReplicas"] >= 1
    assert cpu[0]["labels"] == {"pyoco/node-kind": "cpu"} and gpu[0]["labels"] == {"pyoco/node-kind": "gpu"}
    for group in (cpu[0], gpu[0]):
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    gpu_limits = gpu[0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu_limits["nvidia.com/gpu"]) == int(gpu[0]["rayStartParams"]["num-gpus"]) >= 1
    assert "nvidia.com/gpu" not in cpu[0]["template"]["spec"]["containers"][0]["resources"]["limits"]

    pods = [head["template"]] + [g["template"] for g in groups.values()]
    images = {c["image"] for p in pods for c in p["spec"]["containers"]}
    assert len(images) == 1, images
    for pod in pods:
        for container in pod["spec"]["containers"]:
            assert container["resources"]["limits"]["cpu"] == container["resources"]["requests"]["cpu"]
            for var in container.get("env", []):
                if var["name"] in SECRET_ENV:
                    assert "value" not in var and "secretKeyRef" in var["valueFrom"], var["name"]


def test_kuberay_raycluster_structure():
    doc = _yaml("infra/kuberay/raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert doc["metadata"]["name"]
    _check_cluster_spec(doc["spec"])


def test_kuberay_rayjob_structure_and_entrypoint_names_a_real_config():
    from pyoco.config import load_config

    doc = _yaml("infra/kuberay/rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["pyoco", "run"] and "--config" in argv
    config = REPO / argv[argv.index("--config") + 1]
    assert config.is_file(), f"{config} named by the RayJob entrypoint does not exist"
    cfg = load_config(config)
    assert cfg.train.use_gpu and cfg.preprocess is not None and cfg.preprocess.resource == "preprocess"
    for uri in (cfg.output, cfg.preprocess.input, cfg.preprocess.output, cfg.train.storage_path):
        assert uri.startswith("s3://"), f"{uri}: a multi-node cluster needs shared storage"
    assert spec["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"]
    _check_cluster_spec(spec["rayClusterSpec"])


def test_mlflow_compose_has_auth_and_publishes_on_loopback_only():
    doc = _yaml("infra/mlflow/docker-compose.yaml")
    services = doc["services"]
    assert {"postgres", "minio", "mlflow"} <= set(services)
    command = services["mlflow"]["command"]
    assert command[command.index("--app-name") + 1] == "basic-auth"
    for svc in services.values():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), port
        for key, value in (svc.get("environment") or {}).items():
            if any(m in key for m in ("PASSWORD", "SECRET")):
                assert str(value).startswith("${"), f"{key} must come from .env, not the compose file"
    assert (REPO / "infra/mlflow/README.md").read_text().lower().count("not exercised") >= 1


# The local stack (infra/local/services.py: start, status, auth, 127.0.0.1 only, stop) is checked on the
# stack that the real workflow of test_workflow_cluster.py starts (`make cluster-demo`), one start fewer.
