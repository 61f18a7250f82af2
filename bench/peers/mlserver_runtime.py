"""The MLServer peer's model runtime: the same model, preprocessing and top-k as Cronnx.

Loaded by MLServer from the settings that bench/peers/mlserver_peer.py writes. One request is
one image: a V2 inference request with one BYTES input "image" of shape [1] holding the image
as base64. MLServer's adaptive batching concatenates waiting requests along the first axis, so
`predict` gets n images and answers two outputs of shape [n, 5]: "class_id" (INT64) and
"confidence" (FP32), which MLServer splits back per request.
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import MLServerError
from mlserver.types import InferenceRequest, InferenceResponse

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench" / "peers")]

TOP_K = 5


class OnnxClassifier(MLModel):
    async def load(self) -> bool:
        from peer_model import open_model

        self.session, self.spec, self.pre = open_model(self.settings.parameters.uri)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        from cronnx.models.postprocess import top_k
        from cronnx.preprocessing.transform import ImageError

        images = payload.inputs[0].data.root
        n = len(images)
        x = np.zeros((max(self.spec.fixed_batch or n, n), *self.spec.input_item_shape), self.spec.input_dtype)
        for i, encoded in enumerate(images):
            try:
                self.pre(base64.b64decode(encoded), x[i])
            except (ImageError, ValueError) as exc:
                raise MLServerError(f"image {i}: {exc}", status_code=400) from None
        (y,) = self.session.run([self.spec.output_name], {self.spec.input_name: x})
        best = [top_k(y[i], TOP_K, self.spec.outputs_probabilities) for i in range(n)]
        class_ids = np.array([[c for c, _ in row] for row in best], np.int64)
        confidences = np.array([[p for _, p in row] for row in best], np.float32)
        return InferenceResponse(model_name=self.name, outputs=[
            NumpyCodec.encode_output("class_id", class_ids), NumpyCodec.encode_output("confidence", confidences)])
