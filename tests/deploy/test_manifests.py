"""The Kubernetes and KServe manifests in deploy/: valid for the API server, and in step with the server.

Built-in kinds are validated offline by kubernetes-validate in strict mode (an unknown field
fails) against the oldest Kubernetes the manifests are written for and the newest the package
knows; KServe's kinds are built field by field from the generated models of KServe's own Python
SDK, in a process of its own (kserve_sdk.py says why). Then a real `cronnx serve` with each pod's
config (host and ports changed, nothing else) answers the paths the probes and the Prometheus
annotations name and gRPC calls, exports the series that the autoscaling rule reads, fits its
rings in the pod's /dev/shm, and stops within the grace period.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import kubernetes_validate
import msgspec.yaml
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import yaml
from prometheus_client.parser import text_string_to_metric_families

from cronnx.config import Config
from cronnx.models.spec import inspect_model
from support.server import REPO, ServerProcess, shm_segments

DEPLOY = REPO / "deploy"
CPU = DEPLOY / "kubernetes" / "cpu"
GPU = DEPLOY / "kubernetes" / "gpu"
KSERVE = DEPLOY / "kserve"
ADAPTER_VALUES = DEPLOY / "prometheus-adapter" / "values.yaml"
KSERVE_SDK = Path(__file__).with_name("kserve_sdk.py")
# 1.30: the oldest with the preStop `sleep` action on by default; 1.37: the newest
# kubernetes-validate 1.37 has schemas for.
KUBERNETES_VERSIONS = ["1.30", "1.37"]
# Labels the Prometheus scrape job adds from the pod's metadata: no Cronnx series carries them.
SCRAPE_LABELS = {"namespace", "pod"}
PAGE = 4096
# The folder KServe's storage initializer fills from an InferenceService's storageUri.
KSERVE_MODELS = "/mnt/models"
# Kubernetes' appProtocol for HTTP/2 without TLS, which gRPC speaks; KServe gives it to a
# predictor's Service port whose container port's name holds "grpc" or "h2c".
H2C = "kubernetes.io/h2c"


# --- What `kubectl apply -k` applies -------------------------------------------------------------

KUSTOMIZE_FIELDS = {"apiVersion", "kind", "resources", "configMapGenerator", "patches"}


def kustomize(folder: Path) -> list[dict]:
    """The objects `kubectl apply -k folder` applies, as far as deploy/'s kustomizations use
    kustomize: resources (files, or folders with a kustomization), configMapGenerator from files
    (`behavior: replace` in an overlay) and strategic-merge patches. Generated names keep no hash
    suffix. A field of kustomize that is not handled here fails."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert set(spec) <= KUSTOMIZE_FIELDS, f"{folder}: kustomize fields not rendered here: {set(spec) - KUSTOMIZE_FIELDS}"
    objects: list[dict] = []
    for entry in spec.get("resources", []):
        path = (folder / entry).resolve()
        if path.is_dir():
            # kustomize refuses a base that contains the overlay ("cycle detected").
            assert not folder.resolve().is_relative_to(path), f"{folder}: resource {entry} contains it"
            objects += kustomize(path)
        else:
            objects += load_documents(path)
    for generator in spec.get("configMapGenerator", []):
        config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]},
                      "data": {Path(name).name: (folder / name).read_text() for name in generator["files"]}}
        if generator.get("behavior") == "replace":
            objects.remove(find(objects, "ConfigMap", generator["name"]))
        objects.append(config_map)
    for patch in spec.get("patches", []):
        change = yaml.safe_load((folder / patch["path"]).read_text())
        strategic_merge(find(objects, change["kind"], change["metadata"]["name"]), change)
    return objects


def strategic_merge(target: dict, patch: dict) -> None:
    """Kubernetes' strategic merge for the fields deploy/'s patches touch: maps merge, lists of
    named items (containers, volumes) merge item by item on the name, other lists are replaced."""
    for key, value in patch.items():
        current = target.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            strategic_merge(current, value)
        elif isinstance(value, list) and isinstance(current, list) and all("name" in item for item in value):
            by_name = {item["name"]: item for item in current}
            for item in value:
                if item["name"] in by_name:
                    strategic_merge(by_name[item["name"]], item)
                else:
                    current.append(item)
        else:
            target[key] = value


def load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(obj: dict) -> dict:
    """The pod template's spec of a Deployment, or a ServingRuntime's spec (which holds its pod's
    containers and volumes); {} for other kinds."""
    if obj["kind"] == "Deployment":
        return obj["spec"]["template"]["spec"]
    if obj["kind"] == "ServingRuntime":
        return obj["spec"]
    return {}


def cpu_objects() -> list[dict]:
    return kustomize(CPU)


def gpu_objects() -> list[dict]:
    return kustomize(GPU)


def kserve_objects() -> list[dict]:
    return kustomize(KSERVE) + load_documents(KSERVE / "inferenceservice.yaml")


SETS = {"cpu": cpu_objects, "gpu": gpu_objects, "kserve": kserve_objects}


# --- KServe's kinds against KServe's SDK models --------------------------------------------------

class SchemaError(AssertionError):
    pass


def kserve_errors(items: list[tuple[dict, str, str]]) -> list[str | None]:
    """Each (value, SDK type name, path)'s error as kserve_sdk.py finds it in a process of its own
    (it says why), None for a valid one."""
    done = subprocess.run([sys.executable, str(KSERVE_SDK)], input=json.dumps(items), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


KSERVE_MODELS_BY_KIND = {("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
                         ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService"}


def validate(objects: list[dict], kubernetes_version: str) -> None:
    """Validate objects: KServe's kinds with KServe's SDK (SchemaError naming the first fault),
    the others with kubernetes-validate (strict). A kind neither knows fails."""
    kserve_kinds = [o for o in objects if o["apiVersion"].startswith("serving.kserve.io/")]
    for obj in objects:
        if obj not in kserve_kinds:
            kubernetes_validate.validate(obj, kubernetes_version, strict=True)
    if kserve_kinds:
        errors = kserve_errors([(o, KSERVE_MODELS_BY_KIND[(o["apiVersion"], o["kind"])], o["kind"])
                                for o in kserve_kinds])
        for error in filter(None, errors):
            raise SchemaError(error)


# --- Helpers on objects and the live server ------------------------------------------------------

def quantity(value: str | int) -> float:
    """A Kubernetes quantity ("256Mi", "2", "500m") as a number (bytes, cores)."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
    return float(number) * units.get(unit, 1)


def pod_config(objects: list[dict]) -> tuple[Config, dict]:
    """The Cronnx config the pod runs: the file its container's --config names, read from the
    ConfigMap mounted there; and that config as parsed YAML."""
    spec = pod_spec(next(o for o in objects if pod_spec(o)))
    container = spec["containers"][0]
    config_path = Path(container["args"][container["args"].index("--config") + 1])
    mount = next(m for m in container["volumeMounts"] if Path(m["mountPath"]) == config_path.parent)
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    text = find(objects, "ConfigMap", volume["configMap"]["name"])["data"][config_path.name]
    return msgspec.yaml.decode(text, type=Config), yaml.safe_load(text)


def container_port(container: dict, port: int | str) -> int:
    """A probe's or Service's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == port)


def probes(container: dict) -> dict[str, dict]:
    return {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def metric_families(url: str) -> dict[str, object]:
    status, body = get(url)
    assert status == 200
    return {family.name: family for family in text_string_to_metric_families(body.decode())}


def ring_bytes(config: Config) -> int:
    """What the config's rings take in /dev/shm: per model version and worker, ring_slots input
    and output tensors, each segment a whole number of pages. The model paths (relative to the
    pod's working directory, /) are opened in the repository, where the tests build the demo."""
    total = 0
    for model in config.models:
        spec = inspect_model(str(REPO / model.path))
        for shape, dtype in ((spec.input_item_shape, spec.input_dtype), (spec.output_item_shape, spec.output_dtype)):
            segment = model.ring_slots * int(np.prod(shape)) * np.dtype(dtype).itemsize
            total += model.worker_count * pages(segment)
    return total


def pages(size: int) -> int:
    """The bytes a file of `size` bytes takes in tmpfs: whole pages."""
    return -(-size // PAGE) * PAGE


def segment_bytes(pid: int) -> int:
    return sum(pages((Path("/dev/shm") / name).stat().st_size) for name in shm_segments(pid))


def start(config: dict, workdir: Path) -> ServerProcess:
    """A real `cronnx serve` of the pod's config, on 127.0.0.1, a free port (ServerProcess adds
    --port 0) and a free gRPC port: the host and ports are the only changes."""
    config = copy.deepcopy(config)
    config["server"]["host"] = "127.0.0.1"
    assert config["server"]["grpc_port"] is not None
    config["server"]["grpc_port"] = 0
    workdir.mkdir(parents=True)
    return ServerProcess(workdir, config).start()


def grpc_client(server: ServerProcess) -> triton_grpc.InferenceServerClient:
    """Triton's gRPC client of `server`, on the port its log names ("serving gRPC on HOST:PORT")."""
    address = re.search(r"serving gRPC on ([\d.]+:\d+)", server.log())
    assert address, server.log()
    return triton_grpc.InferenceServerClient(address.group(1))


def kserve_repository(folder: Path, demo_model: Path) -> Path:
    """What the storage initializer leaves in /mnt/models for a storageUri in Triton's layout."""
    (folder / "mobilenetv2" / "1").mkdir(parents=True)
    shutil.copy(demo_model, folder / "mobilenetv2" / "1" / "model.onnx")
    return folder


def kserve_config(repository: Path) -> dict:
    _, config = pod_config(kserve_objects())
    assert config["server"]["model_repository"] == KSERVE_MODELS
    config["server"]["model_repository"] = str(repository)
    return config


@pytest.fixture(scope="module")
def cpu_server(demo_model, tmp_path_factory):
    server = start(pod_config(cpu_objects())[1], tmp_path_factory.mktemp("deploy") / "cpu")
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def kserve_server(demo_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("kserve")
    server = start(kserve_config(kserve_repository(folder / "mnt-models", demo_model)), folder / "server")
    yield server
    server.cleanup()


# --- Offline validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", SETS)
def test_every_object_is_valid(name, version):
    objects = SETS[name]()
    validate(objects, version)
    expected = {"cpu": ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Service"],
                "gpu": ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Service"],
                "kserve": ["ConfigMap", "InferenceService", "ServingRuntime"]}[name]
    assert sorted(o["kind"] for o in objects) == expected


def test_the_validators_reject_unknown_fields_and_wrong_types():
    deployment = copy.deepcopy(find(cpu_objects(), "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="livenessProbes"):
        validate([deployment], KUBERNETES_VERSIONS[0])

    runtime = find(kserve_objects(), "ServingRuntime")
    misspelt = copy.deepcopy(runtime)
    misspelt["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/ready"
    with pytest.raises(SchemaError, match=r"containers\[0\]\.readinessProbe\.httpGet: V1HTTPGetAction has no field paht"):
        validate([misspelt], KUBERNETES_VERSIONS[0])
    scalar = copy.deepcopy(runtime)
    scalar["spec"]["protocolVersions"] = "v2"
    nameless = copy.deepcopy(runtime)
    del nameless["spec"]["containers"][0]["name"]
    # One SDK process for the rest.
    valid, not_a_list, no_name = kserve_errors([(o, "V1alpha1ServingRuntime", "ServingRuntime")
                                                for o in (runtime, scalar, nameless)])
    assert valid is None
    assert "protocolVersions: expected a list" in not_a_list
    assert "name" in no_name
    with pytest.raises(kubernetes_validate.utils.SchemaNotFoundError):
        validate([{"apiVersion": "example.com/v1", "kind": "Unknown", "metadata": {"name": "x"}}], "1.30")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (which carries kustomize) is not installed")
@pytest.mark.parametrize("folder", [CPU, GPU, KSERVE], ids=["cpu", "gpu", "kserve"])
def test_kustomize_renders_what_these_tests_check(folder):
    rendered = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, check=True)
    objects = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
    # kustomize suffixes a generated ConfigMap's name with a hash of its data (so that a change
    # rolls the pods) and rewrites the references to it; kustomize() keeps the plain name.
    plain = {o["metadata"]["name"] for o in kustomize(folder) if o["kind"] == "ConfigMap"}
    hashed = {o["metadata"]["name"]: re.sub(r"-[a-z0-9]{10}$", "", o["metadata"]["name"])
              for o in objects if o["kind"] == "ConfigMap"}
    assert set(hashed.values()) == plain

    def unhash(value):
        if isinstance(value, dict):
            return {k: unhash(v) for k, v in value.items()}
        if isinstance(value, list):
            return [unhash(v) for v in value]
        return hashed.get(value, value)

    def key(obj: dict) -> tuple[str, str]:
        return obj["kind"], obj["metadata"]["name"]
    assert sorted(map(unhash, objects), key=key) == sorted(kustomize(folder), key=key)


def test_every_file_in_deploy_is_checked():
    checked = {ADAPTER_VALUES, KSERVE / "inferenceservice.yaml"}
    for kustomization in DEPLOY.rglob("kustomization.yaml"):
        folder = kustomization.parent
        spec = yaml.safe_load(kustomization.read_text())
        checked.add(kustomization)
        checked |= {folder / entry for entry in spec.get("resources", []) if not (folder / entry).is_dir()}
        checked |= {folder / name for generator in spec.get("configMapGenerator", []) for name in generator["files"]}
        checked |= {folder / patch["path"] for patch in spec.get("patches", [])}
    assert sorted(DEPLOY.rglob("*.yaml")) == sorted(checked)


@pytest.mark.parametrize("name", SETS)
def test_every_pod_config_is_valid_and_listens_on_all_interfaces(name):
    config, _ = pod_config(SETS[name]())
    assert config.server.host == "0.0.0.0"


@pytest.mark.parametrize("name", SETS)
def test_every_pod_serves_grpc_on_the_port_its_manifests_name_grpc(name):
    objects = SETS[name]()
    config, _ = pod_config(objects)
    container = pod_spec(next(o for o in objects if pod_spec(o)))["containers"][0]
    # HTTP's port first: KServe makes the first container port its Service's port 80 (HTTP).
    http, grpc = container["ports"]
    assert http["containerPort"] == config.server.port and "grpc" not in http["name"]
    assert (grpc["name"], grpc["containerPort"]) == ("grpc", config.server.grpc_port)
    if name != "kserve":  # KServe makes its own Service from the container's ports
        ports = find(objects, "Service")["spec"]["ports"]
        [grpc_service] = [p for p in ports if container_port(container, p["targetPort"]) == config.server.grpc_port]
        assert (grpc_service["name"], grpc_service["appProtocol"]) == ("grpc", H2C)


def test_the_inference_service_runs_cronnx_on_the_storage_initializer_folder():
    runtime = find(kserve_objects(), "ServingRuntime")["spec"]
    # KServe admits an InferenceService asking for either protocol only if the runtime lists it.
    assert runtime["protocolVersions"] == ["v2", "grpc-v2"]
    assert [f["name"] for f in runtime["supportedModelFormats"]] == ["onnx"]
    container = runtime["containers"][0]
    assert container["name"] == "kserve-container"  # the container KServe adds the model's storage to
    config, _ = pod_config(kserve_objects())
    assert config.server.model_repository == KSERVE_MODELS and not config.models
    service = find(kserve_objects(), "InferenceService")["spec"]["predictor"]["model"]
    assert (service["runtime"], service["protocolVersion"], service["modelFormat"]["name"]) == ("cronnx", "v2", "onnx")
    assert find(kserve_objects(), "ServingRuntime")["metadata"]["name"] == service["runtime"]


# --- The manifests against what the server serves -------------------------------------------------

def test_the_deployment_probes_ports_and_scrape_path_are_what_the_server_serves(cpu_server):
    objects = cpu_objects()
    config, _ = pod_config(objects)
    pod = find(objects, "Deployment")["spec"]["template"]
    container = pod["spec"]["containers"][0]
    paths = {kind: probe["path"] for kind, probe in probes(container).items()}
    assert paths == {"startupProbe": "/health", "livenessProbe": "/health", "readinessProbe": "/ready"}
    for probe in probes(container).values():
        assert container_port(container, probe["port"]) == config.server.port
        assert get(cpu_server.url + probe["path"])[0] == 200
    assert [p["containerPort"] for p in container["ports"]] == [config.server.port, config.server.grpc_port]
    service = find(objects, "Service")["spec"]
    assert service["selector"].items() <= pod["metadata"]["labels"].items()
    assert [container_port(container, p["targetPort"]) for p in service["ports"]] == [config.server.port,
                                                                                      config.server.grpc_port]
    with grpc_client(cpu_server) as client:
        assert client.is_server_ready()

    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == config.server.port
    assert "cronnx_requests" in metric_families(cpu_server.url + annotations["prometheus.io/path"])


def test_the_kserve_runtime_probes_ports_and_v2_inference_work(kserve_server, photos):
    objects = kserve_objects()
    config, _ = pod_config(objects)
    runtime = find(objects, "ServingRuntime")["spec"]
    container = runtime["containers"][0]
    assert [p["containerPort"] for p in container["ports"]] == [config.server.port, config.server.grpc_port]
    assert {probe["path"] for probe in probes(container).values()} == {"/v2/health/live", "/v2/health/ready"}
    for probe in probes(container).values():
        assert container_port(container, probe["port"]) == config.server.port
        assert get(kserve_server.url + probe["path"])[0] == 200
    for key in ("prometheus.io/port", "prometheus.kserve.io/port"):
        assert int(runtime["annotations"][key]) == config.server.port
    assert "cronnx_requests" in metric_families(kserve_server.url + runtime["annotations"]["prometheus.io/path"])

    # The README's request: the model is named after its folder in the storageUri.
    _, metadata = get(kserve_server.url + "/v2/models/mobilenetv2")
    output = json.loads(metadata)["outputs"][0]["name"]
    body = {"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES",
                        "data": [base64.b64encode(photos[0].read_bytes()).decode()]}],
            "outputs": [{"name": output, "parameters": {"classification": 3}}]}
    request = urllib.request.Request(kserve_server.url + "/v2/models/mobilenetv2/infer", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.loads(response.read())
    assert answer["model_name"] == "mobilenetv2"
    assert len(answer["outputs"][0]["data"]) == 3

    # The same request over gRPC (KServe's protocolVersion grpc-v2).
    images = triton_grpc.InferInput("IMAGE", [1], "BYTES")
    images.set_data_from_numpy(np.array([photos[0].read_bytes()], dtype=object))
    top3 = triton_grpc.InferRequestedOutput(output, class_count=3)
    with grpc_client(kserve_server) as client:
        answer = client.infer("mobilenetv2", [images], outputs=[top3])
    assert answer.get_response().model_name == "mobilenetv2"
    assert answer.as_numpy(output).shape == (1, 3)


def test_the_hpa_metric_is_an_exported_gauge_served_by_the_adapter_rule(cpu_server):
    for objects in (cpu_objects(), gpu_objects()):
        hpa = find(objects, "HorizontalPodAutoscaler")["spec"]
        assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                         "name": find(objects, "Deployment")["metadata"]["name"]}
        [metric] = hpa["metrics"]
        assert metric["type"] == "Pods"
        name = metric["pods"]["metric"]["name"]
        # The target: the requests that keep every worker running full batches.
        config, _ = pod_config(objects)
        assert quantity(metric["pods"]["target"]["averageValue"]) == sum(
            m.worker_count * m.batch_size for m in config.models)

        rules = [r for r in yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
                 if re.sub(r["name"]["matches"], _go_template(r["name"]["as"]),
                           _series_name(r["seriesQuery"])) == name]
        assert len(rules) == 1, f"one adapter rule must serve {name}"
        rule = rules[0]
        series, matchers = _series_name(rule["seriesQuery"]), _matchers(rule["seriesQuery"])
        family = metric_families(cpu_server.url + "/metrics")[series]
        assert family.type == "gauge"  # averaged per pod as it is, with no rate()
        # The scrape's labels are the ones mapped to pods; any other matcher must hold on the series.
        assert {label for label, _, _ in matchers} & SCRAPE_LABELS == SCRAPE_LABELS
        assert {k: v["resource"] for k, v in rule["resources"]["overrides"].items()} == {"namespace": "namespace",
                                                                                          "pod": "pod"}
        for sample in family.samples:
            assert all(_holds(sample.labels.get(label, ""), op, value)
                       for label, op, value in matchers if label not in SCRAPE_LABELS)
        assert all(f"<<.{part}>>" in rule["metricsQuery"] for part in ("Series", "LabelMatchers", "GroupBy"))


def _series_name(query: str) -> str:
    return re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{.*\}", query)[1]


def _matchers(query: str) -> list[tuple[str, str, str]]:
    return re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', query[query.index("{"):])


def _holds(actual: str, op: str, value: str) -> bool:
    return {"=": actual == value, "!=": actual != value, "=~": bool(re.fullmatch(value, actual)),
            "!~": not re.fullmatch(value, actual)}[op]


def _go_template(replacement: str) -> str:
    """The adapter's `as` (Go's ${1}) as a Python replacement (\\g<1>)."""
    return re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", replacement)


def test_dev_shm_holds_the_rings_twice(cpu_server, kserve_server, demo_model):
    cpu_config, _ = pod_config(cpu_objects())
    measured = segment_bytes(cpu_server.proc.pid)
    assert measured == ring_bytes(cpu_config) > 0  # the formula, checked on the real server
    needs = {"cpu": measured, "gpu": ring_bytes(pod_config(gpu_objects())[0]),
             # The repository's defaults for the demo model: what the KServe server made.
             "kserve": segment_bytes(kserve_server.proc.pid)}
    assert needs["kserve"] > 0
    for name, need in needs.items():
        spec = pod_spec(next(o for o in SETS[name]() if pod_spec(o)))
        container = spec["containers"][0]
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
        shm = next(v for v in spec["volumes"] if v["name"] == mount["name"])["emptyDir"]
        assert shm["medium"] == "Memory"
        # A reload holds the old and the new version's rings at once.
        assert quantity(shm["sizeLimit"]) >= 2 * need, name
        # Memory-backed: its pages count against the container's memory limit, beside the processes.
        assert quantity(shm["sizeLimit"]) < quantity(container["resources"]["limits"]["memory"]), name


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_the_pod_resources_match_its_config(name):
    objects = SETS[name]()
    config, _ = pod_config(objects)
    container = find(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    resources = container["resources"]
    assert resources["requests"] == {k: v for k, v in resources["limits"].items() if k in ("cpu", "memory")}
    # One preprocessing thread per CPU of the pod.
    assert config.server.preprocess_threads == quantity(resources["limits"]["cpu"])
    gpus = sum(len(m.devices) for m in config.models)
    assert int(resources["limits"].get("nvidia.com/gpu", 0)) == gpus
    assert container["image"] == {"cpu": "cronnx:cpu", "gpu": "cronnx:cuda"}[name]
    assert (gpus > 0) == (name == "gpu")


@pytest.mark.server
@pytest.mark.parametrize("name", ["cpu", "kserve"])
def test_the_grace_period_covers_the_prestop_sleep_and_the_drain(name, demo_model, tmp_path):
    objects = SETS[name]()
    config, raw = pod_config(objects)
    if name == "kserve":
        raw = kserve_config(kserve_repository(tmp_path / "mnt-models", demo_model))
        grace = find(objects, "InferenceService")["spec"]["predictor"]["terminationGracePeriodSeconds"]
    else:
        grace = find(objects, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    container = pod_spec(next(o for o in objects if pod_spec(o)))["containers"][0]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]

    server = start(raw, tmp_path / "server")
    try:
        pid = server.proc.pid
        assert shm_segments(pid)
        began = time.monotonic()
        assert server.stop(signal.SIGTERM, timeout_s=grace) == 0
        stopped_in = time.monotonic() - began
        assert shm_segments(pid) == []
    finally:
        server.cleanup()
    # A request that arrived just before SIGTERM may take request_timeout_s to be answered; then
    # the workers stop as they just did.
    assert grace >= pre_stop + config.server.request_timeout_s + stopped_in
    assert pre_stop >= 1
