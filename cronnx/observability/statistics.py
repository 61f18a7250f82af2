"""Triton's statistics extension: per model version, what it has done since the server started,
as `GET /v2/models[/{m}[/versions/{v}]]/stats` answers it (server/metadata.py).

Made from the measurements Cronnx records anyway (`Metrics.record_request` for each request,
the batch observer for each batch), in the server process, whichever process served the request.
How Triton's fields map to Cronnx's phases (README, "Statistics"):

    success / fail     the end-to-end time in the server of each request that succeeded / failed
    queue              admission (waiting for a ring slot) + queue (waiting in the ring for its batch)
    compute_input      preprocess (decoding and resizing into the slot, or copying a tensor row)
    compute_infer      inference (the batch's run)
    compute_output     respond (the answer's encoding)
    inference_count    rows run in batches
    execution_count    batches run

Durations are counts and nanoseconds, as Triton's; there is no response cache (cache_hit and
cache_miss stay 0).
"""

from __future__ import annotations

import time
from collections.abc import Mapping

# Triton's per-request durations and the Cronnx phases that make each.
_PHASES = {"queue": ("admission", "queue"), "compute_input": ("preprocess",), "compute_infer": ("inference",),
           "compute_output": ("respond",)}


class _Duration:
    """How many times, and in all how many nanoseconds."""

    __slots__ = ("count", "ns")

    def __init__(self) -> None:
        self.count = 0
        self.ns = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += int(seconds * 1e9)

    def to_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


class VersionStatistics:
    """One model version's statistics (the module's docstring says what each is)."""

    def __init__(self) -> None:
        self.last_inference_ms = 0
        self.inference_count = 0
        self.execution_count = 0
        self.durations = {name: _Duration() for name in ("success", "fail", *_PHASES)}
        self.batches: dict[int, _Duration] = {}

    def request(self, succeeded: bool, total_s: float, phases: Mapping[str, float]) -> None:
        """One answered request: its outcome, its time in the server and (when it succeeded) its
        phases, seconds by name."""
        if not succeeded:
            self.durations["fail"].add(total_s)
            return
        self.durations["success"].add(total_s)
        self.last_inference_ms = time.time_ns() // 1_000_000
        for name, parts in _PHASES.items():
            self.durations[name].add(sum(phases.get(part, 0.0) for part in parts))

    def batch(self, size: int, run_s: float) -> None:
        """One batch run: `size` rows for `run_s` seconds."""
        self.execution_count += 1
        self.inference_count += size
        duration = self.batches.get(size)
        if duration is None:
            duration = self.batches[size] = _Duration()
        duration.add(run_s)

    def to_json(self, name: str, version: str) -> dict:
        """Triton's `$model_stat`."""
        zero = {"count": 0, "ns": 0}
        return {
            "name": name, "version": version, "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count, "execution_count": self.execution_count,
            "inference_stats": {**{key: d.to_json() for key, d in self.durations.items()},
                                "cache_hit": zero, "cache_miss": zero},
            # Per batch size only the run is measured: compute_input and compute_output are each
            # row's, not the batch's.
            "batch_stats": [{"batch_size": size, "compute_infer": d.to_json()}
                            for size, d in sorted(self.batches.items())],
        }


class Statistics:
    """Every model version's statistics, by (model, version) as the metrics label them."""

    def __init__(self) -> None:
        self._versions: dict[tuple[str, str], VersionStatistics] = {}

    def version(self, model: str, version: str) -> VersionStatistics:
        """The version's statistics, begun at zero the first time it is named."""
        found = self._versions.get((model, version))
        if found is None:
            found = self._versions[(model, version)] = VersionStatistics()
        return found
