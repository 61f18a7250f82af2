#!/usr/bin/env bash
# The tail target (at 80% of the peak rate in open loop, p99 <= 3x p50), measured right after the
# peak it is relative to: for each config, start `cronnx serve`, measure the closed-loop peak (32
# clients), then open loop at 80% of that peak, and print p50, p99 and their ratio. Rounds alternate the configs; each serves its first model.
# Usage: bench/open_loop_tail.sh ROUNDS CONFIG...   (e.g. bench/open_loop_tail.sh 2 config/cronnx.yaml)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=$1; shift
images=$(for f in bench/photos/*-1600.jpg; do printf -- '--image %s ' "$f"; done)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
field() { .venv/bin/python -c "import json, sys; r = json.load(open(sys.argv[1]))[-1]; print(eval(sys.argv[2]))" "$@"; }
for round in $(seq 1 "$rounds"); do
  for config in "$@"; do
    model=$(.venv/bin/python -c "import sys; from cronnx.config import load_config; print(load_config(sys.argv[1]).models[0].name)" "$config")
    port=$(.venv/bin/python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    .venv/bin/python -m cronnx serve --config "$config" --port "$port" >/dev/null 2>&1 &
    server=$!
    for _ in $(seq 1 300); do curl -sf "127.0.0.1:$port/ready" >/dev/null && break; sleep 0.2; done
    .venv/bin/python -m cronnx bench "http://127.0.0.1:$port" --model "$model" $images --concurrency 32 --duration 8 --warmup 2 \
      --json "$out/peak.json" >/dev/null
    peak=$(field "$out/peak.json" "r['requests_per_s']")
    rate=$(.venv/bin/python -c "print(round(0.8 * $peak, 1))")
    .venv/bin/python -m cronnx bench "http://127.0.0.1:$port" --model "$model" $images --rate "$rate" --duration 10 --warmup 2 \
      --json "$out/open.json" >/dev/null
    echo "round $round $config: peak $peak req/s; open loop at $rate req/s:" \
      "$(field "$out/open.json" "'p50 %.1f ms, p99 %.1f ms, p99/p50 %.2f' % (r['latency_ms']['p50'], r['latency_ms']['p99'], r['latency_ms']['p99'] / r['latency_ms']['p50'])")"
    kill -TERM "$server"; wait "$server" || true
  done
done
