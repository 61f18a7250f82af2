"""A Ray Serve peer of Cronnx, for benchmarks: the same model, preprocessing and raw-bytes API.

Ray brings its own dependency set, so it runs from its own environment (bench/README.md):

    /tmp/rayvenv/bin/python bench/peers/rayserve_app.py --port 3200 [--model FILE] [--replicas 2] [--max-batch 4]

POST /predict with the image bytes answers {"model", "predictions": [{"class_id", "label",
"confidence"} x 5], "batch_size"}; GET /predict answers 200 once a replica has loaded the model.
Stop with SIGTERM/SIGINT (the Ray cluster this starts goes with it).

What is the same as Cronnx: `cronnx.preprocessing.transform.Preprocessor` (default
`PreprocessConfig`), `cronnx.models.postprocess.top_k`, one single-threaded onnxruntime session per
replica with spinning off (bench/peers/peer_model.py). What is Ray Serve's: a local Ray cluster
limited to the machine's cores, its HTTP proxy actor in front, `replicas` replica actors, and
`@serve.batch` (max_batch_size, batch_wait_timeout_s = 2 ms as Cronnx's window) in each replica.
Preprocessing runs in the batched method, in series with inference, as in the LitServe and BentoML
peers.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Ray starts replica processes from the raylet: they find cronnx and peer_model through PYTHONPATH.
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "bench" / "peers"),
                                            os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path[:0] = [str(ROOT), str(ROOT / "bench" / "peers")]

import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402

TOP_K = 5


def build(model: str, name: str, replicas: int, max_batch: int):
    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 0},
                      max_ongoing_requests=64)
    class Classifier:
        def __init__(self) -> None:
            from peer_model import open_model
            self.session, self.spec, self.pre = open_model(model)

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=0.002)
        async def run(self, images: list[bytes]) -> list[dict]:
            from cronnx.models.postprocess import top_k
            from cronnx.preprocessing.transform import ImageError
            n = len(images)
            x = np.zeros((max(self.spec.fixed_batch or n, n), *self.spec.input_item_shape), self.spec.input_dtype)
            errors = []
            for i, data in enumerate(images):
                try:
                    self.pre(data, x[i])
                    errors.append(None)
                except ImageError as exc:
                    errors.append(str(exc))
            (y,) = self.session.run([self.spec.output_name], {self.spec.input_name: x})
            return [{"error": errors[i]} if errors[i] else
                    {"model": name, "batch_size": n,
                     "predictions": [{"class_id": c, "label": f"class_{c}", "confidence": p}
                                     for c, p in top_k(y[i], TOP_K, self.spec.outputs_probabilities)]}
                    for i in range(n)]

        async def __call__(self, request: Request) -> JSONResponse:
            if request.method == "GET":  # readiness: answered by a replica, so one has loaded the model
                return JSONResponse({"status": "ready"})
            result = await self.run(await request.body())
            return JSONResponse(result, status_code=400 if "error" in result else 200)

    return Classifier.bind()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=3200)
    parser.add_argument("--model", default=str(ROOT / "models" / "mobilenetv2-demo.onnx"))
    parser.add_argument("--name", default="mobilenetv2")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=4)
    args = parser.parse_args()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port}, logging_config={"enable_access_log": False})
    serve.run(build(str(Path(args.model).resolve()), args.name, args.replicas, args.max_batch),
              route_prefix="/predict", blocking=False)
    print(f"Ray Serve peer on http://127.0.0.1:{args.port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    # Ending the cluster ends every actor; serve.shutdown() first only makes it slower.
    ray.shutdown()


if __name__ == "__main__":
    main()
