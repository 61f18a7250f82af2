from __future__ import annotations

from pathlib import Path

import pytest

import support.server
from support.images import write_photo_set
from support.models import tiny_classifier
from support.server import REPO, ServerProcess

DEMO_MODEL = REPO / "models" / "mobilenetv2-demo.onnx"


def pytest_collection_modifyitems(items):
    # The fixtures that start servers are named for them (start_server, server, cpu_server,
    # http_servers, ...): their tests are marked here; a test that starts one another way is marked
    # in its module, and support.server refuses to start one for a test left unmarked.
    for item in items:
        if any(name.endswith(("server", "servers")) for name in item.fixturenames):
            item.add_marker(pytest.mark.server)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # Before the test's fixtures start anything: a server started by a test not marked `server`
    # fails it, so that the quick lane cannot run a server unnoticed.
    support.server.may_start = item.get_closest_marker("server") is not None


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The real default model, built once by the project's own code (cached in models/)."""
    if not DEMO_MODEL.exists():
        from cronnx.models.demo import write_demo_model

        write_demo_model(DEMO_MODEL)
    return DEMO_MODEL


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A small real classifier (support.models.tiny_classifier: FP32 [N, 3, 32, 32] in, 10
    logits out), written once for each test module that asks for it."""
    return tiny_classifier(tmp_path_factory.mktemp("models") / "tiny.onnx")


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> list[Path]:
    return write_photo_set(tmp_path_factory.mktemp("photos"))


@pytest.fixture
def start_server(tmp_path):
    """start_server(config_dict, args=(more serve options), env={more environment}) -> a running
    ServerProcess; stopped and cleaned up after the test."""
    servers: list[ServerProcess] = []

    def start(config: dict, wait_ready: bool = True, args: tuple[str, ...] = (),
              env: dict[str, str] | None = None) -> ServerProcess:
        workdir = tmp_path / f"server{len(servers)}"
        workdir.mkdir()
        server = ServerProcess(workdir, config, args, env)
        servers.append(server)
        return server.start(wait_ready)

    yield start
    for server in servers:
        server.cleanup()

