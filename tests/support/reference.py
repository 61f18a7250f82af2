"""Direct onnxruntime runs: what the server's answers are compared with."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from cronnx.config import PreprocessConfig
from cronnx.models.spec import inspect_model
from cronnx.preprocessing.transform import Preprocessor


class DirectModel:
    """The model run by onnxruntime in this process on the tensor Cronnx's preprocessing makes."""

    def __init__(self, path, preprocess: PreprocessConfig = PreprocessConfig(), probabilities: bool = False):
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.spec = inspect_model(str(path), preprocess.size)
        self.preprocess = Preprocessor(preprocess, self.spec)
        self.probabilities_output = probabilities

    def tensor(self, image: bytes) -> np.ndarray:
        out = np.empty(self.spec.input_item_shape, self.spec.input_dtype)
        self.preprocess(image, out)
        return out

    def probabilities(self, image: bytes) -> np.ndarray:
        batch = np.repeat(self.tensor(image)[None], self.spec.fixed_batch or 1, axis=0)
        scores = self.session.run(None, {self.spec.input_name: batch})[0][0].reshape(-1).astype(np.float64)
        if self.probabilities_output:
            return scores
        exp = np.exp(scores - scores.max())
        return exp / exp.sum()


def assert_matches(reply_body: dict, probs: np.ndarray, top_k: int = 5, tolerance: float = 1e-5) -> None:
    predictions = reply_body["predictions"]
    expected = np.argsort(-probs, kind="stable")[:top_k]
    assert len(predictions) == top_k
    served_ids = [p["class_id"] for p in predictions]
    assert served_ids == [int(i) for i in expected], (served_ids, expected)
    for p in predictions:
        assert abs(p["confidence"] - probs[p["class_id"]]) <= tolerance
