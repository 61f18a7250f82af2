"""What the peer servers share: the model opened as a Cronnx worker opens it, for a fair comparison.

One onnxruntime session with one intra-op thread and no spinning, Cronnx's own preprocessing for
the model's input, and one warm-up run. The importing script puts the repository root on sys.path.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from cronnx.config import PreprocessConfig
from cronnx.models.spec import ModelSpec, inspect_model
from cronnx.preprocessing.transform import Preprocessor


def open_model(path: str) -> tuple[ort.InferenceSession, ModelSpec, Preprocessor]:
    spec = inspect_model(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    # Run once so the first request does not pay for onnxruntime's lazy initialisation.
    warm = np.zeros((spec.fixed_batch or 1, *spec.input_item_shape), spec.input_dtype)
    session.run([spec.output_name], {spec.input_name: warm})
    return session, spec, Preprocessor(PreprocessConfig(), spec)
