"""The `cronnx` command itself (its subcommands are tested with what they run)."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

from support.server import REPO


def test_cronnx_version_prints_the_installed_version():
    result = subprocess.run([sys.executable, "-m", "cronnx", "--version"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == f"cronnx, version {version('cronnx')}"
