"""What the server needs to know about an ONNX model, read from the file and checked at load."""

from __future__ import annotations

import math
from typing import Literal

import msgspec


class ModelSpecError(Exception):
    """The model cannot be served; the message says why."""


# onnxruntime's type names -> numpy dtype names, for the types an image input or a score output may have.
INPUT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(uint8)": "uint8"}
OUTPUT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}


class ModelSpec(msgspec.Struct, frozen=True):
    input_name: str
    layout: Literal["NCHW", "NHWC"]
    input_dtype: str
    height: int
    width: int
    # None when the batch dimension is dynamic; otherwise every run uses exactly this many items.
    fixed_batch: int | None
    output_name: str
    output_dtype: str
    # Shape of one item's output, e.g. (1000,) or (1000, 1, 1).
    output_item_shape: tuple[int, ...]
    num_classes: int
    # The output already holds probabilities (a Softmax over the classes, possibly followed by
    # nodes that keep it one): it must not get a second softmax.
    outputs_probabilities: bool = False
    opset: int = 0
    description: str = ""

    @property
    def input_item_shape(self) -> tuple[int, int, int]:
        if self.layout == "NCHW":
            return (3, self.height, self.width)
        return (self.height, self.width, 3)


def spec_from_session(session, size_hint: int | None = None, softmax_output: bool = False,
                      opset: int = 0) -> ModelSpec:
    """Check that the session takes one image tensor and returns class scores.

    The output's shape is the one onnxruntime computes on a probe input, not the graph's
    declaration: exporters leave declarations that differ ([N, 10] declared where [N, 10, 1, 1]
    is computed, or symbolic class dimensions), and the workers bind the computed shape."""
    inputs = session.get_inputs()
    outputs = session.get_outputs()
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise ModelSpecError(f"model has {len(inputs)} inputs ({names}); an image model takes exactly one")
    inp = inputs[0]
    if inp.type not in INPUT_TYPES:
        raise ModelSpecError(f"input {inp.name!r} is {inp.type}; supported: {', '.join(INPUT_TYPES)}")
    shape = list(inp.shape)
    if len(shape) != 4:
        raise ModelSpecError(f"input {inp.name!r} has shape {shape}; an image input is [N, 3, H, W] or [N, H, W, 3]")
    if shape[1] == 3:
        layout, (height, width) = "NCHW", shape[2:]
    elif shape[3] == 3:
        layout, (height, width) = "NHWC", shape[1:3]
    else:
        raise ModelSpecError(f"input {inp.name!r} has shape {shape}; an image input has 3 channels "
                             "in dimension 1 (NCHW) or 3 (NHWC)")
    batch = shape[0]
    fixed_batch = batch if isinstance(batch, int) and batch > 0 else None

    height = _spatial(height, size_hint, inp.name, "height")
    width = _spatial(width, size_hint, inp.name, "width")
    out = outputs[0]
    if out.type not in OUTPUT_TYPES:
        raise ModelSpecError(f"output {out.name!r} is {out.type}; supported: {', '.join(OUTPUT_TYPES)}")
    item = (3, height, width) if layout == "NCHW" else (height, width, 3)
    computed = _computed_output_shape(session, inp.name, (fixed_batch or 1, *item), INPUT_TYPES[inp.type])
    out_shape = computed or list(out.shape)
    item_shape = out_shape[1:]
    if not item_shape or not all(isinstance(d, int) and d > 0 for d in item_shape):
        raise ModelSpecError(f"output {out.name!r} has shape {out_shape}; expected [N, classes] with fixed classes")
    if any(d != 1 for d in item_shape[1:]):
        raise ModelSpecError(f"output {out.name!r} has shape {out_shape}; expected [N, C] or [N, C, 1, 1]")
    return ModelSpec(
        input_name=inp.name,
        layout=layout,
        input_dtype=INPUT_TYPES[inp.type],
        height=height,
        width=width,
        fixed_batch=fixed_batch,
        output_name=out.name,
        output_dtype=OUTPUT_TYPES[out.type],
        output_item_shape=tuple(item_shape),
        num_classes=item_shape[0],
        outputs_probabilities=softmax_output,
        opset=opset,
        description=session.get_modelmeta().description or "",
    )


def _computed_output_shape(session, input_name: str, shape: tuple[int, ...], dtype: str) -> list[int] | None:
    """The first output's shape for one zero input of `shape`; None when the probe fails (the
    declared shape is checked instead, and a worker that cannot run reports onnxruntime's error)."""
    import numpy as np

    try:
        return list(session.run(None, {input_name: np.zeros(shape, dtype)})[0].shape)
    except Exception:  # onnxruntime raises several private exception types
        return None


def _spatial(dim, size_hint: int | None, name: str, what: str) -> int:
    if isinstance(dim, int) and dim > 0:
        return dim
    if size_hint is None:
        raise ModelSpecError(f"input {name!r} has a dynamic {what}; set preprocess.size in the config")
    return size_hint


# Nodes that leave class probabilities probabilities: they change the dtype (between float types),
# shape or nothing, never the values or their order within an item. Exporters and fp16 converters
# leave them after a model's Softmax. (Transpose qualifies only when it moves size-1 axes alone,
# and Dropout only in inference: both checked in `_passes_through`.)
PASS_THROUGH = {"Identity", "Cast", "CastLike", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Dropout"}
FLOAT_TYPES = {1, 10, 11, 16}  # onnx TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


def _graph_facts(path: str, num_classes: int) -> tuple[bool, int]:
    """Whether the first output holds each item's class probabilities, and the default-domain opset.

    Probabilities: the output is a Softmax over the classes, possibly followed by nodes that keep
    it one (PASS_THROUGH). Anything else (a Mul, a Log, an Add, ...) or anything this cannot be
    sure of is logits: a second softmax over probabilities flattens them, whereas softmax over
    logits is what they are for (and `outputs: probabilities` overrides it).
    """
    import onnx

    model = onnx.load(path, load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    chain = _chain_from_softmax(model.graph)
    if chain is None:
        return False, opset
    try:
        # Shapes of the tensors on the way: which axis the Softmax runs over, which axes a
        # Transpose moves. Only models that end in a Softmax pay for it. A model that shape
        # inference cannot follow keeps the shapes its file declares; unknown ones mean logits.
        graph = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # noqa: BLE001 - onnx raises several types; the model still loads in onnxruntime
        graph = model.graph
    values = [*graph.input, *graph.value_info, *graph.output]
    shapes = {v.name: _dims(v) for v in values}
    types = {v.name: v.type.tensor_type.elem_type for v in values if v.type.WhichOneof("value") == "tensor_type"}
    types.update((t.name, t.data_type) for t in graph.initializer)
    constants = {t.name: t for t in graph.initializer}
    softmax, *after = chain
    probabilities = (_over_classes(softmax, _shape_of(softmax, shapes), opset, num_classes)
                     and all(_passes_through(node, shapes, types, constants) for node in after))
    return probabilities, opset


def _chain_from_softmax(graph) -> list | None:
    """The nodes from a Softmax to the first output, when only PASS_THROUGH kinds lie between
    (each still to be checked); None when the output does not come from a Softmax that way."""
    producers = {name: node for node in graph.node for name in node.output if name}
    after: list = []
    name = graph.output[0].name
    # Each node's data is its first input and output (Dropout's second output is its mask).
    while (node := producers.get(name)) is not None and node.output[0] == name and node.domain in ("", "ai.onnx"):
        if node.op_type == "Softmax":
            return [node, *reversed(after)]
        if node.op_type == "Exp":  # Exp(LogSoftmax(x)) is Softmax(x), as some exporters write it
            source = producers.get(node.input[0])
            if source is not None and source.op_type == "LogSoftmax" and source.domain in ("", "ai.onnx"):
                return [source, *reversed(after)]
            return None
        if node.op_type not in PASS_THROUGH:
            return None
        after.append(node)
        name = node.input[0]
    return None


def _dims(value) -> list[int | None] | None:
    """A tensor's dimensions (None for a symbolic or unknown one), or None for an unknown rank."""
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type" or not value.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]


def _attr(node, name: str, default):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _shape_of(softmax, shapes) -> list[int | None] | None:
    """A (Log)Softmax's input shape; its output has the same one, which the file may declare instead."""
    for name in (softmax.input[0], softmax.output[0]):
        if shapes.get(name) is not None:
            return shapes[name]
    return None


def _passes_through(node, shapes, types, constants) -> bool:
    """Whether `node` gives its first input's values back unchanged, in the same order."""
    from onnx import numpy_helper

    op = node.op_type
    if op not in PASS_THROUGH:
        return False
    if op == "Cast":  # to a float type and back keeps probabilities; to an integer type does not
        return _attr(node, "to", 0) in FLOAT_TYPES
    if op == "CastLike":  # the type of its second input, when the file says it
        return types.get(node.input[1]) in FLOAT_TYPES
    if op == "Transpose":
        # Memory order is kept when only size-1 axes move; an axis of unknown size may be any size.
        dims = shapes.get(node.input[0])
        if dims is None:
            return False
        perm = _attr(node, "perm", list(reversed(range(len(dims)))))
        kept = [axis for axis in perm if dims[axis] != 1]
        return kept == sorted(kept)
    if op == "Dropout":
        # Identity unless training_mode (opset 12+) is set; a value not fixed in the file may be true.
        if len(node.input) < 3 or not node.input[2]:
            return True
        flag = constants.get(node.input[2])
        return flag is not None and not bool(numpy_helper.to_array(flag).any())
    return True  # Identity, Reshape, Flatten, Squeeze, Unsqueeze: same values, same order


def _over_classes(node, dims: list[int | None] | None, opset: int, num_classes: int) -> bool:
    """Whether this Softmax (or LogSoftmax) normalises each item's classes, and only them.

    The nodes after it keep the order of the values, and the output holds each item's classes as
    one run of `num_classes` values: so each group the Softmax normalises must be exactly such a
    run (a group over the batch axis, or over part of the classes, has another size). From opset
    13 it normalises along one axis (default -1), a contiguous run only when every axis after it
    has size 1; before, over all axes from `axis` (default 1) on, flattened. A size it cannot
    know (a symbolic dimension) means no.
    """
    if dims is None or not dims:
        return False
    rank = len(dims)
    axis = _attr(node, "axis", -1 if opset >= 13 else 1)
    axis = axis + rank if axis < 0 else axis
    if not 0 <= axis < rank:
        return False
    group = dims[axis:] if opset < 13 else dims[axis:axis + 1]
    trailing = [] if opset < 13 else dims[axis + 1:]
    if any(d is None for d in group + trailing) or any(d != 1 for d in trailing):
        return False
    return math.prod(group) == num_classes


def inspect_model(path: str, size_hint: int | None = None) -> ModelSpec:
    """Open the model with onnxruntime (the same loader the workers use) and read its spec."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3  # warnings about the graph are not the user's problem here
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several private exception types
        raise ModelSpecError(f"cannot load {path}: {exc}") from None
    spec = spec_from_session(session, size_hint)
    probabilities, opset = _graph_facts(path, spec.num_classes)
    return msgspec.structs.replace(spec, outputs_probabilities=probabilities, opset=opset)
