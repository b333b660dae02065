"""The Kubernetes manifests (deploy/kubernetes) checked without a cluster: every overlay renders with `kubectl
kustomize`, every rendered object validates against the Kubernetes API schemas (kubernetes-validate, offline), the
pieces agree with each other, with `mrkd.serve`, the Dockerfile and the README, and the probes answer on a real
server started exactly as the Deployment starts it."""
from __future__ import annotations

import re
import shutil
import subprocess
import urllib.error
import urllib.request
from functools import lru_cache

import pytest
import yaml
from manifests import (
    KUBERNETES,
    REPO_ROOT,
    container_port,
    launch,
    ports_free,
    probe_port,
    serve_command,
    stop,
    triton_container,
    wait_ready,
)

OVERLAYS = ["overlays/cpu", "overlays/gpu"]
KSERVE = "kserve"
IMAGE = "mrkd-triton"
DNS_NAME = "triton-grpc.inspection.svc.cluster.local"
# validated against this release (the kubectl on these machines) and the newest kubernetes-validate bundles
OLDEST_KUBERNETES = "1.32.0"
# custom resources: their operators' schemas are not in kubernetes-validate; checked field by field below
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("serving.kserve.io/v1beta1", "InferenceService")}


@lru_cache(maxsize=None)
def render(folder: str) -> tuple[dict, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH: install kubectl (1.27 or newer; kustomize is built in) to render the "
                    "manifests")
    result = subprocess.run([kubectl, "kustomize", str(KUBERNETES / folder)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {folder} failed: {result.stderr}"
    return tuple(o for o in yaml.safe_load_all(result.stdout) if o)


def find(objects, kind: str, name: str | None = None) -> dict:
    matches = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(matches) == 1, f"{len(matches)} {kind} {name or ''} in the rendered manifests"
    return matches[0]


def pod_labels(objects) -> dict:
    return find(objects, "Deployment", "triton")["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("folder", OVERLAYS + [KSERVE])
def test_each_overlay_renders_and_every_object_validates_against_the_kubernetes_api_schemas(folder):
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    versions = sorted({OLDEST_KUBERNETES, latest_version()})
    objects = render(folder)
    checked, custom = [], []
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            custom.append(obj["kind"])
            continue
        for version in versions:
            kubernetes_validate.validate(obj, version, strict=True)  # raises ValidationError naming the field
        checked.append(f"{obj['kind']}/{obj['metadata']['name']}")
    print(f"\nkubectl kustomize deploy/kubernetes/{folder}: {len(checked)} objects valid against Kubernetes "
          f"{' and '.join(versions)} (strict): {', '.join(checked) or '-'}; custom resources checked field by field: "
          f"{', '.join(custom) or '-'}")
    if folder != KSERVE:
        assert {o["kind"] for o in objects} >= {"Namespace", "PersistentVolumeClaim", "Job", "Deployment", "Service",
                                                "PodDisruptionBudget", "HorizontalPodAutoscaler", "ServiceMonitor"}
        assert all(o["metadata"].get("namespace") == "inspection" for o in objects if o["kind"] != "Namespace")


def test_a_broken_manifest_is_caught_by_the_schema_check():
    """The check above can fail: a probe port given as a list, a misspelt field."""
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    deployment = find(render(OVERLAYS[0]), "Deployment", "triton")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = ["http"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, latest_version(), strict=True)
    misspelt = yaml.safe_load(yaml.safe_dump(deployment))
    misspelt["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, latest_version(), strict=True)


@pytest.mark.parametrize("folder", OVERLAYS)
def test_the_objects_of_an_overlay_fit_together(folder):
    objects = render(folder)
    deployment = find(objects, "Deployment", "triton")
    labels = pod_labels(objects)
    assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
    container = triton_container(deployment)
    base = triton_container()
    assert container["image"].startswith(f"{base['image']}:")  # tagged by the kustomization's images
    for field in ("command", "args", "ports", "startupProbe", "readinessProbe", "livenessProbe", "lifecycle"):
        assert container[field] == base[field], field
    # gRPC: headless (client-side balancing over every replica); metrics: ClusterIP, scraped by the ServiceMonitor
    grpc = find(objects, "Service", "triton-grpc")
    metrics = find(objects, "Service", "triton-metrics")
    assert grpc["spec"]["clusterIP"] == "None" and metrics["spec"].get("type", "ClusterIP") == "ClusterIP"
    for service, port_name in ((grpc, "grpc"), (metrics, "metrics")):
        assert selects(service["spec"]["selector"], labels)
        (port,) = service["spec"]["ports"]
        assert port["targetPort"] == port_name and port["port"] == container_port(container, port_name)
    monitor = find(objects, "ServiceMonitor")
    assert selects(monitor["spec"]["selector"]["matchLabels"], metrics["metadata"]["labels"])
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert selects(find(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels)
    hpa = find(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "triton"}
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "triton_pending_requests"
    # drains: Triton's own exit timeout (30 s) and the preStop pause fit in the grace period
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pause + 30 < deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # the repository: the export Job writes where the replicas read, on the same claim
    claim = find(objects, "PersistentVolumeClaim")["metadata"]["name"]
    job = find(objects, "Job", "mrkd-export")
    for pod in (deployment["spec"]["template"]["spec"], job["spec"]["template"]["spec"]):
        assert [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v] \
            == [claim]
    export = job["spec"]["template"]["spec"]["containers"][0]

    def value(args: list[str], flag: str) -> str:
        return args[args.index(flag) + 1]

    assert value(export["args"], "--repo") == value(container["args"], "--repo")
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    assert gpus == (1 if folder.endswith("gpu") else None)
    assert value(export["args"], "--device") == ("gpu" if folder.endswith("gpu") else "cpu")


def test_image_ports_and_repository_agree_between_manifests_readme_dockerfile_and_mrkd_serve():
    from mrkd.serve import parse_args

    container = triton_container()
    served = parse_args(container["args"])  # the Deployment's arguments are mrkd.serve's own
    defaults = parse_args(["--repo", "unused"])
    for name in ("grpc", "http", "metrics"):
        assert container_port(container, name) == getattr(served, f"{name}_port") == getattr(defaults, f"{name}_port")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe_port(container, container[probe]) == served.http_port
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "models")
    assert served.repo.startswith(mount + "/") and served.host == "0.0.0.0"

    dockerfile = (REPO_ROOT / "deploy" / "Dockerfile").read_text()
    readme = (REPO_ROOT / "README.md").read_text()
    docs = (REPO_ROOT / "docs" / "kubernetes.md").read_text()
    base_image = re.search(r"^FROM (\S+)", dockerfile, re.MULTILINE).group(1)
    assert base_image in readme and base_image in docs
    for port in (served.grpc_port, served.http_port, served.metrics_port):
        assert str(port) in dockerfile.split("\nEXPOSE ", 1)[1].splitlines()[0]
    assert served.repo in dockerfile  # the image's default command serves the same repository
    kustomization = yaml.safe_load((KUBERNETES / "base" / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    tag = f"{image['name']}:{image['newTag']}"
    assert image["name"] == IMAGE == container["image"] and tag in dockerfile and tag in docs
    setup = (REPO_ROOT / "setup.py").read_text()
    assert f'version="{image["newTag"]}"' in setup
    # the address the cameras' clients use: the headless Service's name, namespace and port
    url = f"dns:///{DNS_NAME}:{served.grpc_port}"
    assert url in readme and url in docs
    assert DNS_NAME.split(".")[:2] == ["triton-grpc", kustomization["namespace"]]


@pytest.mark.triton
@pytest.mark.slow
def test_the_probes_answer_on_a_real_server_started_as_the_deployment_starts_it(tiny_checkpoint, tmp_path):
    """`python -m mrkd.serve` with the Deployment's arguments (repository and listen address changed only): the
    startup, readiness and liveness probes' paths answer 200 on the port they name, gRPC answers on the grpc port, and
    the metrics port serves the series the HorizontalPodAutoscaler's adapter rule reads."""
    import tritonclient.grpc as grpcclient
    from conftest import export_encoded_only

    host = "127.0.0.9"
    container = triton_container()
    ports = [container_port(container, name) for name in ("grpc", "http", "metrics")]
    if reason := ports_free(host, ports):
        pytest.skip(reason)
    repo = tmp_path / "model_repository"
    export_encoded_only(tiny_checkpoint, repo, name="mrkd")
    server = launch(serve_command(container, repo, host), tmp_path / "triton.log")
    try:
        wait_ready(server)
        answers = {}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            url = f"http://{host}:{probe_port(container, container[probe])}{get['path']}"
            with urllib.request.urlopen(url, timeout=container[probe].get("timeoutSeconds", 1)) as response:
                answers[probe] = (url, response.status)
        with urllib.request.urlopen(f"http://{host}:{container_port(container, 'metrics')}/metrics") as response:
            metrics = response.read().decode()
        with grpcclient.InferenceServerClient(f"{host}:{container_port(container, 'grpc')}") as client:
            grpc_ready = client.is_server_ready() and client.is_model_ready("mrkd")
        missing = urllib.request.Request(f"http://{host}:{container_port(container, 'http')}/v2/health/unknown")
        with pytest.raises(urllib.error.HTTPError):  # a wrong path would have failed the probe
            urllib.request.urlopen(missing, timeout=2)
    finally:
        code = stop(server)
    print("\n" + "\n".join(f"{probe}: GET {url} -> {status}" for probe, (url, status) in answers.items()))
    assert all(status == 200 for _, status in answers.values()), answers
    assert grpc_ready
    assert re.search(r"^nv_inference_pending_request_count\{", metrics, re.MULTILINE), metrics[:2000]
    assert code == 0  # SIGTERM: mrkd.serve stops the server cleanly (what a pod's termination sends)


def test_the_kserve_alternative_serves_the_same_repository_with_the_same_image():
    (service,) = render(KSERVE)
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    model = service["spec"]["predictor"]["model"]
    objects = render(OVERLAYS[0])
    claim = find(objects, "PersistentVolumeClaim")["metadata"]["name"]
    container = triton_container(find(objects, "Deployment", "triton"))
    repo = container["args"][container["args"].index("--repo") + 1]
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "models")
    assert model["storageUri"] == f"pvc://{claim}/{repo[len(mount) + 1:]}"
    assert model["image"] == container["image"]
    assert model["modelFormat"]["name"] == "triton" and model["protocolVersion"] == "v2"
    assert service["metadata"]["namespace"] == find(objects, "Deployment")["metadata"]["namespace"]
