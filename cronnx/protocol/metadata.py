"""What the Open Inference Protocol's non-infer calls read (server and model metadata, health,
Triton's model configuration, repository index and statistics), whichever protocol asks: HTTP's
routes answer with these bodies as JSON, gRPC's service with the same fields as protobuf
messages. One owner, the server process (`server.metadata.ServerMetadata`); a front process
asks it through its relay (`fronts.relay.RelayedMetadata`)."""

from __future__ import annotations

from typing import Protocol


class MetadataSource(Protocol):
    """Each method answers with the V2 REST protocol's JSON body (Triton's for `model_config`,
    `model_statistics` and `repository_index`). `version` is the digits a request names (None:
    the model's highest ready version). Raises ModelNotFound for an unknown model or version,
    ModelNotReady while it loads; in a front process Unavailable when the server process does
    not answer."""

    async def server_metadata(self) -> dict:
        """`{"name", "version", "extensions"}`."""
        ...

    async def server_ready(self) -> bool:
        """Whether the server takes inference requests (`/ready`)."""
        ...

    async def model_ready(self, name: str, version: str | None) -> bool:
        """Whether the version has a live worker (False while it loads)."""
        ...

    async def model_metadata(self, name: str, version: str | None) -> dict:
        """`{"name", "versions", "platform", "inputs", "outputs"}`, -1 for a dynamic batch."""
        ...

    async def model_config(self, name: str, version: str | None) -> dict:
        """Triton's model configuration."""
        ...

    async def model_statistics(self, name: str | None, version: str | None) -> dict:
        """Triton's `{"model_stats": [...]}` of every version (`name` None), of a model's, or of one."""
        ...

    async def repository_index(self) -> list[dict]:
        """Triton's repository index: `{"name", "version", "state"[, "reason"]}` per version."""
        ...
