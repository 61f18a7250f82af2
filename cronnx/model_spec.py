"""What the server needs to know about an ONNX model, read from the file and checked at load."""

from __future__ import annotations

import msgspec


class ModelSpecError(Exception):
    """The model cannot be served; the message says why."""


class ModelSpec(msgspec.Struct, frozen=True):
    input_name: str
    # Channels, height, width of one item (NCHW).
    input_chw: tuple[int, int, int]
    # None when the batch dimension is dynamic; otherwise every run uses exactly this many items.
    fixed_batch: int | None
    output_name: str
    # Shape of one item's output, e.g. (1000,) or (1000, 1, 1).
    output_item_shape: tuple[int, ...]
    num_classes: int
    description: str = ""


_FLOAT = "tensor(float)"


def spec_from_session(session, size_hint: int | None = None) -> ModelSpec:
    """Check that the session takes one NCHW float image tensor and returns class scores."""
    inputs = session.get_inputs()
    outputs = session.get_outputs()
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise ModelSpecError(f"model has {len(inputs)} inputs ({names}); an image model takes exactly one")
    inp = inputs[0]
    if inp.type != _FLOAT:
        raise ModelSpecError(f"input {inp.name!r} is {inp.type}; supported: {_FLOAT}")
    shape = list(inp.shape)
    if len(shape) != 4:
        raise ModelSpecError(f"input {inp.name!r} has shape {shape}; an image input is [N, 3, H, W]")
    batch, channels, height, width = shape
    if channels != 3:
        raise ModelSpecError(f"input {inp.name!r} has shape {shape}; expected 3 channels in dimension 1 (NCHW)")
    height = _spatial(height, size_hint, inp.name, "height")
    width = _spatial(width, size_hint, inp.name, "width")
    fixed_batch = batch if isinstance(batch, int) and batch > 0 else None

    out = outputs[0]
    if out.type != _FLOAT:
        raise ModelSpecError(f"output {out.name!r} is {out.type}; supported: {_FLOAT}")
    out_shape = list(out.shape)
    item_shape = out_shape[1:]
    if not item_shape or not all(isinstance(d, int) and d > 0 for d in item_shape):
        raise ModelSpecError(f"output {out.name!r} has shape {out_shape}; expected [N, classes] with fixed classes")
    num_classes = item_shape[0]
    if any(d != 1 for d in item_shape[1:]):
        raise ModelSpecError(f"output {out.name!r} has shape {out_shape}; expected [N, C] or [N, C, 1, 1]")
    description = session.get_modelmeta().description or ""
    return ModelSpec(
        input_name=inp.name,
        input_chw=(3, height, width),
        fixed_batch=fixed_batch,
        output_name=out.name,
        output_item_shape=tuple(item_shape),
        num_classes=num_classes,
        description=description,
    )


def _spatial(dim, size_hint: int | None, name: str, what: str) -> int:
    if isinstance(dim, int) and dim > 0:
        return dim
    if size_hint is None:
        raise ModelSpecError(f"input {name!r} has a dynamic {what}; set preprocess.size in the config")
    return size_hint


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
    return spec_from_session(session, size_hint)
