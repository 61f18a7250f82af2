#!/usr/bin/env bash
# Priorities under saturation: high-priority requests (level 1) at 5/s for 20 s on an idle server,
# then the same while 200 low-priority clients (level 2, the default) saturate it, then a 5/s
# stream at level 2 under the same load for contrast. Serves bench/configs/priority.yaml (the
# default config with two levels) on a free port; results in OUT/*.json and OUT/summary.txt.
#   bench/priority.sh OUT   (photos: bench/photos, made by bench/photos.py)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
py="$here/.venv/bin/python"
out=$1
mkdir -p "$out"
port=$("$py" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
url="http://127.0.0.1:$port"
"$py" -m cronnx serve --config bench/configs/priority.yaml --port "$port" > "$out/server.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2> /dev/null || true; wait $server 2> /dev/null || true' EXIT
for _ in $(seq 240); do curl -sf "$url/ready" > /dev/null && break; sleep 0.5; done
probe() {  # probe NAME [--priority N]: 5 requests a second for 20 s
  local name=$1; shift
  "$py" -m cronnx bench "$url" --images bench/photos --rate 5 --duration 20 --warmup 2 "$@" \
      --json "$out/$name.json" > "$out/$name.txt" 2>&1
}
probe idle-high --priority 1
"$py" -m cronnx bench "$url" --images bench/photos --concurrency 200 --duration 55 --warmup 5 \
    --json "$out/low-load.json" > "$out/low-load.txt" 2>&1 &
load=$!
sleep 8  # the load's warm-up: every slot taken, the queue filled
probe loaded-high --priority 1
probe loaded-default
wait "$load"
"$py" - "$out" <<'PY' | tee "$out/summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = {name: json.loads((out / f"{name}.json").read_text())[-1]
        for name in ("idle-high", "loaded-high", "loaded-default", "low-load")}
idle = runs["idle-high"]["latency_ms"]["p50"]
print("| run | requests | ok | errors | p50 ms | p99 ms | p50 / idle p50 |")
print("|---|---:|---:|---:|---:|---:|---:|")
for name, r in runs.items():
    errors = sum(r["errors_by_status"].values()) + sum(r["errors_by_exception"].values())
    lat = r["latency_ms"]
    print(f"| {name} | {r['sent']} | {r['ok']} | {errors} | {lat['p50']:.1f} | {lat['p99']:.1f} "
          f"| {lat['p50'] / idle:.2f} |")
print(f"low-priority load: {runs['low-load']['requests_per_s']:.1f} req/s")
PY
