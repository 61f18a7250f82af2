"""KServe's Python SDK (its REST client, protocol v2) against a live server, for
tests/http/test_v2.py, in a process of its own: importing the SDK loads its gRPC modules, which
define the protobuf package `inference` that tritonclient's gRPC modules (tests/grpc) define too,
and one process can load only one of them ("duplicate symbol 'inference.ServerLiveRequest'").

    python kserve_v2_client.py URL BATCH.npy IMAGE...

prints JSON: `health` (server live, server ready, model "tiny" ready, model "nosuch" ready) and
`answers`, one per infer (the FP32 batch as JSON, then as binary, then the images as BYTES):
its id, model name and first output.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import kserve
import numpy as np


async def main(url: str, batch: np.ndarray, images: list[bytes]) -> dict:
    sdk = kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2", retries=0, timeout=30))
    try:
        health = [await sdk.is_server_live(url), await sdk.is_server_ready(url),
                  await sdk.is_model_ready(url, "tiny"), await sdk.is_model_ready(url, "nosuch")]
        answers = []
        for binary in (False, True):
            tensor = kserve.InferInput("input", list(batch.shape), "FP32")
            tensor.set_data_from_numpy(batch, binary_data=binary)
            answers.append(await sdk.infer(url, kserve.InferRequest("tiny", [tensor], request_id="k-1"),
                                           model_name="tiny"))
        tensor = kserve.InferInput("IMAGE", [len(images)], "BYTES")
        tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
        answers.append(await sdk.infer(url, kserve.InferRequest("tiny", [tensor]), model_name="tiny"))
    finally:
        await sdk.close()
    return {"health": health, "answers": [{"id": a.id, "model_name": a.model_name,
                                           "output": a.outputs[0].as_numpy().tolist()} for a in answers]}


if __name__ == "__main__":
    url, batch_path, *image_paths = sys.argv[1:]
    result = asyncio.run(main(url, np.load(batch_path), [Path(p).read_bytes() for p in image_paths]))
    print(json.dumps(result))
