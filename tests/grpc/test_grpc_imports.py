"""A server that does not serve gRPC never loads grpcio or tritonclient (they cost start-up time and
memory, and the GPU machine's check runs without them): only start-up with a gRPC port imports
cronnx.grpc."""

from __future__ import annotations

import subprocess
import sys

from support.server import REPO

FOUND = "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'tritonclient')))"


def _loaded(imports: str) -> str:
    done = subprocess.run([sys.executable, "-c", f"import sys; {imports}; {FOUND}"], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_modules_of_every_process_kind_load_no_grpc():
    assert _loaded("import cronnx.cli, cronnx.server.main, cronnx.fronts.child, cronnx.workers.child") == "[]"


def test_the_check_sees_grpc_where_it_is_loaded():
    """The negative control: the gRPC server's module, imported the same way, is seen."""
    loaded = _loaded("import cronnx.grpc.server")
    assert "'grpc'" in loaded and "'tritonclient.grpc'" in loaded, loaded
