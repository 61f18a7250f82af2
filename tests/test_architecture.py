"""The architecture's import rules (pyproject.toml, [tool.importlinter]) hold on the tree, and break
when a module crosses them: checked by import-linter itself, on this tree and on a copy with one
forbidden import added."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter's verdict on the package under `root` (its pyproject.toml's contracts)."""
    if not LINT_IMPORTS.exists():
        pytest.fail(f"import-linter is not installed beside {sys.executable} (pip install -e '.[test]')")
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_tree_keeps_every_import_contract():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 broken" in result.stdout


@pytest.mark.parametrize(("module", "forbidden", "contract"), [
    ("workers/child.py", "cronnx.engine.registry", "A worker process loads none of the server process's side"),
    ("preprocessing/child.py", "cronnx.preprocessing.placement",
     "A preprocessing process loads none of the server process's side"),
    ("models/spec.py", "cronnx.engine.pool", "Imports go down only"),
    ("fronts/link.py", "cronnx.engine.registry", "A front process loads none of the server process's side"),
    ("http/predict.py", "cronnx.engine.inference", "The protocols (HTTP, gRPC, what they share) see only"),
])
def test_an_import_across_the_rules_breaks_its_contract(tmp_path, module, forbidden, contract):
    shutil.copytree(REPO / "cronnx", tmp_path / "cronnx", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    path = tmp_path / "cronnx" / module
    path.write_text(path.read_text() + f"\nimport {forbidden}  # noqa: E402\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    assert "Broken contracts" in result.stdout, result.stdout
    assert contract in result.stdout.split("Broken contracts", 1)[1], result.stdout


# What a front process must not load: the server process's side (the contract of the same name).
SERVER_SIDE = ("cronnx.server", "cronnx.fronts.manager", "cronnx.engine.inference", "cronnx.engine.registry",
               "cronnx.engine.pool", "cronnx.engine.local", "cronnx.workers", "cronnx.preprocessing.placement",
               "cronnx.models.catalog", "cronnx.models.demo", "cronnx.models.zoo", "cronnx.observability.metrics")


def test_a_front_process_loads_none_of_the_server_process_side():
    """What the contract says of the imports, checked on what Python actually loads: the front
    process's entry module, imported alone in a fresh interpreter."""
    script = "import sys, cronnx.fronts.child; print(' '.join(m for m in sys.modules if m.startswith('cronnx.')))"
    result = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=60, check=True)
    loaded = set(result.stdout.split())
    assert {"cronnx.fronts.link", "cronnx.http.predict", "cronnx.http.v2"} <= loaded  # a negative control
    assert not {m for m in loaded if m.startswith(SERVER_SIDE)}, sorted(loaded)
