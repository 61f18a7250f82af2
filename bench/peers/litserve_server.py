"""A LitServe peer of Cronnx, for benchmarks: the same model, preprocessing and JSON API.

    .venv/bin/python bench/peers/litserve_server.py --port 8001 \
        [--model models/mobilenetv2-demo.onnx] [--max-batch-size 4] [--batch-timeout 0.002] [--workers 2]

POST /predict with {"image": "<base64 of a JPEG>"} answers
{"model": ..., "predictions": [{"class_id", "label", "confidence"} x top-k], "batch_size": n}.
GET /health answers 200 "ok" once every inference worker has run `setup` (LitServe's own route).

What is the same as Cronnx: `cronnx.preprocessing.transform.Preprocessor` with the default
`PreprocessConfig` (decode, resize, crop, normalise into a float32 (3, 224, 224) array),
`cronnx.models.postprocess.top_k` (softmax over the logits unless the model already outputs
probabilities), and one single-threaded onnxruntime session per worker on CPUExecutionProvider with
spinning off.

What is LitServe's (litserve 0.2.19): the HTTP front (uvicorn + FastAPI, `num_api_servers` processes,
by default one per inference worker), the request queue (multiprocessing.Manager queue, or ZMQ
with --fast-queue), and batching. In 0.2.19, `max_batch_size` and `batch_timeout` belong to the
LitAPI constructor (passing them to LitServer is deprecated), `workers_per_device` to LitServer.
The batching loop runs in each inference worker: it collects up to max_batch_size requests for
at most batch_timeout seconds from when it starts waiting, then calls decode_request on each,
batch, predict, unbatch and encode_response. decode_request (base64 + JPEG decode + preprocess)
therefore runs in the inference worker, in series with inference, as LitServe intends.

Nothing here reaches the network: LitServe is told not to write client.py, not to serve the
OpenAPI/Swagger pages, and has no MCP server unless the `mcp` package is installed (it is not
in this venv). SIGTERM stops the server and all of its processes, as Ctrl-C does.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import signal
import sys
import warnings
from pathlib import Path

# Runs as a script (python bench/peers/litserve_server.py), and LitServe's inference workers are
# spawned, so they import this file again: make `cronnx` importable in both without installing it.
_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import numpy as np  # noqa: E402
from fastapi import HTTPException  # noqa: E402

import litserve as ls  # noqa: E402
from cronnx.models.catalog import load_labels  # noqa: E402
from cronnx.models.spec import inspect_model  # noqa: E402
from cronnx.models.postprocess import top_k  # noqa: E402
from cronnx.preprocessing.transform import ImageError, ImageTooLarge  # noqa: E402
from peer_model import open_model  # noqa: E402


class CronnxPeerAPI(ls.LitAPI):
    """One inference worker: decode + preprocess each request, run the batch, top-k each output."""

    def __init__(self, model_path: str, model_name: str, labels_path: str | None, top_k: int, **kwargs):
        super().__init__(**kwargs)
        self.model_path = model_path
        self.model_name = model_name
        self.labels_path = labels_path
        self.k = top_k

    def setup(self, device):
        self.session, spec, self.pre = open_model(self.model_path)
        self.spec = spec
        self.labels = load_labels(self.labels_path, spec.num_classes, "class_")
        self.item_shape = spec.input_item_shape
        self.dtype = np.dtype(spec.input_dtype)

    def decode_request(self, request):
        try:
            data = base64.b64decode(request["image"], validate=True)
        except (KeyError, TypeError):
            raise HTTPException(400, 'body must be JSON {"image": "<base64>"}') from None
        except (binascii.Error, ValueError):
            raise HTTPException(400, "image is not valid base64") from None
        out = np.empty(self.item_shape, self.dtype)
        try:
            self.pre(data, out)
        except ImageTooLarge as exc:
            raise HTTPException(413, str(exc)) from None
        except ImageError as exc:
            raise HTTPException(400, str(exc)) from None
        return out

    def batch(self, inputs):
        n = len(inputs)
        size = self.spec.fixed_batch or n
        if size < n:
            raise HTTPException(500, f"model takes batches of {size}; max_batch_size must be <= that")
        x = np.empty((size, *self.item_shape), self.dtype)
        x[:n] = inputs
        if size > n:
            x[n:] = 0
        return x, n

    def predict(self, batch):
        single = isinstance(batch, np.ndarray)  # max_batch_size 1: LitServe's SingleLoop skips batch/unbatch
        x, n = self.batch([batch]) if single else batch
        (y,) = self.session.run([self.spec.output_name], {self.spec.input_name: x})
        return (y[0], 1) if single else (y[:n], n)

    def unbatch(self, output):
        y, n = output
        return [(y[i], n) for i in range(n)]

    def encode_response(self, output):
        scores, n = output
        predictions = [{"class_id": i, "label": self.labels[i], "confidence": p}
                       for i, p in top_k(scores, self.k, self.spec.outputs_probabilities)]
        return {"model": self.model_name, "predictions": predictions, "batch_size": n}


def _sigterm_as_interrupt() -> None:
    """SIGTERM -> KeyboardInterrupt in the main process, so LitServer.run shuts down all it started.

    Left alone, SIGTERM would kill only the main process and orphan the Manager, the uvicorn
    processes and the inference workers. Forked children (the Manager) inherit this handler: they
    get the default action instead. Uvicorn installs its own handlers; spawned workers start clean.
    """
    main_pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() != main_pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        signal.signal(signum, signal.SIG_IGN)  # a second SIGTERM must not interrupt the shutdown
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1", "0.0.0.0", "::"])
    parser.add_argument("--model", default="models/mobilenetv2-demo.onnx")
    parser.add_argument("--model-name", default="mobilenetv2")
    parser.add_argument("--labels", default=None, help="Labels file, one per line (default: class_N).")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--batch-timeout", type=float, default=0.002, help="Seconds.")
    parser.add_argument("--workers", type=int, default=2, help="LitServe workers_per_device (accelerator cpu).")
    parser.add_argument("--api-servers", type=int, default=None,
                        help="uvicorn processes (LitServe num_api_servers; default: one per worker).")
    parser.add_argument("--fast-queue", action="store_true", help="LitServe's ZMQ transport instead of mp queues.")
    parser.add_argument("--timeout", type=float, default=30.0, help="LitServe request timeout, seconds.")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--no-access-log", action="store_true", help="Turn off uvicorn's per-request log line.")
    args = parser.parse_args()

    model = Path(args.model)
    if not model.is_file():
        parser.error(f"{model}: no such file (build the demo with: .venv/bin/python -m cronnx models demo)")
    spec = inspect_model(str(model))  # fail here, not in a worker, on a model Cronnx would refuse
    if spec.fixed_batch is not None and args.max_batch_size > spec.fixed_batch:
        parser.error(f"the model takes batches of exactly {spec.fixed_batch}; --max-batch-size must be <= that")

    # At --max-batch-size 1 LitServe uses its SingleLoop and never calls batch/unbatch; predict copes.
    warnings.filterwarnings("ignore", message="The LitServer has both batch and unbatch methods implemented")
    api = CronnxPeerAPI(str(model.resolve()), args.model_name, args.labels, args.top_k,
                        max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout,
                        api_path="/predict")
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers, timeout=args.timeout,
                          healthcheck_path="/health", disable_openapi_url=True, track_requests=False)
    _sigterm_as_interrupt()
    server.run(host=args.host, port=args.port, num_api_servers=args.api_servers, log_level=args.log_level,
               generate_client_file=False, access_log=not args.no_access_log)


if __name__ == "__main__":
    main()
