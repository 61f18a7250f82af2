#!/usr/bin/env bash
# Start the BentoML peer of Cronnx on 127.0.0.1:PORT (see bentoml_service.py for the env knobs).
#   bench/peers/bentoml_server.sh PORT
# Readiness: GET http://127.0.0.1:PORT/readyz -> 200. Stop: SIGTERM to this process group
# (or to this pid: `exec` makes it the bentoml arbiter, which stops its workers on SIGTERM).
set -euo pipefail
PORT="${1:?usage: $0 PORT}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BENTOVENV="${BENTOVENV:-/tmp/bentovenv}"
cd "$ROOT"
export BENTOML_DO_NOT_TRACK=True
export BENTOML_HOME="${BENTOML_HOME:-/tmp/bentoml-home}"
export PYTHONUNBUFFERED=1
exec "$BENTOVENV/bin/bentoml" serve bentoml_service:Classifier --working-dir bench/peers \
    --host 127.0.0.1 --port "$PORT"
