#!/usr/bin/env bash
# Make a local Debian bookworm base image with debootstrap, for machines that reach no container
# registry (CI): build on it with
#   docker build --network host --build-arg BASE_IMAGE=cronnx-base:bookworm -t cronnx .
# Its python3 is Debian's (3.11, /usr/bin/python3, no headers). Users keep the official Python
# image, the Dockerfiles' default.
#
# usage: docker/make_base_image.sh [TAG]   (default cronnx-base:bookworm; an existing TAG is kept)
# Needs root, debootstrap and a running Docker daemon. DEBIAN_MIRROR overrides the mirror.
set -euo pipefail

tag=${1:-cronnx-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
host_ca=/etc/ssl/certs/ca-certificates.crt

if docker image inspect "$tag" >/dev/null 2>&1; then
    echo "$tag exists"
    exit 0
fi

root=$(mktemp -d /var/tmp/cronnx-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
# mktemp makes the folder 0700 and the image's / would keep that mode: on a storage driver that
# keeps it (vfs) the image's user (uid 10001) could then reach nothing, its venv included.
chmod 0755 "$root"
# passwd: useradd, which the Dockerfiles use (debian:bookworm-slim has it too; minbase does not).
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,passwd \
    bookworm "$root" "$mirror"
# These machines reach the package registries through a TLS proxy whose CA is only in the host's
# bundle: pip in a build on this base fails verification without it. The copy under
# /usr/local/share/ca-certificates keeps it in the bundle if apt runs update-ca-certificates.
cp "$host_ca" "$root/etc/ssl/certs/ca-certificates.crt"
cp "$host_ca" "$root/usr/local/share/ca-certificates/host-bundle.crt"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
# PIP_CERT: pip's own certifi bundle would not hold the proxy's CA.
tar -C "$root" -c . | docker import \
    --change "ENV PIP_CERT=$host_ca" \
    --change 'CMD ["/bin/bash"]' \
    - "$tag"
echo "made $tag"
