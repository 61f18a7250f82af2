"""A test gRPC server (Triton's GRPCInferenceService) whose latency and failures are set exactly:
what `cronnx bench --protocol grpc` must report.

    python fake_grpc_server.py --delay-ms 5 --busy-every 2

ModelMetadata: model "m" takes one FP32 input [-1, 3, 8, 8]. ModelInfer answers after
--delay-ms; every --busy-every-th call is UNAVAILABLE with the trailing metadata
`grpc-retry-pushback-ms: 1000` (gRPC's Retry-After); each client address (connection) that
calls it is written to --peers, once, a line each. Prints "listening on PORT".
"""

from __future__ import annotations

import argparse
import asyncio

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc


class FakeService(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, delay_s: float, busy_every: int, peers: str | None):
        self.delay_s, self.busy_every, self.count = delay_s, busy_every, 0
        self.peers_path, self.peers = peers, set()

    async def ModelMetadata(self, request, context):
        if request.name != "m":
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.name!r}")
        response = service_pb2.ModelMetadataResponse(name="m", versions=["1"], platform="onnxruntime_onnx")
        response.inputs.add(name="input", datatype="FP32", shape=[-1, 3, 8, 8])
        response.outputs.add(name="logits", datatype="FP32", shape=[-1, 10])
        return response

    async def ModelInfer(self, request, context):
        self.count += 1
        if self.peers_path and context.peer() not in self.peers:
            self.peers.add(context.peer())
            with open(self.peers_path, "a") as f:
                f.write(context.peer() + "\n")
        await asyncio.sleep(self.delay_s)
        if self.busy_every and self.count % self.busy_every == 0:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "busy", (("grpc-retry-pushback-ms", "1000"),))
        response = service_pb2.ModelInferResponse(model_name="m", model_version="1", id=request.id)
        response.outputs.add(name="logits", datatype="FP32", shape=[1, 10])
        response.raw_output_contents.append(bytes(40))
        return response


async def main(args) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        FakeService(args.delay_ms / 1000.0, args.busy_every, args.peers), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on {port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--busy-every", type=int, default=0)
    parser.add_argument("--peers", default=None)
    asyncio.run(main(parser.parse_args()))
