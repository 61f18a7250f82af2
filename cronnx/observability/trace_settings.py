"""Whether and how this server traces, read from OpenTelemetry's environment and
`server.tracing`, without loading the SDK: a server that does not trace never imports it
(`start_tracing` does, when it does). observability/tracing.py has the rest.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from cronnx.config import ConfigError, TracingConfig

if TYPE_CHECKING:
    from cronnx.observability.tracing import Tracing

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
PROTOCOL_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")


def first_set(variables: Sequence[str], default: str = "") -> str:
    """The value of the first of `variables` set (and not empty) in the environment, else `default`."""
    return next((os.environ[v] for v in variables if os.environ.get(v)), default)


def protocol() -> str:
    """The OTLP protocol the environment asks for (http/protobuf, the specification's default, or
    grpc). ConfigError for one the Python SDK has no exporter of (http/json)."""
    chosen = first_set(PROTOCOL_VARIABLES, "http/protobuf")
    if chosen not in ("http/protobuf", "grpc"):
        raise ConfigError(f"{' / '.join(PROTOCOL_VARIABLES)} is {chosen!r}: Cronnx exports spans over "
                          "http/protobuf or grpc")
    return chosen


def exporter_named() -> str:
    """OTEL_TRACES_EXPORTER: "otlp" (the default) or "none" (no traces). ConfigError for another
    exporter (console, zipkin...): Cronnx exports OTLP only."""
    named = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "otlp"
    if named not in ("otlp", "none"):
        raise ConfigError(f"OTEL_TRACES_EXPORTER is {named!r}: Cronnx exports spans over OTLP only "
                          "(otlp, or none for no traces)")
    return named


def wanted(config: TracingConfig) -> bool:
    """Whether to trace: never under OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none; else as
    `config.enabled` says, and when it says nothing, when an OTLP endpoint is set. Raises
    ConfigError for an OTEL_TRACES_EXPORTER other than otlp or none."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or exporter_named() == "none":
        return False
    if config.enabled is not None:
        return config.enabled
    return bool(first_set(ENDPOINT_VARIABLES))


def start_tracing(config: TracingConfig, process: str) -> Tracing | None:
    """This process's tracing (`process` names it in the spans' resource: "server", "front-1"...),
    or None when off (`wanted`). Raises ConfigError as `wanted` and `protocol` do."""
    if not wanted(config):
        return None
    from cronnx.observability.tracing import Tracing
    return Tracing(config, process)
