"""What each protocol sends, built once before the run so that the load loop does no per-request
work: `/predict` the image files themselves; V2 infer (HTTP) and gRPC's ModelInfer the model's
own input tensor, of the shape and datatype its metadata gives, filled once with deterministic
values.

V2 and gRPC send the tensor, not the images as a BYTES tensor, so that the two carry the same
bytes to the same checks and differ only in their transport (Triton's perf_analyzer sends a
model's tensors the same way); `/predict` is the way in with images, and its decode and
preprocessing (milliseconds per photo here) would hide what a protocol costs.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import numpy as np

PROTOCOLS = ("predict", "v2", "grpc")
# Triton's binary tensor data extension: the JSON header's length, in bytes, before the tensors'.
HEADER_LENGTH = "Inference-Header-Content-Length"
# The protocol's numeric datatypes and their numpy dtypes; BYTES (encoded images) is not a tensor.
DTYPES = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "UINT8": np.uint8, "UINT16": np.uint16,
          "UINT32": np.uint32, "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
          "INT64": np.int64, "BOOL": np.bool_}
# The values are the same in every run: a fixed seed.
SEED = 0


class PayloadError(Exception):
    """The payload cannot be built: the server did not say what its model takes, or it takes an
    input the load generator cannot fill."""


class InputTensor(msgspec.Struct, frozen=True):
    """The model's one input: its name, datatype and shape for one row, and its bytes."""

    name: str
    datatype: str
    shape: list[int]
    data: bytes


class Target(msgspec.Struct, frozen=True):
    """What a run loads and with what: the URL posted to (gRPC: host:port), the bodies (gRPC:
    serialised ModelInferRequests) and, over HTTP, their headers."""

    url: str
    bodies: list[bytes]
    headers: dict[str, str]


def predict_target(url: str, model: str, priority: int | None, paths: list[Path], mode: str) -> Target:
    """`/predict/{model}` of a server's base URL (any other URL as it is) with the images; the
    priority as `?priority=`."""
    if urlsplit(url).path in ("", "/"):
        url = f"{url.rstrip('/')}/predict/{model}"
    if priority is not None:
        url = f"{url}{'&' if urlsplit(url).query else '?'}priority={priority}"
    bodies, content_type = image_bodies(paths, mode)
    return Target(url, bodies, {"Content-Type": content_type})


def v2_target(base_url: str, model: str, priority: int | None) -> Target:
    """V2 infer of the model's tensor (`GET /v2/models/{model}` says which) at a server's base
    URL, with the binary tensor data extension; the priority as the request's parameter. Raises
    PayloadError."""
    tensor = input_tensor(v2_metadata(base_url, model), model)
    body, headers = v2_body(tensor, priority)
    return Target(f"{base_url.rstrip('/')}/v2/models/{model}/infer", [body], headers)


def grpc_target(target: str, model: str, priority: int | None) -> Target:
    """ModelInfer of the model's tensor (gRPC's ModelMetadata says which) at host:port; the
    priority as the request's parameter. Raises PayloadError."""
    tensor = input_tensor(grpc_metadata(target, model), model)
    return Target(target, [grpc_request(tensor, model, priority)], {})


def image_bodies(paths: list[Path], mode: str) -> tuple[list[bytes], str]:
    """`/predict` bodies: each image's bytes (raw) or JSON with its base64, and their content type."""
    raw = [p.read_bytes() for p in paths]
    if mode == "raw":
        return raw, "application/octet-stream"
    return [json.dumps({"image": base64.b64encode(b).decode()}).encode() for b in raw], "application/json"


def input_tensor(metadata: dict, model: str) -> InputTensor:
    """One row of the model's input (its batch and any other variable dimension, -1 in the
    metadata, set to 1), from the Open Inference Protocol's model metadata (HTTP's JSON, or
    gRPC's ModelMetadataResponse as a dict); floats standard normal, as a normalised image's
    values are, integers from 0 to 127."""
    inputs = metadata.get("inputs") or []
    if len(inputs) != 1:
        raise PayloadError(f"model {model!r} has {len(inputs)} inputs; the load generator sends one tensor")
    entry = inputs[0]
    datatype = entry.get("datatype")
    if datatype not in DTYPES:
        raise PayloadError(f"model {model!r}'s input {entry.get('name')!r} is {datatype}; the load generator "
                           f"fills {', '.join(DTYPES)}")
    shape = [1 if int(d) < 0 else int(d) for d in entry.get("shape", [])]
    rng = np.random.default_rng(SEED)
    dtype = np.dtype(DTYPES[datatype])
    if dtype.kind == "f":
        values = rng.standard_normal(shape).astype(dtype)
    else:
        values = rng.integers(0, 2 if dtype.kind == "b" else 128, shape).astype(dtype)
    return InputTensor(entry["name"], datatype, shape, values.tobytes())


def v2_metadata(base_url: str, model: str, timeout_s: float = 10.0) -> dict:
    """`GET /v2/models/{model}`. Raises PayloadError naming the URL when there is no answer or
    no metadata."""
    url = f"{base_url.rstrip('/')}/v2/models/{model}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise PayloadError(f"GET {url} answered {exc.code}: {exc.read()[:200].decode(errors='replace')}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise PayloadError(f"GET {url} failed: {exc}") from None


def v2_body(tensor: InputTensor, priority: int | None) -> tuple[bytes, dict[str, str]]:
    """A V2 infer body with the binary tensor data extension: the JSON header, then the tensor's
    bytes; every output asked for as binary data. Returns the body and its headers."""
    parameters: dict[str, object] = {"binary_data_output": True}
    if priority is not None:
        parameters["priority"] = priority
    header = json.dumps({
        "inputs": [{"name": tensor.name, "shape": tensor.shape, "datatype": tensor.datatype,
                    "parameters": {"binary_data_size": len(tensor.data)}}],
        "parameters": parameters}).encode()
    return header + tensor.data, {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def grpc_metadata(target: str, model: str, timeout_s: float = 10.0) -> dict:
    """gRPC's ModelMetadata, as the dict HTTP's metadata is. Raises PayloadError naming the
    target when the call fails."""
    import grpc
    from google.protobuf import json_format
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            response = stub.ModelMetadata(service_pb2.ModelMetadataRequest(name=model), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise PayloadError(f"gRPC ModelMetadata of {model!r} at {target} failed: {exc.code().name}: "
                               f"{exc.details()}") from None
    return json_format.MessageToDict(response, preserving_proto_field_name=True)


def grpc_request(tensor: InputTensor, model: str, priority: int | None) -> bytes:
    """A serialised ModelInferRequest with the tensor in `raw_input_contents`; every output is
    answered (in `raw_output_contents`)."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
    request.raw_input_contents.append(tensor.data)
    if priority is not None:
        request.parameters["priority"].int64_param = priority
    return request.SerializeToString()
