from __future__ import annotations

from pathlib import Path

import pytest

from support.images import write_photo_set
from support.server import REPO, ServerProcess

DEMO_MODEL = REPO / "models" / "mobilenetv2-demo.onnx"


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The real default model, built once by the project's own code (cached in models/)."""
    if not DEMO_MODEL.exists():
        from cronnx.models.demo import write_demo_model

        write_demo_model(DEMO_MODEL)
    return DEMO_MODEL


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> list[Path]:
    return write_photo_set(tmp_path_factory.mktemp("photos"))


@pytest.fixture
def start_server(tmp_path):
    """start_server(config_dict, args=(more serve options)) -> a running ServerProcess; stopped and cleaned up after the test."""
    servers: list[ServerProcess] = []

    def start(config: dict, wait_ready: bool = True, args: tuple[str, ...] = ()) -> ServerProcess:
        workdir = tmp_path / f"server{len(servers)}"
        workdir.mkdir()
        server = ServerProcess(workdir, config, args)
        servers.append(server)
        return server.start(wait_ready)

    yield start
    for server in servers:
        server.cleanup()

