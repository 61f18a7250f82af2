"""The peer to beat on two cores: one aiohttp process, onnxruntime in run_in_executor, no batching.

Same model and the same preprocessing as Cronnx (cronnx.preprocessing.transform), one onnxruntime
session with one intra-op thread shared by a thread pool of one thread per core: each request is
decoded, preprocessed and run in a pool thread, the shape that measured best in-process.

    python bench/peers/plain_aiohttp.py --port 3100 [--model models/mobilenetv2-demo.onnx] [--threads 2] [--textbook]

--textbook swaps Cronnx's preprocessing for the one a tutorial would write (full-size decode,
resize the short side to 256, centre-crop 224, normalise in float32): what a user's own server
would most likely do, as opposed to the fair comparison of serving machinery without it.

POST /predict/{model} with raw image bytes or JSON {"image": base64}; answers top-5 like Cronnx.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from aiohttp import web
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from cronnx.models.postprocess import top_k  # noqa: E402
from peer_model import open_model  # noqa: E402


MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def textbook_preprocess(data: bytes, out: np.ndarray) -> None:
    """torchvision's Resize(256) + CenterCrop(224) + ToTensor + Normalize, in Pillow and numpy."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    scale = 256 / min(w, h)
    image = image.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
    left, top = (image.width - 224) // 2, (image.height - 224) // 2
    image = image.crop((left, top, left + 224, top + 224))
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    out[...] = ((pixels - MEAN) / STD).transpose(2, 0, 1)


def make_app(model: str, threads: int, textbook: bool = False) -> web.Application:
    session, spec, preprocess = open_model(model)
    if textbook:
        preprocess = textbook_preprocess
    executor = ThreadPoolExecutor(threads)

    def infer(image: bytes) -> list[dict]:
        batch = np.empty((1, *spec.input_item_shape), np.float32)
        preprocess(image, batch[0])
        scores = session.run(None, {spec.input_name: batch})[0][0]
        return [{"class_id": i, "confidence": p} for i, p in top_k(scores, 5)]

    async def predict(request: web.Request) -> web.Response:
        body = await request.read()
        if request.content_type == "application/json":
            body = base64.b64decode(json.loads(body)["image"])
        predictions = await asyncio.get_running_loop().run_in_executor(executor, infer, body)
        return web.json_response({"predictions": predictions, "batch_size": 1})

    app = web.Application(client_max_size=32 * 1024 * 1024)
    app.router.add_post("/predict/{model}", predict)
    app.router.add_get("/health", lambda request: web.json_response({"status": "alive"}))
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=3100)
    parser.add_argument("--model", default="models/mobilenetv2-demo.onnx")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--textbook", action="store_true", help="a tutorial's preprocessing instead of Cronnx's")
    args = parser.parse_args()
    web.run_app(make_app(args.model, args.threads, args.textbook), host="127.0.0.1", port=args.port, access_log=None,
                print=lambda *a: print(f"plain aiohttp peer on http://127.0.0.1:{args.port}", flush=True))
