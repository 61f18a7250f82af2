"""Direct onnxruntime runs: what the server's answers are compared with."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from cronnx.config import PreprocessConfig
from cronnx.preprocess import Preprocessor


class DirectModel:
    def __init__(self, path, size: int = 224, preprocess: PreprocessConfig = PreprocessConfig()):
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.preprocess = Preprocessor(preprocess, size, size)
        self.size = size

    def tensor(self, image: bytes) -> np.ndarray:
        out = np.empty((3, self.size, self.size), np.float32)
        self.preprocess(image, out)
        return out

    def probabilities(self, image: bytes) -> np.ndarray:
        logits = self.session.run(None, {self.input_name: self.tensor(image)[None]})[0][0].astype(np.float64)
        exp = np.exp(logits - logits.max())
        return exp / exp.sum()


def assert_matches(reply_body: dict, probs: np.ndarray, top_k: int = 5, tolerance: float = 1e-5) -> None:
    predictions = reply_body["predictions"]
    expected = np.argsort(-probs, kind="stable")[:top_k]
    assert len(predictions) == top_k
    served_ids = [p["class_id"] for p in predictions]
    assert served_ids == [int(i) for i in expected], (served_ids, expected)
    for p in predictions:
        assert abs(p["confidence"] - probs[p["class_id"]]) <= tolerance
