#!/usr/bin/env bash
# Cross-check `cronnx bench` against wrk (Debian's package): same server, same image, same
# concurrency, alternated in rounds. Usage: bench/crosscheck_wrk.sh [CONCURRENCY] [SECONDS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
concurrency=${1:-8}; seconds=${2:-10}; rounds=${3:-3}
image=$(ls bench/photos/*-1600.jpg | head -n 1)
command -v wrk >/dev/null || { echo "wrk is not installed: apt-get install wrk" >&2; exit 2; }
log=$(mktemp)
.venv/bin/python -m cronnx serve --port 0 >"$log" 2>&1 &
server=$!
trap 'kill -TERM $server; wait $server; rm -f "$log"' EXIT
for _ in $(seq 1 300); do
  url=$(grep -o 'serving on http://[0-9.:]*' "$log" | head -n 1 | sed 's/serving on //') || true
  [ -n "$url" ] && curl -sf "$url/ready" >/dev/null && break
  sleep 0.2
done
echo "server $url, image $image, concurrency $concurrency, $seconds s per run"
for round in $(seq 1 "$rounds"); do
  IMAGE=$image wrk -t1 -c"$concurrency" -d"${seconds}s" -s bench/wrk_post.lua "$url/predict/mobilenetv2" | grep '^wrk:'
  .venv/bin/python -m cronnx bench "$url" --image "$image" --concurrency "$concurrency" --duration "$seconds" --warmup 0 \
    | grep -E 'throughput|latency'
done
