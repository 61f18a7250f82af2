"""`cronnx models inspect`: what a model file takes and gives, and a config entry to serve it."""

from __future__ import annotations

import re
from pathlib import Path

from cronnx.config import DEFAULT_BATCH_SIZE, IMAGENET_MEAN, IMAGENET_STD
from cronnx.models.spec import ModelSpec


def describe(path: str, spec: ModelSpec, dynamic_size: bool) -> str:
    batch = "dynamic" if spec.fixed_batch is None else f"fixed at {spec.fixed_batch}"
    # Probabilities: a Softmax over the classes, perhaps followed by nodes that keep it one (Cast, Reshape, ...).
    scores = ("probabilities (a Softmax over the classes: no second softmax)" if spec.outputs_probabilities
              else "logits (softmax applied)")
    lines = [
        f"model: {path}",
        f"opset {spec.opset}" + (f"; {spec.description}" if spec.description else ""),
        f"input:  {spec.input_name} {spec.input_dtype} {spec.layout} "
        f"[{spec.fixed_batch or 'batch'}, {', '.join(map(str, spec.input_item_shape))}], batch dimension {batch}",
        f"output: {spec.output_name} {spec.output_dtype} "
        f"[{spec.fixed_batch or 'batch'}, {', '.join(map(str, spec.output_item_shape))}], {scores}",
        "",
        "config entry (preprocessing: the usual ImageNet normalisation is assumed; check the model's docs):",
        *config_entry(path, spec, dynamic_size),
    ]
    return "\n".join(lines)


def config_entry(path: str, spec: ModelSpec, dynamic_size: bool) -> list[str]:
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(path).stem)[:64] or "model"
    entry = [f"  - name: {name}", f"    path: {path}", f"    batch_size: {spec.fixed_batch or DEFAULT_BATCH_SIZE}",
             "    preprocess:", "      resize: crop"]
    if dynamic_size:
        entry.append(f"      size: {spec.height}  # the model's height and width are dynamic: pick the size")
    if spec.input_dtype == "uint8":
        entry.append("      # uint8 input: the model gets the raw 0-255 pixels, no normalisation")
    else:
        entry += [f"      mean: {IMAGENET_MEAN}", f"      std: {IMAGENET_STD}", "      channel_order: RGB"]
    return entry
