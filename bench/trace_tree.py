"""One traced request and its batch, as a collector receives them, printed as a tree (README,
"Tracing"): `cronnx serve` on a config, a few photos sent to /predict with a sampled
`traceparent`, the spans of the last one read from a receiver in this process.

    python bench/trace_tree.py [--config config/cronnx.yaml] [--model mobilenetv2]
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from otlp_receiver import OtlpReceiver  # noqa: E402
from photos import DEFAULT_OUT, write_photos  # noqa: E402
from serving import REPO, Served, free_port  # noqa: E402

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def ms(start_ns: int, end_ns: int) -> float:
    return (end_ns - start_ns) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "config" / "cronnx.yaml")
    parser.add_argument("--model", default="mobilenetv2")
    args = parser.parse_args()
    photo = sorted(write_photos(DEFAULT_OUT))[0].read_bytes()
    receiver = OtlpReceiver()
    receiver.start()
    port = free_port()
    command = [sys.executable, "-m", "cronnx", "serve", "--config", str(args.config.resolve()), "--port", str(port),
               "--log-level", "warning"]
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "50"}
    try:
        with Served("cronnx", command, f"http://127.0.0.1:{port}", "/ready", env=env) as served:
            for _ in range(3):  # the last, once the server is warm
                request = urllib.request.Request(f"{served.base_url}/predict/{args.model}", data=photo,
                                                 headers={"Content-Type": "image/jpeg", "traceparent": PARENT})
                with urllib.request.urlopen(request, timeout=30) as response:
                    span_id = response.headers["traceparent"].split("-")[2]
            time.sleep(1.0)  # the last export
        spans = receiver.received()
    finally:
        receiver.stop()
    (root,) = [s for s in spans if s.span_id == span_id]
    phases = sorted((s for s in spans if s.parent_span_id == root.span_id), key=lambda s: s.start_ns)
    (inference,) = [s for s in phases if s.name == "inference"]
    (batch,) = [s for s in spans if s.name == "batch" and (s.trace_id, s.span_id) == inference.links[0]]
    a = root.attributes
    print(f"trace {root.trace_id}")
    print(f"└─ {root.name}  {ms(root.start_ns, root.end_ns):.2f} ms  (SERVER; parent {root.parent_span_id}; "
          f"http.response.status_code {a['http.response.status_code']}; cronnx.model {a['cronnx.model']}, "
          f"cronnx.version {a['cronnx.version']}, cronnx.batch_size {a['cronnx.batch_size']})")
    for phase in phases:
        link = f"  → link: batch {batch.span_id} (trace {batch.trace_id[:8]}…)" if phase is inference else ""
        print(f"   {'└' if phase is phases[-1] else '├'}─ {phase.name:<10} +{ms(root.start_ns, phase.start_ns):6.2f} ms"
              f"  {ms(phase.start_ns, phase.end_ns):6.2f} ms{link}")
    b = batch.attributes
    print(f"\ntrace {batch.trace_id}")
    print(f"└─ batch  {ms(batch.start_ns, batch.end_ns):.2f} ms  (cronnx.worker {b['cronnx.worker']}, "
          f"cronnx.batch.size {b['cronnx.batch.size']}, cronnx.batch.rows {b['cronnx.batch.rows']}, "
          f"cronnx.batch.padded_rows {b['cronnx.batch.padded_rows']}, cronnx.providers {b['cronnx.providers']})")
    print("   links: " + ", ".join(f"{trace[:8]}…/{span}" for trace, span in batch.links))


if __name__ == "__main__":
    main()
