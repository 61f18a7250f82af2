"""Small ONNX models built in the test session: fast to run, each with one property to test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Ten class names, some outside ASCII: what the labels-file tests write in every encoding.
LABEL_NAMES = ["tench", "goldfish", "great white shark", "Bügeleisen", "東京", "tiger shark", "hammerhead",
               "electric ray", "stingray", "cock"]


def _save(graph, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def tiny_classifier(path: Path, size: int = 32, classes: int = 10, slow_layers: int = 0, hidden: int = 1024,
                    batch="batch") -> Path:
    """Flatten -> project -> [MatMul+Tanh] * slow_layers -> MatMul: a classifier whose cost is
    set by slow_layers (the hidden layers share one weight, so the file stays small)."""
    rng = np.random.default_rng(7)
    features = 3 * size * size
    project = rng.normal(0, 1 / np.sqrt(features), (features, hidden)).astype(np.float32)
    square = rng.normal(0, 1 / np.sqrt(hidden), (hidden, hidden)).astype(np.float32)
    head = rng.normal(0, 3 / np.sqrt(hidden), (hidden, classes)).astype(np.float32)
    weights = [(project, "project"), (head, "head")] + ([(square, "square")] if slow_layers else [])
    inits = [numpy_helper.from_array(a, n) for a, n in weights]
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "project"], ["m0"]),
             helper.make_node("Tanh", ["m0"], ["h0"])]
    for i in range(slow_layers):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "square"], [f"m{i + 1}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i + 1}"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("MatMul", [f"h{slow_layers}", "head"], ["logits"]))
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


def image_classifier(path: Path, size: int = 32, layout: str = "NCHW", dtype: str = "float32", batch="batch",
                     classes: int = 10, output: str = "flat", softmax: bool = False, seed: int = 11) -> Path:
    """A small classifier with the given input layout and dtype, batch dimension and output form.

    uint8 and float16 inputs are cast to float inside the graph; a float16 model also answers
    in float16. `output="4d"` gives [N, C, 1, 1]; `softmax=True` ends with a Softmax node.
    """
    elem = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "uint8": TensorProto.UINT8}[dtype]
    rng = np.random.default_rng(seed)
    shape = [batch, 3, size, size] if layout == "NCHW" else [batch, size, size, 3]
    # Pixels of a uint8 input are 0..255: scale the weights so that logits stay moderate.
    spread = 3 / np.sqrt(3 * size * size) / (255 if dtype == "uint8" else 1)
    weight = rng.normal(0, spread, (3 * size * size, classes)).astype(np.float32)
    nodes, current = [], "input"
    if dtype != "float32":
        nodes.append(helper.make_node("Cast", [current], ["as_float"], to=TensorProto.FLOAT))
        current = "as_float"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", [current], ["nchw"], perm=[0, 3, 1, 2]))
        current = "nchw"
    nodes.append(helper.make_node("Flatten", [current], ["flat"], axis=1))
    nodes.append(helper.make_node("MatMul", ["flat", "w"], ["logits"]))
    current = "logits"
    if softmax:
        nodes.append(helper.make_node("Softmax", [current], ["probs"], axis=1))
        current = "probs"
    if output == "4d":
        nodes.append(helper.make_node("Unsqueeze", [current, "axes"], ["scores4d"]))
        current = "scores4d"
    out_elem = TensorProto.FLOAT
    if dtype == "float16":
        nodes.append(helper.make_node("Cast", [current], ["scores16"], to=TensorProto.FLOAT16))
        current, out_elem = "scores16", TensorProto.FLOAT16
    if softmax and output == "flat" and dtype != "float16":
        final = current  # the output comes straight from the Softmax node
    else:
        nodes.append(helper.make_node("Identity", [current], ["scores"]))
        final = "scores"
    out_shape = [batch, classes] + ([1, 1] if output == "4d" else [])
    inits = [numpy_helper.from_array(weight, "w")]
    if output == "4d":
        inits.append(numpy_helper.from_array(np.array([2, 3], np.int64), "axes"))
    graph = helper.make_graph(nodes, "classifier", [helper.make_tensor_value_info("input", elem, shape)],
                              [helper.make_tensor_value_info(final, out_elem, out_shape)], inits)
    return _save(graph, path)


def failing_on_bright_images(path: Path, size: int = 32, classes: int = 10, threshold: float = 1.5) -> Path:
    """A classifier whose run fails (a Reshape to an impossible shape) when any image of the batch
    has a mean input above `threshold` (a white picture: about 2.4 after ImageNet normalisation),
    and that answers like an ordinary linear classifier otherwise. onnxruntime cannot see this
    coming: the bad shape is computed from the input's values."""
    rng = np.random.default_rng(5)
    weight = rng.normal(0, 3 / np.sqrt(3 * size * size), (3 * size * size, classes)).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "weight"),
             numpy_helper.from_array(np.array(threshold, np.float32), "threshold"),
             numpy_helper.from_array(np.array([3], np.int64), "three"),
             numpy_helper.from_array(np.zeros(3, np.float32), "zeros")]
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "weight"], ["scores"]),
             # 3 zeros reshaped to [3] normally, to [4] (impossible) when an image is too bright.
             helper.make_node("ReduceMean", ["input"], ["means"], axes=[1, 2, 3], keepdims=0),
             helper.make_node("ReduceMax", ["means"], ["brightest"], keepdims=0),
             helper.make_node("Greater", ["brightest", "threshold"], ["too_bright"]),
             helper.make_node("Cast", ["too_bright"], ["extra"], to=TensorProto.INT64),
             helper.make_node("Add", ["three", "extra"], ["shape"]),
             helper.make_node("Reshape", ["zeros", "shape"], ["reshaped"]),
             helper.make_node("ReduceSum", ["reshaped"], ["zero"], keepdims=0),
             helper.make_node("Add", ["scores", "zero"], ["logits"])]
    graph = helper.make_graph(
        nodes, "failing_on_bright",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])], inits)
    return _save(graph, path)


def channel_mean_model(path: Path, size: int = 8) -> Path:
    """[N, 3, size, size] -> [N, 3]: each channel's mean. A solid-colour image, preprocessed with
    identity normalisation, comes back as its own (R, G, B): an answer that names its input."""
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["means"], axis=1)]
    graph = helper.make_graph(
        nodes, "channel_mean",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("means", TensorProto.FLOAT, ["batch", 3])])
    return _save(graph, path)


def batch_one_only_model(path: Path) -> Path:
    """Declares a dynamic batch dimension but reshapes to [1, 10]: it runs a batch of 1 and
    fails on any larger one, as a carelessly exported model does."""
    w = numpy_helper.from_array(np.ones((3, 10), np.float32), "w")
    shape = numpy_helper.from_array(np.array([1, 10], np.int64), "shape")
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "w"], ["scores"]),
             helper.make_node("Reshape", ["scores", "shape"], ["logits"])]
    graph = helper.make_graph(
        nodes, "batch_one_only",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], [w, shape])
    return _save(graph, path)



def classifier_ending_in(path: Path, *steps: str, size: int = 16, classes: int = 10, opset: int = 13,
                         seed: int = 21) -> Path:
    """A linear classifier ([N, 3, size, size] float32 in) whose logits go through `steps` in order,
    as exporters and fp16 converters leave them; the last step's result is the output "scores".

    Steps: "Softmax" / "LogSoftmax" (the operator's default axis), "Softmax@1" (axis 1), "Exp",
    "Identity", "Cast16" / "Cast32" / "CastInt" (to float16, float, int64), "Dropout",
    "DropoutTraining" (training_mode fixed to true), "Unsqueeze" ([N, C] -> [N, C, 1, 1]), "Squeeze"
    (back), "Reshape4d" / "Reshape2d" (the same by Reshape), "Reshape2xHalf" ([N, C] -> [N, 2, C/2]),
    "Flatten" (to [N, everything]), "TransposeOnes" (swaps the two size-1 axes of [N, C, 1, 1]),
    "Mul2", "Log".
    """
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 3 / np.sqrt(3 * size * size), (3 * size * size, classes)).astype(np.float32)
    # Constant inputs of the steps, put in the graph when a step uses them (onnxruntime warns of unused ones).
    constants = {"shape4d": np.array([0, classes, 1, 1], np.int64), "shape2d": np.array([0, classes], np.int64),
                 "shape2xhalf": np.array([0, 2, classes // 2], np.int64), "two": np.array(2.0, np.float32),
                 "axes23": np.array([2, 3], np.int64), "ratio": np.array(0.5, np.float32),
                 "training": np.array(True)}
    inits = [numpy_helper.from_array(weight, "w")]
    # Squeeze, Unsqueeze and Dropout took attributes before opsets 13 and 12, inputs since.
    axes_input = opset >= 13
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "w"], ["logits"])]
    current, elem, shape = "logits", TensorProto.FLOAT, ["batch", classes]

    def add(op: str, *inputs: str, **attrs) -> None:
        nonlocal current
        name = f"t{len(nodes)}"
        nodes.append(helper.make_node(op, [current, *inputs], [name], **attrs))
        current = name
        for constant in inputs:
            if constant not in {t.name for t in inits}:
                inits.append(numpy_helper.from_array(constants[constant], constant))

    for step in steps:
        op, _, axis = step.partition("@")
        if op in ("Softmax", "LogSoftmax"):
            add(op, **({"axis": int(axis)} if axis else {}))
        elif op in ("Exp", "Identity", "Log"):
            add(op)
        elif op in ("Cast16", "Cast32", "CastInt"):
            elem = {"Cast16": TensorProto.FLOAT16, "Cast32": TensorProto.FLOAT, "CastInt": TensorProto.INT64}[op]
            add("Cast", to=elem)
        elif op == "Dropout":
            add("Dropout", "ratio") if opset >= 12 else add("Dropout", ratio=0.5)
        elif op == "DropoutTraining":
            add("Dropout", "ratio", "training")
        elif op == "Unsqueeze":
            add("Unsqueeze", "axes23") if axes_input else add("Unsqueeze", axes=[2, 3])
            shape = [*shape, 1, 1]
        elif op == "Squeeze":
            add("Squeeze", "axes23") if axes_input else add("Squeeze", axes=[2, 3])
            shape = ["batch", classes]
        elif op in ("Reshape4d", "Reshape2d", "Reshape2xHalf"):
            add("Reshape", {"Reshape4d": "shape4d", "Reshape2d": "shape2d", "Reshape2xHalf": "shape2xhalf"}[op])
            shape = {"Reshape4d": ["batch", classes, 1, 1], "Reshape2d": ["batch", classes],
                     "Reshape2xHalf": ["batch", 2, classes // 2]}[op]
        elif op == "Flatten":
            add("Flatten", axis=1)
            shape = ["batch", classes]
        elif op == "TransposeOnes":
            add("Transpose", perm=[0, 1, 3, 2])
        elif op == "Mul2":
            add("Mul", "two")
        else:
            raise ValueError(f"unknown step {step!r}")
    nodes[-1].output[0] = "scores"
    graph = helper.make_graph(
        nodes, "classifier_ending_in",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("scores", elem, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
