#!/usr/bin/env bash
# Here, before a session's GPU check: onnxruntime-gpu and msgspec for the GPU machine, cut into
# parts that the device tool can carry (at most 64 MiB a call, all carried paths together).
#
#   bench/gpu_parts.sh        # writes .whl/aa, .whl/ab, ... (ignored by git)
#
# The GPU machine has Python 3.12 and the CUDA 13 libraries but neither package and no registry.
# onnxruntime-gpu 1.31.1's wheel is 244 MiB (deflate); unpacked and recompressed with xz -9, less
# its TensorRT provider (which needs TensorRT, not on that machine), it is 193 MiB: three parts of
# 60 MiB, each carried alone, and a last one of about 14 MiB (with msgspec) that travels with the run
# (bench/README.md, "GPU check"). Takes about 2 minutes on 2 cores, nearly all of it xz.
set -euo pipefail
cd "$(dirname "$0")/.."
version=1.31.1
out=.whl
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$work" \
    msgspec "onnxruntime-gpu==$version"
(cd "$work" && python3 -m zipfile -e onnxruntime_gpu-"$version"-*.whl site)
rm -rf "$out" && mkdir -p "$out"
tar -C "$work/site" -c --exclude='*providers_tensorrt*' . | xz -9 -T0 | split -b 60M - "$out/ort.tar.xz.part-"
for part in "$out"/ort.tar.xz.part-*; do
    name=${part##*part-}
    mkdir "$out/$name" && mv "$part" "$out/$name/"
done
last=$(ls -d "$out"/?? | tail -n 1)
mv "$work"/msgspec-*.whl "$last/"
# The last part, carried with the run, names every part and its digest.
(cd "$out" && sha256sum ??/ort.tar.xz.part-* > "${last##*/}/SHA256SUMS")
du -sh "$out"/??
