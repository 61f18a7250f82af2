"""A BentoML peer of Cronnx, for benchmarks: the same model, preprocessing and JSON API.

    bench/peers/bentoml_server.sh PORT          # from anywhere; uses /tmp/bentovenv

which runs (env BENTOML_DO_NOT_TRACK=True, cwd = repository root)

    /tmp/bentovenv/bin/bentoml serve bentoml_service:Classifier --working-dir bench/peers \
        --host 127.0.0.1 --port PORT

POST /predict with {"image": "<base64 of a JPEG>"} answers
{"model": ..., "predictions": [{"class_id", "label", "confidence"} x top-k], "batch_size": n}.
GET /readyz answers 200 once the worker processes have started and run `__init__` (model loaded);
/livez and /healthz answer 200 as soon as the HTTP server is up (BentoML's own routes).

What is the same as Cronnx: `cronnx.preprocessing.transform.Preprocessor` with the default
`PreprocessConfig`, `cronnx.models.postprocess.top_k` (softmax over logits unless the model already
outputs probabilities), one single-threaded onnxruntime session per worker on CPUExecutionProvider
with spinning off.

What is BentoML's (bentoml 1.4.40, the "new" service API): `workers` processes, each a uvicorn
server sharing the listening socket, each with its own copy of the service and of the adaptive
batcher (CorkDispatcher). A batchable API receives a *list* for its one argument, both per HTTP
request and after batching (the dispatcher concatenates the per-request lists, calls the function
once in the worker's single inference thread, and slices the returned list back per request).
To keep Cronnx's body {"image": "<base64>"} a plain string is accepted and wrapped into a list of
one (pydantic BeforeValidator), and the response for a list of one is unwrapped to the object
(custom output spec), so a request is one image and one JSON object, as with Cronnx. Base64 decode
and preprocessing run inside the batched function, in series with inference (as in the LitServe
peer). A bad image in a batch answers 400 for that request only.

Environment: CRONNX_PEER_MODEL (default models/mobilenetv2-demo.onnx, relative to the repository
root), CRONNX_PEER_WORKERS (2), CRONNX_PEER_MAX_BATCH (4), CRONNX_PEER_MAX_LATENCY_MS (30000: a shedding deadline, see below),
CRONNX_PEER_ACCESS_LOG (0: no per-request log line), CRONNX_PEER_TOP_K (5).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

import bentoml  # noqa: E402
import numpy as np  # noqa: E402
from _bentoml_sdk.io_models import IORootModel  # noqa: E402
from pydantic import BeforeValidator  # noqa: E402
from starlette.responses import Response  # noqa: E402

from cronnx.models.postprocess import top_k  # noqa: E402
from cronnx.preprocessing.transform import ImageError, ImageTooLarge  # noqa: E402
from peer_model import open_model  # noqa: E402

MODEL = Path(os.environ.get("CRONNX_PEER_MODEL", "models/mobilenetv2-demo.onnx"))
if not MODEL.is_absolute():
    MODEL = _ROOT / MODEL
MODEL_NAME = os.environ.get("CRONNX_PEER_MODEL_NAME", "mobilenetv2")
WORKERS = int(os.environ.get("CRONNX_PEER_WORKERS", "2"))
MAX_BATCH = int(os.environ.get("CRONNX_PEER_MAX_BATCH", "4"))  # BentoML requires > 1
# Not a batching window: BentoML learns how long to hold a batch open (CorkDispatcher). max_latency_ms
# is a deadline: a queued request whose estimated latency reaches it is shed with 503 "process is
# overloaded". 10 ms shed >90% of requests at 8 clients on 2 cores; default to the traffic timeout.
MAX_LATENCY_MS = int(os.environ.get("CRONNX_PEER_MAX_LATENCY_MS", "30000"))
ACCESS_LOG = os.environ.get("CRONNX_PEER_ACCESS_LOG", "0") == "1"
TOP_K = int(os.environ.get("CRONNX_PEER_TOP_K", "5"))


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class _OneOrMany(IORootModel[list[dict[str, Any]]]):
    """Output spec: a request of one image gets the object itself, not a list of one."""

    @classmethod
    async def to_http_response(cls, obj: Any, serde: Any) -> Response:
        if isinstance(obj, list) and len(obj) == 1:
            obj = obj[0]
        status = obj.get("status", 400) if isinstance(obj, dict) and "error" in obj else 200
        if status != 200:
            obj = {"error": obj["error"]}
        return Response(json.dumps(obj).encode(), status_code=status, media_type="application/json")


@bentoml.service(
    name="cronnx_peer",
    workers=WORKERS,
    threads=1,
    traffic={"timeout": 30},
    logging={"access": {"enabled": ACCESS_LOG}},
)
class Classifier:
    def __init__(self) -> None:
        self.session, spec, self.pre = open_model(str(MODEL))
        if spec.fixed_batch is not None and MAX_BATCH > spec.fixed_batch:
            raise RuntimeError(f"the model takes batches of exactly {spec.fixed_batch}; max batch must be <= that")
        self.spec = spec
        self.item_shape = spec.input_item_shape
        self.dtype = np.dtype(spec.input_dtype)

    def _decode(self, b64: Any, out: np.ndarray) -> dict[str, Any] | None:
        """Preprocess one image into `out`; an error object if it cannot."""
        try:
            data = base64.b64decode(b64, validate=True)
        except (TypeError, binascii.Error, ValueError):
            return {"error": "image is not valid base64", "status": 400}
        try:
            self.pre(data, out)
        except ImageTooLarge as exc:
            return {"error": str(exc), "status": 413}
        except ImageError as exc:
            return {"error": str(exc), "status": 400}
        return None

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH, max_latency_ms=MAX_LATENCY_MS,
                 output_spec=_OneOrMany)
    def predict(self, image: Annotated[list[str], BeforeValidator(_as_list)]) -> list[dict[str, Any]]:
        n = len(image)
        size = max(self.spec.fixed_batch or n, n)
        x = np.zeros((size, *self.item_shape), self.dtype)
        errors = [self._decode(b64, x[i]) for i, b64 in enumerate(image)]
        (y,) = self.session.run([self.spec.output_name], {self.spec.input_name: x})
        results: list[dict[str, Any]] = []
        for i in range(n):
            if errors[i] is not None:
                results.append(errors[i])
                continue
            preds = [{"class_id": c, "label": f"class_{c}", "confidence": p}
                     for c, p in top_k(y[i], TOP_K, self.spec.outputs_probabilities)]
            results.append({"model": MODEL_NAME, "predictions": preds, "batch_size": n})
        return results
