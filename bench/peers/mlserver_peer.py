"""Start the MLServer peer of Cronnx: writes its settings to a temporary folder and runs `mlserver start`.

MLServer brings its own dependency set, so it runs from its own environment (bench/README.md):

    /tmp/mlsvenv/bin/python bench/peers/mlserver_peer.py --port 3300 [--model FILE] [--name mobilenetv2]

POST /v2/models/NAME/infer with {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
"data": ["<base64>"]}]} (the V2 inference protocol; `request_body` below builds it) answers the
top 5 as two outputs (bench/peers/mlserver_runtime.py). GET /v2/models/NAME/ready answers 200 once
the model is loaded. Same as the other peers: 2 inference worker processes (`parallel_workers`),
each with one single-threaded onnxruntime session, adaptive batching up to 4 images within 2 ms
(`max_batch_size`, `max_batch_time`); metrics and gRPC on ports of their own, unused.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def request_body(image: bytes) -> bytes:
    return json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "data": [base64.b64encode(image).decode()]}]}).encode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=3300)
    parser.add_argument("--model", default=str(ROOT / "models" / "mobilenetv2-demo.onnx"))
    parser.add_argument("--name", default="mobilenetv2")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=4)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="cronnx-mlserver-"))
    (folder / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": args.port, "grpc_port": _free_port(), "metrics_port": _free_port(),
        "parallel_workers": args.workers, "debug": False, "logging_settings": None}))
    (folder / "model-settings.json").write_text(json.dumps({
        "name": args.name, "implementation": "mlserver_runtime.OnnxClassifier",
        "max_batch_size": args.max_batch, "max_batch_time": 0.002,
        "parameters": {"uri": str(Path(args.model).resolve())}}))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "bench" / "peers"), os.environ.get("PYTHONPATH", "")])
    mlserver = Path(sys.executable).parent / "mlserver"
    os.execv(str(mlserver), [str(mlserver), "start", str(folder)])


if __name__ == "__main__":
    main()
