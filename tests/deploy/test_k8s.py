"""docker/k8s manifests: JSON-schema validation (PyPI `kubernetes-validate`, which ships the Kubernetes schemas, so it
works offline) plus structural checks that tie the manifest to the image and the service.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from .conftest import REPO, known_zsad_var

K8S = REPO / "docker" / "k8s"
KUBE_VERSION = "1.30.0"  # oldest version the manifests target (policy/v1 PDB, seccompProfile field, ...)


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _manifests() -> list[Path]:
    files = sorted(K8S.glob("*.yaml"))
    assert files, "no manifests in docker/k8s"
    return files


@pytest.mark.parametrize("path", _manifests(), ids=lambda p: p.name)
def test_manifests_validate_against_the_kubernetes_schema(path):
    try:
        import kubernetes_validate
    except ImportError:
        pytest.skip("kubernetes-validate not installed (PyPI `kubernetes-validate`, in the test extra)")
    for doc in _docs(path):
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)  # raises ValidationError with the path


def test_schema_validation_rejects_a_misspelt_field():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    deployment = next(d for d in _docs(K8S / "zsad.yaml") if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


def test_deployment_probes_gpu_and_service_fit_the_image():
    docs = {d["kind"]: d for d in _docs(K8S / "zsad.yaml")}
    assert {"Deployment", "Service"} <= set(docs)
    dep, svc = docs["Deployment"], docs["Service"]
    pod = dep["spec"]["template"]
    spec = pod["spec"]
    container = spec["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == 8000  # ZSAD_PORT of the image
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in ports or container[probe]["httpGet"]["port"] in ports.values()
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    # pods run as the image's non-root user, read-only root file system
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # Service -> pods: the selector matches the pod labels, the target port is the container's
    labels = pod["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] in ports
    # Prometheus scrapes each pod
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
    assert int(ann["prometheus.io/port"]) == ports["http"]
    # replicas share one results store and one thresholds file
    env = {e["name"]: e for e in container["env"]}
    for name in env:
        if name.startswith("ZSAD_"):
            assert known_zsad_var(name), f"manifest sets {name}, which nothing reads"
    assert dep["spec"]["replicas"] >= 2
    assert env["ZSAD_RESULTS_URL"]["valueFrom"]["secretKeyRef"]["name"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    shared = env["ZSAD_THRESHOLDS_PATH"]["value"].rsplit("/", 1)[0]
    volume = next(v for v in spec["volumes"] if v["name"] == mounts[shared])
    claim = volume["persistentVolumeClaim"]["claimName"]
    pvc = next(d for d in _docs(K8S / "zsad.yaml") if d["kind"] == "PersistentVolumeClaim"
               and d["metadata"]["name"] == claim)
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    # the key files the entrypoint reads are mounted from the secret
    for var in ("ZSAD_API_KEYS_READ_FILE", "ZSAD_API_KEYS_ADMIN_FILE"):
        folder, name = env[var]["value"].rsplit("/", 1)
        secret = next(v for v in spec["volumes"] if v["name"] == mounts[folder])["secret"]
        assert name in {i["path"] for i in secret["items"]}
