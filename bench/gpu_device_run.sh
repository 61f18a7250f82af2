#!/usr/bin/env bash
# On the GPU machine, in the last device call (the one that carries the last part of .whl, the
# photos and the MobileNetV2): put onnxruntime-gpu and msgspec together from bench/gpu_parts.sh's
# parts, then run the GPU check (python3 -m bench.gpu_check, from the repo root) with the arguments
# given.
#
#   bash bench/gpu_device_run.sh --json $OUT/gpu_check.json --markdown $OUT/gpu_check.md
#
# The parts carried by earlier calls are still in the tree while the machine stays warm (the
# device tool keeps ignored paths between warm calls). A missing part is found before anything
# runs, so a machine that went cold costs one short call, not a broken install.
set -euo pipefail
cd "$(dirname "$0")/.."
site=/tmp/cronnx-site

# The last part's SHA256SUMS names every part: each must be here, whole.
if ! (cd .whl && sha256sum --check --quiet ??/SHA256SUMS); then
    echo "a part of .whl is missing or cut (the machine went cold between calls?): carry them again" >&2
    exit 2
fi
parts=($(cd .whl && awk '{print ".whl/" $2}' ??/SHA256SUMS))
rm -rf "$site" && mkdir -p "$site"
cat "${parts[@]}" | xz -d | tar -C "$site" -x
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/??/msgspec-*.whl

# Ahead of the machine's own onnxruntime (CPU only). The CUDA libraries are NVIDIA's wheels under
# the machine's site-packages; worker processes inherit the path.
export PYTHONPATH=$site
purelib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
libs=$(printf '%s:' "$purelib"/nvidia/*/lib)
# No empty entry (it would search the current folder).
export LD_LIBRARY_PATH=${libs%:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
python3 -c 'import onnxruntime as ort; print("onnxruntime", ort.__version__, ort.get_available_providers())'
PYTHONUNBUFFERED=1 exec python3 -m bench.gpu_check "$@"
