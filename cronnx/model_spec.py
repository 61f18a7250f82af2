"""What the server needs to know about an ONNX model, read from the file and checked at load."""

from __future__ import annotations

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
    # The output is already a softmax: it must not get a second one.
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
    """Check that the session takes one image tensor and returns class scores."""
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

    out = outputs[0]
    if out.type not in OUTPUT_TYPES:
        raise ModelSpecError(f"output {out.name!r} is {out.type}; supported: {', '.join(OUTPUT_TYPES)}")
    out_shape = list(out.shape)
    item_shape = out_shape[1:]
    if not item_shape or not all(isinstance(d, int) and d > 0 for d in item_shape):
        raise ModelSpecError(f"output {out.name!r} has shape {out_shape}; expected [N, classes] with fixed classes")
    if any(d != 1 for d in item_shape[1:]):
        raise ModelSpecError(f"output {out.name!r} has shape {out_shape}; expected [N, C] or [N, C, 1, 1]")
    return ModelSpec(
        input_name=inp.name,
        layout=layout,
        input_dtype=INPUT_TYPES[inp.type],
        height=_spatial(height, size_hint, inp.name, "height"),
        width=_spatial(width, size_hint, inp.name, "width"),
        fixed_batch=fixed_batch,
        output_name=out.name,
        output_dtype=OUTPUT_TYPES[out.type],
        output_item_shape=tuple(item_shape),
        num_classes=item_shape[0],
        outputs_probabilities=softmax_output,
        opset=opset,
        description=session.get_modelmeta().description or "",
    )


def _spatial(dim, size_hint: int | None, name: str, what: str) -> int:
    if isinstance(dim, int) and dim > 0:
        return dim
    if size_hint is None:
        raise ModelSpecError(f"input {name!r} has a dynamic {what}; set preprocess.size in the config")
    return size_hint


def _graph_facts(path: str) -> tuple[bool, int]:
    """Whether the first output comes straight from a Softmax node, and the default-domain opset."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    output = model.graph.output[0].name
    producer = next((n for n in model.graph.node if output in n.output), None)
    return producer is not None and producer.op_type == "Softmax", opset


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
    softmax_output, opset = _graph_facts(path)
    return spec_from_session(session, size_hint, softmax_output, opset)
