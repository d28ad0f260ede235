"""infra/: the KubeRay manifests, the cluster-launcher YAML, the GPU image and the MLflow deployment,
checked as far as a machine without Kubernetes, cloud or Docker engine allows: they parse, name the
right kinds and images, run an entrypoint and config that exist, request resources the configs'
stages fit in, and pin the versions of requirements/cpu.lock."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from sppo.config import load_config
from sppo.plan import check_fit, resource_plan

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
LOCK = dict(line.split("==", 1) for line in (REPO / "requirements/cpu.lock").read_text().splitlines()
            if "==" in line and not line.startswith("#"))
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
IMAGE = f"registry.example.com/sppo/sppo-gpu:{PYPROJECT['project']['version']}"
PRODUCTION = sorted((REPO / "configs").glob("*-sppo.yaml"))


def load(path: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((INFRA / path).read_text()) if doc is not None]


def cluster_specs() -> dict[str, dict]:
    """The RayCluster spec of each KubeRay manifest (a RayJob carries its own)."""
    (cluster,), (job,) = load("kuberay/raycluster.yaml"), load("kuberay/rayjob.yaml")
    return {"raycluster.yaml": cluster["spec"], "rayjob.yaml": job["spec"]["rayClusterSpec"]}


def ray_containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def quantity(value) -> float:
    """A Kubernetes CPU/GPU quantity: 8, "8" or "500m"."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def kuberay_nodes(spec: dict, replicas_key: str = "replicas") -> list[dict[str, float]]:
    """The Ray nodes a RayCluster spec makes, with the resources Ray reads from them."""
    head = spec["headGroupSpec"]
    nodes = [{"CPU": quantity(head["rayStartParams"]["num-cpus"]), "GPU": 0.0}]
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        node = {"CPU": quantity(limits["cpu"]), "GPU": quantity(limits.get("nvidia.com/gpu", 0))}
        nodes += [dict(node) for _ in range(group[replicas_key])]
    return nodes


def lock_pins(text: str) -> dict[str, str]:
    """name==version pins written in a Dockerfile."""
    return dict(re.findall(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-]+)", text))


def test_every_yaml_file_parses_with_the_expected_kinds():
    files = sorted(INFRA.rglob("*.yaml"))
    assert len(files) >= 6
    for path in files:
        assert list(yaml.safe_load_all(path.read_text())), f"{path} is empty"
    kinds = {path: [(d["apiVersion"], d["kind"]) for d in load(path)] for path in
             ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/shared-storage.yaml",
              "kuberay/secrets.example.yaml")}
    assert kinds == {
        "kuberay/raycluster.yaml": [("ray.io/v1", "RayCluster")],
        "kuberay/rayjob.yaml": [("ray.io/v1", "RayJob")],
        "kuberay/shared-storage.yaml": [("v1", "PersistentVolumeClaim")],
        "kuberay/secrets.example.yaml": [("v1", "Secret")],
    }


def test_one_image_everywhere_at_the_project_version_and_the_lock_ray_version():
    images = {c["image"] for spec in cluster_specs().values() for c in ray_containers(spec)}
    images.add(load("cluster-launcher/aws.yaml")[0]["docker"]["image"])
    assert images == {IMAGE}
    dockerfile = (INFRA / "docker/Dockerfile").read_text()
    assert f"-t {IMAGE} " in dockerfile  # the documented build produces exactly that image
    for spec in cluster_specs().values():
        assert spec["rayVersion"] == LOCK["ray"] and spec["authOptions"]["mode"] == "token"
    assert re.search(r"^FROM rayproject/ray:(\S+)-py311-gpu$", dockerfile, re.M).group(1) == LOCK["ray"]


def test_the_rayjob_entrypoint_runs_a_module_and_config_that_exist():
    (job,) = load("kuberay/rayjob.yaml")
    args = shlex.split(job["spec"]["entrypoint"])
    assert args[:3] == ["python", "-m", "sppo.run"]
    assert (REPO / (args[2].replace(".", "/") + ".py")).is_file()
    config = args[args.index("--config") + 1]
    assert config == "configs/gemma-2-9b-it-sppo.yaml" and args[args.index("--iters") + 1] == "3"
    cfg = load_config(REPO / config, {"iterations": 3})  # validates
    assert cfg.output_dir.startswith("/shared/")  # on the shared volume, not the pod's disk
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    image_workdir = re.search(r"^WORKDIR (\S+)$", (INFRA / "docker/Dockerfile").read_text(), re.M).group(1)
    assert runtime_env["working_dir"] == image_workdir  # where the image holds the repository


@pytest.mark.parametrize("config", PRODUCTION, ids=lambda p: p.name)
def test_kuberay_and_launcher_nodes_hold_every_stage_of_the_production_configs(config):
    plan = resource_plan(load_config(config))
    for name, spec in cluster_specs().items():
        assert check_fit(plan, kuberay_nodes(spec)) == [], name
    launcher = load("cluster-launcher/aws.yaml")[0]
    types = launcher["available_node_types"]
    nodes = [dict(types[launcher["head_node_type"]]["resources"])]
    for name, node_type in types.items():
        if name != launcher["head_node_type"]:
            nodes += [dict(node_type["resources"]) for _ in range(node_type["min_workers"])]
    assert check_fit(plan, nodes) == []
    assert max(s.role.total_gpus for s in plan) == sum(n.get("GPU", 0) for n in nodes) == 8  # 1x8 by default


def test_the_resource_check_catches_a_worker_group_too_small():
    spec = cluster_specs()["rayjob.yaml"]
    limits = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    limits["nvidia.com/gpu"] = 4
    problems = check_fit(resource_plan(load_config(PRODUCTION[0])), kuberay_nodes(spec))
    assert [p.split(" does not fit")[0] for p in problems] == ["stage 'sampling'", "stage 'training'"]


def test_every_ray_pod_mounts_the_shared_volume_and_gets_mlflow_and_secrets_from_the_environment():
    (pvc,) = load("kuberay/shared-storage.yaml")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for name, spec in cluster_specs().items():
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            pod = group["template"]["spec"]
            claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                      if "persistentVolumeClaim" in v}
            for container in pod["containers"]:
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                assert claims[mounts["/shared"]] == pvc["metadata"]["name"], name
                env = {e["name"]: e for e in container["env"]}
                assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http"), name
                assert env["HF_HOME"]["value"].startswith("/shared/"), name
                for secret in ("HF_TOKEN", "MLFLOW_TRACKING_PASSWORD"):
                    assert "value" not in env[secret] and env[secret]["valueFrom"]["secretKeyRef"], name
    launcher = load("cluster-launcher/aws.yaml")[0]
    assert "-v /shared:/shared" in launcher["docker"]["run_options"]
    assert any("/shared" in cmd and "mount" in cmd for cmd in launcher["initialization_commands"])


def test_images_pin_the_lock_versions():
    gpu = (INFRA / "docker/Dockerfile").read_text()
    # The image installs the GPU lock whole (tests/test_install.py checks that lock), at the image's Ray.
    assert re.search(r"^RUN pip install .*--no-deps -r requirements/gpu\.lock$", gpu, re.M)
    gpu_lock = dict(line.split("==", 1) for line in (REPO / "requirements/gpu.lock").read_text().splitlines()
                    if "==" in line and not line.startswith("#"))
    vllm_gpu = dict(p.split("==") for p in PYPROJECT["project"]["optional-dependencies"]["gpu"])["vllm"]
    assert gpu_lock["vllm"] == vllm_gpu and gpu_lock["ray"] == LOCK["ray"]
    server = (INFRA / "mlflow/Dockerfile").read_text()
    pins = lock_pins(server)
    assert {"mlflow", "psycopg2-binary"} <= set(pins)
    for name, version in pins.items():
        if name in LOCK:
            assert LOCK[name] == version, f"infra/mlflow/Dockerfile pins {name}=={version}, the lock {LOCK[name]}"


def test_mlflow_compose_uses_postgres_and_minio_with_pinned_images_and_no_inline_secrets():
    (compose,) = load("mlflow/docker-compose.yaml")
    services = compose["services"]
    assert {"postgres", "minio", "mlflow"} <= set(services)
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned image {image}"
    command = " ".join(services["mlflow"]["command"])
    assert "--backend-store-uri=postgresql+psycopg2://" in command and "@postgres:5432/" in command
    assert "--artifacts-destination=s3://" in command and "--serve-artifacts" in command
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET", key):
                assert str(value).startswith("${"), f"{name}: {key} is written in the file"
    example = (INFRA / "mlflow/.env.example").read_text()
    assert {"POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"} <= set(re.findall(r"^(\w+)=", example, re.M))
    assert (INFRA / "mlflow/.gitignore").read_text().split() == [".env"]


def test_every_launcher_node_starts_with_token_auth_and_the_submitters_token():
    launcher = load("cluster-launcher/aws.yaml")[0]
    starts = [c for c in launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
              if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    assert launcher["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
