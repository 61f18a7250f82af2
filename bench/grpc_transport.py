"""The transports alone, without Cronnx: what a server's CPU per request is when it answers the
V2 infer of one 224x224 FP32 row (602 kB) with a 4 kB tensor and does nothing else, over aiohttp
(the binary tensor data extension, as Cronnx's HTTP side reads it), over grpcio's asyncio server
with Triton's generated messages (as Cronnx's gRPC side gets them: the request parsed, its raw
contents copied out, the answer a ModelInferResponse), and over grpcio with bytes in and bytes
out (no protobuf at all). Each server runs on uvloop, as `cronnx serve` does.

    python bench/grpc_transport.py [--seconds 3] [--rounds 5] [--tuned NAME=VALUE ...]

`--tuned` adds a fourth server: grpcio with Triton's messages and the given channel arguments
(`grpc.http2.max_frame_size=1048576`, say), to compare grpcio's settings with its defaults.

The servers stay up together, each in a process of its own; `cronnx bench`'s load (the same
bodies as `--protocol v2|grpc`) alternates between them in rotating order, 32 clients then 1
client; the server's CPU (all its threads) and minor page faults are read from /proc around each
window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

KINDS = ("aiohttp", "grpc messages", "grpc bytes")
LOADS = (32, 1)
ANSWER = bytes(4000)  # 1,000 FP32 logits


async def _serve(kind: str, options: list[tuple[str, int]]) -> None:
    if kind == "aiohttp":
        from aiohttp import web

        async def infer(request: web.Request) -> web.Response:
            body = await request.read()
            length = int(request.headers["Inference-Header-Content-Length"])
            json.loads(body[:length])
            binary = body[length:]  # noqa: F841 - the copy Cronnx's HTTP side makes
            header = json.dumps({"model_name": "m", "outputs": [{"name": "o", "datatype": "FP32", "shape": [1, 1000],
                                 "parameters": {"binary_data_size": len(ANSWER)}}]}).encode()
            return web.Response(body=header + ANSWER, headers={"Inference-Header-Content-Length": str(len(header))})

        app = web.Application(client_max_size=20 << 20)
        app.router.add_post("/v2/models/m/infer", infer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
    else:
        import grpc
        from tritonclient.grpc import service_pb2

        messages = kind != "grpc bytes"

        async def infer(request, context):
            if not messages:
                return ANSWER
            bytes(request.raw_input_contents[0])  # the copy Cronnx's gRPC side makes
            response = service_pb2.ModelInferResponse(model_name="m", model_version="1")
            response.outputs.add(name="o", datatype="FP32", shape=[1, 1000])
            response.raw_output_contents.append(ANSWER)
            return response

        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 21 << 20),
                                          *(options if kind == "grpc tuned" else ())])
        handler = grpc.unary_unary_rpc_method_handler(
            infer, request_deserializer=service_pb2.ModelInferRequest.FromString if messages else None,
            response_serializer=service_pb2.ModelInferResponse.SerializeToString if messages else None)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService", {"ModelInfer": handler}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
    print(port, flush=True)
    await asyncio.Event().wait()


def _cpu_s(pid: int) -> tuple[float, int]:
    """The process's CPU time (s, all its threads) and its minor page faults."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[7])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tuned", action="append", default=[], metavar="NAME=VALUE",
                        help="a channel argument of the 'grpc tuned' server (integer values; repeatable)")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # a server process of this script
    args = parser.parse_args()
    options = [(name, int(value)) for name, value in (item.split("=", 1) for item in args.tuned)]
    if args.serve:
        import uvloop

        uvloop.run(_serve(args.serve, options))
        return
    kinds = KINDS + (("grpc tuned",) if options else ())
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import numpy as np

    from cronnx.loadgen import bench as loadgen
    from cronnx.loadgen import payloads
    from cronnx.loadgen.runner import LoadSpec

    row = np.random.default_rng(payloads.SEED).standard_normal((1, 3, 224, 224)).astype(np.float32)
    tensor = payloads.InputTensor("input", "FP32", [1, 3, 224, 224], row.tobytes())
    servers, specs = {}, {}
    results: dict[tuple[str, int], list[tuple[float, float, float, float, float]]] = {}
    try:
        for kind in kinds:
            servers[kind] = subprocess.Popen([sys.executable, __file__, "--serve", kind,
                                              *(f"--tuned={item}" for item in args.tuned)],
                                             stdout=subprocess.PIPE, text=True)
            port = int(servers[kind].stdout.readline())
            if kind == "aiohttp":
                body, headers = payloads.v2_body(tensor, None)
                specs[kind] = {"url": f"http://127.0.0.1:{port}/v2/models/m/infer", "bodies": [body],
                               "protocol": "v2", "headers": headers, "content_type": headers["Content-Type"]}
            else:
                specs[kind] = {"url": f"127.0.0.1:{port}", "bodies": [payloads.grpc_request(tensor, "m", None)],
                               "protocol": "grpc", "content_type": ""}
        for number in range(args.rounds):
            order = kinds[number % len(kinds):] + kinds[:number % len(kinds)]
            for load in LOADS:
                for kind in order:
                    spec = LoadSpec(**specs[kind], concurrency=load, duration_s=args.seconds, warmup_s=args.warmup)
                    before = _cpu_s(servers[kind].pid)
                    # No /metrics to read: port 9 (discard) answers nothing.
                    r = loadgen.run(spec, 1, "m", http_url="http://127.0.0.1:9")
                    answered = r.ok * (args.seconds + args.warmup) / args.seconds
                    after = _cpu_s(servers[kind].pid)
                    results.setdefault((kind, load), []).append((
                        r.requests_per_s, r.latency_ms["p50"], (after[0] - before[0]) / answered * 1e3,
                        (after[1] - before[1]) / answered, r.client_cpu_per_process[0] / r.requests_per_s * 1e3))
            print(f"round {number + 1} done", flush=True)
    finally:
        for server in servers.values():  # this script's servers only, by their pids
            server.kill()
            server.wait()
    print("\n| server | clients | req/s | p50 ms | server CPU per request (ms) | server page faults per request "
          "| client CPU per request (ms) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for load in LOADS:
        for kind in kinds:
            rate, p50, server_ms, faults, client_ms = (statistics.median(x) for x in zip(*results[(kind, load)]))
            print(f"| {kind} | {load} | {rate:.0f} | {p50:.2f} | {server_ms:.3f} | {faults:.0f} | {client_ms:.3f} |")


if __name__ == "__main__":
    main()
