"""deploy/k8s/multi-gpu/: the one-pod 8-GPU manifest validates against the Kubernetes schemas (and a broken copy
does not), its objects fit together and not with the one-GPU Deployment's pods, and its environment is a
configuration `staticmoe serve` accepts: eight ranks, NVLink multicast off, shared memory for NCCL."""

from __future__ import annotations

import pytest
import yaml

from service.cli import build_parser, parallel_config
from tests.deploy_fixtures import DOCKERFILE, K8S_DIR, SCHEMAS, dockerfile_stages, load_yaml_documents

MANIFEST = K8S_DIR / "multi-gpu" / "deployment.yaml"


def objects() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in load_yaml_documents(MANIFEST)}


def container() -> dict:
    return objects()["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def quantity_gib(text: str) -> float:
    units = {"Gi": 1.0, "Mi": 1 / 1024, "Ti": 1024.0}
    return float(text[:-2]) * units[text[-2:]]


@pytest.mark.parametrize("version", ["1.28.0", "latest"])
def test_manifest_validates_against_kubernetes_schemas(version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="run .ci/system-deps.sh")
    version = kubernetes_validate.latest_version() if version == "latest" else version
    core = [o for o in objects().values() if o["apiVersion"] != "monitoring.coreos.com/v1"]
    assert {o["kind"] for o in core} == {"Deployment", "Service"}
    for obj in core:
        kubernetes_validate.validate(obj, version, strict=True)
    broken = yaml.safe_load(yaml.safe_dump(objects()["Deployment"]))
    broken["spec"]["template"]["spec"]["volumes"][-1]["emptyDir"]["medium"] = {"kind": "Memory"}  # not a string
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_servicemonitor_validates():
    jsonschema = pytest.importorskip("jsonschema", reason="run .ci/system-deps.sh")
    schema = yaml.safe_load((SCHEMAS / "servicemonitor.schema.json").read_text())
    jsonschema.validate(objects()["ServiceMonitor"], schema)


def test_one_pod_holds_eight_gpus_and_runs_eight_ranks(monkeypatch):
    deployment = objects()["Deployment"]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    resources = container()["resources"]
    gpus = resources["limits"]["nvidia.com/gpu"]
    assert gpus == resources["requests"]["nvidia.com/gpu"] == 8
    env = {e["name"]: e.get("value") for e in container()["env"]}
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    for name, value in env.items():  # the server reads exactly these; parse them as it does
        if name.startswith("STATICMOE_") and value is not None:
            monkeypatch.setenv(name, value)
    args = build_parser().parse_args(["serve"])
    parallel = parallel_config(args)
    assert parallel.world_size == gpus and parallel.tensor_parallel % parallel.expert_parallel == 0
    assert args.model == "/models"


def test_pod_has_shared_memory_probes_and_the_image_user():
    pod = objects()["Deployment"]["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in container()["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory" and quantity_gib(shm["sizeLimit"]) >= 8
    assert volumes[mounts["/models"]]["persistentVolumeClaim"]["readOnly"] is True
    for probe, path in (("startupProbe", "/health"), ("readinessProbe", "/ready"), ("livenessProbe", "/health")):
        assert container()[probe]["httpGet"]["path"] == path, probe
    startup = container()["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800, "allow 30 min to load a large model"
    security = pod["securityContext"]
    image_user = [args for instruction, args in dockerfile_stages(DOCKERFILE.read_text())[-1] if instruction == "USER"]
    assert f"{security['runAsUser']}:{security['runAsGroup']}" == image_user[-1]


def test_service_selects_only_the_eight_gpu_pod():
    objs = objects()
    pod_labels = objs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    selector = objs["Service"]["spec"]["selector"]
    assert selector.items() <= pod_labels.items()
    assert objs["ServiceMonitor"]["spec"]["selector"]["matchLabels"].items() <= objs["Service"]["metadata"][
        "labels"].items()
    one_gpu = next(d for d in load_yaml_documents(K8S_DIR / "deployment.yaml") if d["kind"] == "Deployment")
    one_gpu_labels = one_gpu["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= one_gpu_labels.items(), "the 8-GPU Service must not route to one-GPU pods"
    assert not one_gpu["spec"]["selector"]["matchLabels"].items() <= pod_labels.items(), \
        "the one-GPU Deployment must not adopt the 8-GPU pod"
