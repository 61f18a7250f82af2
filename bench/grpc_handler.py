"""What Cronnx's own code costs per gRPC ModelInfer of one row (no server, no gRPC machinery):
parsing the message, its size check, the checks shared with V2 over HTTP, and the answer.

    python bench/grpc_handler.py [--rows 1] [--calls 2000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from tritonclient.grpc import service_pb2

from cronnx.engine.client import ModelView
from cronnx.grpc.infer import infer_request, infer_response, take_raw_contents
from cronnx.models.spec import ModelSpec
from cronnx.protocol.v2_infer import OutputTensor
from cronnx.protocol.v2_inputs import output_plans, queue_parameters, request_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    # The default config's model: mobilenetv2, FP32 [N, 3, 224, 224] in, 1,000 logits out.
    spec = ModelSpec("input", "NCHW", "float32", 224, 224, None, "logits", "float32", (1000,), 1000)
    view = ModelView("m", 1, 5, False, [str(i) for i in range(1000)], spec, max(4, args.rows))
    request = service_pb2.ModelInferRequest(model_name="m")
    request.inputs.add(name="input", datatype="FP32", shape=[args.rows, 3, 224, 224])
    request.raw_input_contents.append(np.zeros((args.rows, 3, 224, 224), np.float32).tobytes())
    wire = request.SerializeToString()
    parsed = service_pb2.ModelInferRequest.FromString(wire)
    outputs = [OutputTensor("logits", "FP32", [args.rows, 1000], False, tensor=np.zeros((args.rows, 1000), np.float32))]

    raw = list(parsed.raw_input_contents)

    def size() -> None:  # on a copy of the message, as each call takes the contents out of its own
        take_raw_contents(service_pb2.ModelInferRequest.FromString(wire))

    def checks() -> None:
        v2, binary = infer_request(parsed, raw)
        request_rows(v2, binary, view)
        queue_parameters(v2)
        output_plans(v2, view)

    for name, step in (("parse the message", lambda: service_pb2.ModelInferRequest.FromString(wire)),
                       ("parse the message and take its contents out, sized", size),
                       ("(protobuf's ByteSize, for comparison)", parsed.ByteSize), ("the checks", checks),
                       ("the answer, serialised", lambda: infer_response(parsed, "m", 1, outputs).SerializeToString())):
        started = time.perf_counter()
        for _ in range(args.calls):
            step()
        print(f"{name}: {(time.perf_counter() - started) / args.calls * 1e6:.1f} us")


if __name__ == "__main__":
    main()
