"""Triton's `inference.GRPCInferenceService` (grpc_service.proto, whose generated modules
`tritonclient[grpc]` ships): the Open Inference Protocol's `ServerLive`, `ServerReady`,
`ModelReady`, `ServerMetadata`, `ModelMetadata` and `ModelInfer`, and Triton's `ModelConfig`,
`RepositoryIndex` and `ModelStatistics`. Every other method answers UNIMPLEMENTED, saying so.

`ModelInfer` runs as HTTP's V2 infer does (`protocol/`): the same version choice, checks, rows,
batching, metrics (`api="grpc"`), access log and spans. The other calls read the same bodies as
HTTP's routes (`protocol.metadata.MetadataSource`), as protobuf messages.

Per call: the request id is the `x-request-id` metadata (or a new one), returned in the trailing
metadata with a traced call's `traceparent`; the deadline is the client's gRPC deadline or the
request timeout, whichever comes first; a call the client cancels is cancelled here, freeing its
ring slots unrun (ring rule 5); an error's code comes from the one status table (`status.py`)
with the same message as over HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import grpc
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from cronnx.engine.client import UNKNOWN_MODEL, InferenceClient, Selection
from cronnx.errors import CronnxError, DeadlineExceeded, RequestTooLarge
from cronnx.grpc.infer import infer_request, infer_response, take_raw_contents
from cronnx.grpc.status import error_code, grpc_code
from cronnx.protocol.metadata import MetadataSource
from cronnx.protocol.record import RequestRecord, request_id_from, serve_model_request, trace_attributes
from cronnx.protocol.v2_infer import output_tensors, record_phases, run_rows
from cronnx.protocol.v2_inputs import output_plans, queue_parameters, request_rows

if TYPE_CHECKING:
    from cronnx.observability.tracing import RequestTrace, Tracing

log = logging.getLogger("cronnx.grpc")

SERVICE = "inference.GRPCInferenceService"
REQUEST_ID_KEY = "x-request-id"
# As HTTP's X-Cronnx-Key: calls with the same key get the same version of a split model.
ROUTING_KEY = "x-cronnx-key"
TRACEPARENT = "traceparent"
# gRPC's Retry-After (its retry design, A6): how long a client should wait before calling again.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


class GrpcLimits:
    """What bounds a call: the largest request message in bytes (`server.max_body_bytes`) and
    the request timeout in seconds (`server.request_timeout_s`)."""

    __slots__ = ("max_message_bytes", "request_timeout_s")

    def __init__(self, max_message_bytes: int, request_timeout_s: float):
        self.max_message_bytes, self.request_timeout_s = max_message_bytes, request_timeout_s


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The service over `client` (inference) and `metadata` (every other call), with `limits`;
    `tracing` None when the process does not trace."""

    def __init__(self, client: InferenceClient, metadata: MetadataSource, limits: GrpcLimits,
                 tracing: Tracing | None):
        self._client, self._metadata, self._limits, self._tracing = client, metadata, limits, tracing

    # Health and metadata.

    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=await self._answer(context, self._metadata.server_ready()))

    async def ModelReady(self, request, context):
        """Ready when the version has a live worker; an unknown model or version is not ready (as
        Triton answers), where HTTP's route says 404."""
        try:
            ready = await self._metadata.model_ready(request.name, request.version or None)
        except CronnxError:
            ready = False
        return service_pb2.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request, context):
        body = await self._answer(context, self._metadata.server_metadata())
        return json_format.ParseDict(body, service_pb2.ServerMetadataResponse())

    async def ModelMetadata(self, request, context):
        body = await self._answer(context, self._metadata.model_metadata(request.name, request.version or None))
        return json_format.ParseDict(body, service_pb2.ModelMetadataResponse())

    async def ModelConfig(self, request, context):
        body = await self._answer(context, self._metadata.model_config(request.name, request.version or None))
        return service_pb2.ModelConfigResponse(config=json_format.ParseDict(body, model_config_pb2.ModelConfig()))

    async def ModelStatistics(self, request, context):
        """Every version's statistics (no name), a model's, or one version's."""
        body = await self._answer(context, self._metadata.model_statistics(request.name or None,
                                                                           request.version or None))
        return json_format.ParseDict(body, service_pb2.ModelStatisticsResponse())

    async def RepositoryIndex(self, request, context):
        """Every version and its state (`ready`: only those that are READY)."""
        index = await self._answer(context, self._metadata.repository_index())
        if request.ready:
            index = [entry for entry in index if entry["state"] == "READY"]
        return json_format.ParseDict({"models": index}, service_pb2.RepositoryIndexResponse())

    async def _answer(self, context, call):
        """What a metadata call gives, or the call aborted with its error's code and message."""
        try:
            return await call
        except CronnxError as exc:
            await context.abort(error_code(exc), exc.message)

    # Inference.

    async def ModelInfer(self, request, context):
        started = time.perf_counter()
        metadata = _metadata(context)
        request_id = request_id_from(_first(metadata, REQUEST_ID_KEY))
        trace = self._begin_trace(request, metadata, request_id)
        trailing: tuple[tuple[str, str], ...] = ((REQUEST_ID_KEY, request_id),)
        end_trace = None
        if trace is not None:
            trailing += ((TRACEPARENT, trace.traceparent),)

            def end_trace(record: RequestRecord, total_s: float) -> None:
                trace.finish(grpc_code(record.status).value[0], trace_attributes(record), record.phases, total_s,
                             record.batches, record.error, status_attribute="rpc.grpc.status_code",
                             failed=record.status >= 500)
        record = RequestRecord(request_id, "grpc", UNKNOWN_MODEL, "", trace and trace.context)
        context.set_trailing_metadata(trailing)
        try:
            return await serve_model_request(
                self._client, record, request.model_name, request.model_version or None,
                _first(metadata, ROUTING_KEY), end_trace, started,
                lambda selection, record: self._infer(request, context, selection, record, started))
        except CronnxError as exc:
            code = error_code(exc)
            if code == grpc.StatusCode.UNAVAILABLE:  # as HTTP's 503 says Retry-After: 1
                trailing += ((RETRY_PUSHBACK_KEY, "1000"),)
            await context.abort(code, exc.message, trailing)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unexpected error in ModelInfer (request %s)", request_id)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log", trailing)

    async def _infer(self, request, context, selection: Selection, record: RequestRecord, started: float):
        """The request checked against the chosen version, each row run on it, every row's
        output in the answer (as `http/v2.py` does with a V2 HTTP request)."""
        raw, size = take_raw_contents(request)
        if size > self._limits.max_message_bytes:
            raise RequestTooLarge(f"the request message is {size} bytes; the server takes at most "
                                  f"{self._limits.max_message_bytes} (server.max_body_bytes)")
        deadline = self._deadline(context, started)
        model = await self._client.view(selection)
        parsed, binary = infer_request(request, raw)
        # Everything is checked before any row runs: a bad request costs no inference.
        rows = request_rows(parsed, binary, model)
        queue = queue_parameters(parsed)
        outputs = output_plans(parsed, model)
        read_s = time.perf_counter() - started
        results = await run_rows(self._client, selection, rows, record, deadline, queue)
        respond_started = time.perf_counter()
        response = infer_response(request, model.name, model.version, output_tensors(model, outputs, results))
        record_phases(record, read_s, results, respond_started)
        return response

    def _deadline(self, context, started: float) -> float:
        """The call's deadline on the event loop's clock: the client's, or the request timeout
        from its arrival, whichever is sooner. Raises DeadlineExceeded when it has passed."""
        loop = asyncio.get_running_loop()
        left = self._limits.request_timeout_s - (time.perf_counter() - started)
        remaining = context.time_remaining()
        if remaining is not None:
            left = min(left, remaining)
        if left <= 0:
            raise DeadlineExceeded("the call's deadline passed before it could run")
        return loop.time() + left

    def _begin_trace(self, request, metadata: dict[str, list[str]], request_id: str) -> RequestTrace | None:
        """The call's server span (OpenTelemetry's RPC conventions), begun now, when the process
        traces and the sampler (or a sampled `traceparent` in the metadata) says so."""
        if self._tracing is None:
            return None
        return self._tracing.request(f"{SERVICE}/ModelInfer", metadata, time.time_ns(), {
            "rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": "ModelInfer", "cronnx.api": "grpc",
            "cronnx.request_id": request_id})


def _metadata(context) -> dict[str, list[str]]:
    """The call's metadata by key (gRPC keys are lower-case), every value of each."""
    out: dict[str, list[str]] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):  # keys ending in -bin carry bytes: none is read here
            out.setdefault(key, []).append(value)
    return out


def _first(metadata: dict[str, list[str]], key: str) -> str | None:
    values = metadata.get(key)
    return values[0] if values else None


def _unimplemented(name: str):
    async def unimplemented(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            f"Cronnx does not implement {SERVICE}/{name} (it serves ServerLive, ServerReady, "
                            "ModelReady, ServerMetadata, ModelMetadata, ModelInfer, ModelConfig, RepositoryIndex and "
                            "ModelStatistics)")
    unimplemented.__name__ = name
    return unimplemented


# Every method of the service this class does not define answers UNIMPLEMENTED with a message
# (the generated base class says only "Method not implemented!").
for _method in service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
    if _method.name not in InferenceService.__dict__:
        setattr(InferenceService, _method.name, _unimplemented(_method.name))
