#!/usr/bin/env bash
# More clients than ring slots, one checkout after another: for each TREE given, serve its
# config/cronnx.yaml on a free port and load it with this checkout's `cronnx bench` at 32, 200 and
# 500 clients (20 s each after 3 s of warm-up); summaries in OUT/<tree name>.txt and .json.
#   bench/admission_sweep.sh OUT TREE...   (photos: bench/photos, made by bench/photos.py)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py="$here/.venv/bin/python"
out=$1; shift
mkdir -p "$out"
for tree in "$@"; do
  name=$(basename "$(cd "$tree" && pwd)")
  port=$("$py" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  (cd "$tree" && exec "$py" -m cronnx serve --config config/cronnx.yaml --port "$port") > "$out/$name.log" 2>&1 &
  pid=$!
  for _ in $(seq 240); do curl -sf "http://127.0.0.1:$port/ready" > /dev/null && break; sleep 0.5; done
  (cd "$here" && "$py" -m cronnx bench "http://127.0.0.1:$port" --images bench/photos --sweep 32,200,500 \
      --duration 20 --warmup 3 --json "$out/$name.json") > "$out/$name.txt" 2>&1 || true
  kill -TERM "$pid"
  wait "$pid" || true
done
