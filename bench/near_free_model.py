"""A near-free model for measuring a server's own CPU cost: global average pool + one dense layer.

Input [N, 3, 224, 224] float32 (what Cronnx's default preprocessing makes), output [N, 1000]
probabilities. Inference costs microseconds, so nearly all the CPU a server spends serving it goes
to decoding, preprocessing and the server's own work (what the CPU-efficiency target measures).

    python bench/near_free_model.py [--output models/nearfree.onnx]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PATH = REPO / "models" / "nearfree.onnx"
CLASSES = 1000


def build(seed: int = 0) -> onnx.ModelProto:
    """ReduceMean over H and W, MatMul 3 x 1000, bias, Softmax; fixed random weights."""
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.normal(0, 1, (3, CLASSES)).astype(np.float32), "weight")
    bias = numpy_helper.from_array(rng.normal(0, 0.1, CLASSES).astype(np.float32), "bias")
    axes = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")
    nodes = [
        helper.make_node("ReduceMean", ["input", "axes"], ["pooled"], keepdims=0),
        helper.make_node("MatMul", ["pooled", "weight"], ["logits_nobias"]),
        helper.make_node("Add", ["logits_nobias", "bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "nearfree",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", CLASSES])],
        initializer=[weight, bias, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_PATH)
    args = parser.parse_args()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(build(), args.output)
    print(args.output)


if __name__ == "__main__":
    main()
