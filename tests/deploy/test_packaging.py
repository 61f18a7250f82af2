"""Packaging: Cronnx depends on no onnxruntime build of its own (cronnx/models/runtime.py).
Installed without the `cpu` or `gpu` extra, `cronnx serve` refuses at start-up (exit 2) and says
what to install, rather than failing on an import somewhere later. A real environment is built: a fresh
venv and `pip install` of this checkout (about a minute, from pip's cache)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from support.server import REPO

pytestmark = [pytest.mark.timeout(600), pytest.mark.server]


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    """The interpreter of a new venv holding `pip install <this checkout>`: no extra."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(REPO)], check=True, timeout=540)
    return python


def test_without_an_onnxruntime_extra_serve_refuses_and_names_the_install(bare_python, tmp_path):
    found = subprocess.run([str(bare_python), "-c", "import importlib.util as u; print(u.find_spec('onnxruntime'))"],
                           capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "None"
    served = subprocess.run([str(bare_python), "-m", "cronnx", "serve", "--config", str(REPO / "config" / "cronnx.yaml"),
                             "--port", "0"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert served.returncode == 2, served.stderr
    assert "onnxruntime is not installed: pip install 'cronnx[cpu]', or 'cronnx[gpu]' for CUDA" in served.stderr
