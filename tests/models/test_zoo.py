"""`cronnx models pull` against a local HTTP server: verified downloads, clear failures."""

from __future__ import annotations

import hashlib
import http.server
import socket
import subprocess
import sys
import threading

import pytest

from cronnx.models.zoo import BASE_URL_ENV, PullError, ZooEntry, pull
from support.server import REPO


@pytest.fixture
def file_server(tmp_path):
    """A plain HTTP server on 127.0.0.1 serving tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _entry_for(data: bytes, path: str = "m/model.onnx") -> ZooEntry:
    return ZooEntry("local-model", path, hashlib.sha256(data).hexdigest(), len(data))


def test_pull_downloads_and_verifies(file_server, tmp_path):
    root, url = file_server
    data = b"pretend onnx bytes" * 1000
    (root / "m").mkdir()
    (root / "m" / "model.onnx").write_bytes(data)
    target = pull(_entry_for(data), tmp_path / "models", base=url)
    assert target.read_bytes() == data


def test_checksum_mismatch_keeps_no_file(file_server, tmp_path):
    root, url = file_server
    (root / "m").mkdir()
    (root / "m" / "model.onnx").write_bytes(b"tampered")
    entry = _entry_for(b"original")
    with pytest.raises(PullError, match="checksum mismatch"):
        pull(entry, tmp_path / "models", base=url)
    assert list((tmp_path / "models").iterdir()) == []


def test_missing_file_reports_http_status(file_server, tmp_path):
    _, url = file_server
    with pytest.raises(PullError, match="404"):
        pull(_entry_for(b"x"), tmp_path / "models", base=url)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_pull_when_offline_fails_with_a_clear_message(tmp_path):
    env = {**__import__("os").environ, BASE_URL_ENV: f"http://127.0.0.1:{_closed_port()}"}
    result = subprocess.run([sys.executable, "-m", "cronnx", "models", "pull", "mobilenetv2-7", "--dir", str(tmp_path)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "cannot download" in result.stderr and "offline" in result.stderr
    # The mirror is already set: the hint is to check it, not to set it.
    assert f"check the mirror in {BASE_URL_ENV}" in result.stderr and "set " + BASE_URL_ENV not in result.stderr
    assert list(tmp_path.iterdir()) == []



def test_cli_pull_of_an_unknown_name_lists_the_known_ones(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cronnx", "models", "pull", "nosuchnet", "--dir", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "mobilenetv2-7" in result.stderr and "resnet50-v1-12" in result.stderr and "squeezenet1.1-7" in result.stderr
