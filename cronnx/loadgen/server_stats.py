"""What the server says about a run: read its /metrics before and after and take the difference."""

from __future__ import annotations

import urllib.error
import urllib.request
from urllib.parse import urlsplit

import msgspec
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset], float]


class ServerStats(msgspec.Struct):
    batches: int
    # batch size upper bound (a histogram bucket) -> batches of at most that size, and above the previous
    batch_sizes: dict[str, int]
    mean_batch_size: float | None
    # phase -> mean seconds per successful request
    phase_means_s: dict[str, float]


def metrics_url(predict_url: str) -> str:
    parts = urlsplit(predict_url)
    return f"{parts.scheme}://{parts.netloc}/metrics"


def scrape(url: str, timeout_s: float = 5.0) -> Samples | None:
    """All samples, or None when the server has no Prometheus /metrics (another server, or gone)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            text = response.read().decode()
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _sum(samples: Samples, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def difference(before: Samples | None, after: Samples | None, model: str) -> ServerStats | None:
    if before is None or after is None:
        return None

    def delta(name: str, **labels: str) -> float:
        return _sum(after, name, model=model, **labels) - _sum(before, name, model=model, **labels)

    batches = int(delta("cronnx_batch_size_count"))
    bounds = sorted({dict(ls)["le"] for (n, ls) in after if n == "cronnx_batch_size_bucket"}, key=float)
    sizes, below = {}, 0
    for bound in bounds:
        cumulative = int(delta("cronnx_batch_size_bucket", le=bound))
        if cumulative - below:
            sizes[bound] = cumulative - below
        below = cumulative
    phases = {}
    for phase in ("read", "admission", "preprocess", "queue", "inference", "respond"):
        count = delta("cronnx_request_phase_seconds_count", phase=phase)
        if count:
            phases[phase] = delta("cronnx_request_phase_seconds_sum", phase=phase) / count
    mean = delta("cronnx_batch_size_sum") / batches if batches else None
    return ServerStats(batches=batches, batch_sizes=sizes, mean_batch_size=mean, phase_means_s=phases)


def capacity(predict_url: str, model: str, timeout_s: float = 5.0) -> tuple[int, int] | None:
    """What a Cronnx server's /models says `model` can hold at once: (ring slots of its serving
    versions' workers, the largest max_queue_size among them, 0 for no bound); None for another
    server, or a model it does not list."""
    parts = urlsplit(predict_url)
    try:
        with urllib.request.urlopen(f"{parts.scheme}://{parts.netloc}/models", timeout=timeout_s) as response:
            listed = msgspec.json.decode(response.read())["models"]
        versions = [v for v in listed if v["name"] == model and v.get("state") == "ready"]
        if not versions:
            return None
        slots = sum(v["ring_slots"] * len(v["workers"]) for v in versions)
        return slots, max(v["queue"]["max_queue_size"] for v in versions)
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError, msgspec.DecodeError):
        return None


def capacity_warnings(clients: int, slots: int, max_queue_size: int) -> list[str]:
    """What a closed loop of `clients` means for a model of `slots` ring slots and that queue."""
    if clients <= slots:
        return []
    waiting = clients - slots
    if max_queue_size and waiting > max_queue_size:
        return [f"{clients} clients are more than the model's {slots} ring slots and {max_queue_size} places in "
                f"its admission queue (max_queue_size): the excess is answered 503"]
    return [f"{clients} clients are more than the model's {slots} ring slots: up to {waiting} wait in its "
            f"admission queue, which adds to their latency"]

