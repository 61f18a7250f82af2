"""The quick lane (pytest -m "not server") leaves out every test that starts a server: tests whose
fixtures start one are marked by conftest.py, and a test left unmarked cannot start one."""

from __future__ import annotations

import pytest

import support.server
from support.server import ServerProcess, server_config


@pytest.fixture
def some_server():
    """Starts nothing: conftest marks a test by the names of its fixtures (…server, …servers)."""


def test_an_unmarked_test_cannot_start_a_server(tmp_path):
    server = ServerProcess(tmp_path, server_config())
    with pytest.raises(RuntimeError, match="mark it `server`"):
        server.start()
    assert server.proc is None  # refused before anything was spawned


def test_a_test_whose_fixtures_start_servers_is_marked_and_may_start_one(request, some_server):
    assert request.node.get_closest_marker("server") is not None
    assert support.server.may_start


def test_a_test_without_such_fixtures_is_not_marked(request, tmp_path):
    assert request.node.get_closest_marker("server") is None
    assert not support.server.may_start
