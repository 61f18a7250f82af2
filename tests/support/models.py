"""Small ONNX models built in the test session: fast to run, each with one property to test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _save(graph, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def tiny_classifier(path: Path, size: int = 32, classes: int = 10, slow_layers: int = 0, batch="batch") -> Path:
    """Flatten -> [MatMul+Tanh] * slow_layers -> MatMul: a classifier whose cost is set by slow_layers."""
    rng = np.random.default_rng(7)
    features = 3 * size * size
    nodes = [helper.make_node("Flatten", ["input"], ["h0"], axis=1)]
    inits = []
    width = features
    current = "h0"
    for i in range(slow_layers):
        w = rng.normal(0, 1 / np.sqrt(width), (width, 1024)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"h{i + 1}"]))
        current, width = f"h{i + 1}", 1024
    head = rng.normal(0, 3 / np.sqrt(width), (width, classes)).astype(np.float32)
    inits.append(numpy_helper.from_array(head, "head"))
    nodes.append(helper.make_node("MatMul", [current, "head"], ["logits"]))
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])], inits)
    return _save(graph, path)


def two_input_model(path: Path) -> Path:
    nodes = [helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Flatten", ["sum"], ["out"], axis=1)]
    shape = ["batch", 3, 8, 8]
    graph = helper.make_graph(
        nodes, "two_inputs",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, shape),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 192])])
    return _save(graph, path)


def vector_input_model(path: Path) -> Path:
    """A model whose input is a [N, 16] vector, not an image."""
    w = numpy_helper.from_array(np.ones((16, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "vector",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [w])
    return _save(graph, path)
