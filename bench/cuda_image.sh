#!/usr/bin/env bash
# Build the CUDA image (Dockerfile.cuda, about 3 GB) and check it. Without a GPU: onnxruntime-gpu
# lists the CUDA provider, and every library its CUDA provider and NVIDIA's wheels link resolves
# inside the image (all but libcuda.so.1, the driver's, which `docker run --gpus` mounts). Where
# Docker has the NVIDIA runtime, it also serves a photo on GPU 0 and checks the log says CUDA.
#
#   bench/cuda_image.sh                                      # on nvidia/cuda (needs a registry)
#   BASE_IMAGE=cronnx-base:bookworm bench/cuda_image.sh      # on docker/make_base_image.sh's base
# TAG names the image (default cronnx:cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${TAG:-cronnx:cuda}

build_args=()
[ -z "${BASE_IMAGE:-}" ] || build_args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
started=$(date +%s)
docker build --network host "${build_args[@]}" -f Dockerfile.cuda -t "$tag" .
size=$(docker image inspect --format '{{.Size}}' "$tag")
echo "built $tag in $(($(date +%s) - started)) s: $((size / 1000000)) MB"

docker run --rm --network none --entrypoint python "$tag" -c '
import glob, os, subprocess, sys
import onnxruntime

providers = onnxruntime.get_available_providers()
print("onnxruntime", onnxruntime.__version__, "providers", providers)
if "CUDAExecutionProvider" not in providers:
    sys.exit("no CUDAExecutionProvider in this onnxruntime build")
capi = os.path.join(os.path.dirname(onnxruntime.__file__), "capi")
libraries = [os.path.join(capi, "libonnxruntime_providers_cuda.so")]
libraries += glob.glob(f"{sys.prefix}/lib/python3*/site-packages/nvidia/*/lib/*.so*")
unresolved = []
for library in libraries:
    linked = subprocess.run(["ldd", library], capture_output=True, text=True, check=True).stdout
    unresolved += [f"{library}: {line.strip()}" for line in linked.splitlines()
                   if "not found" in line and "libcuda.so.1" not in line]
if unresolved:
    sys.exit("unresolved libraries:\n" + "\n".join(unresolved))
print(f"{len(libraries)} CUDA libraries resolve (libcuda.so.1 comes with docker run --gpus)")
'

if ! docker info --format '{{json .Runtimes}}' | grep -q nvidia; then
    echo "no NVIDIA runtime in Docker: the GPU run is skipped"
    exit 0
fi
cid=$(docker run -d --gpus all --network host --shm-size 1g "$tag" serve --port 0)
trap 'docker rm --force "$cid" >/dev/null' EXIT
url=
for _ in $(seq 600); do  # the first start builds the demo model, then warms a session per bucket
    [ -n "$url" ] || url=$(docker logs "$cid" 2>&1 | grep -o 'serving on http://[0-9.]*:[0-9]*' |
                               sed 's|.*:|http://127.0.0.1:|' || true)
    [ -n "$url" ] && curl -sf "$url/ready" >/dev/null && break
    sleep 0.5
done
curl -sf "$url/ready" >/dev/null || { docker logs "$cid"; exit 1; }
# A JPEG made by the image's own PIL: the host needs no Python packages.
make_jpeg='import sys; from PIL import Image; Image.linear_gradient("L").convert("RGB").save(sys.stdout.buffer, "JPEG")'
docker exec "$cid" python -c "$make_jpeg" |
    curl -sf -X POST -H 'Content-Type: image/jpeg' --data-binary @- "$url/predict/mobilenetv2?top_k=1"
echo
docker logs "$cid" 2>&1 | grep -q 'providers CUDAExecutionProvider' ||
    { docker logs "$cid"; echo "the model did not load on CUDA" >&2; exit 1; }
echo "served on the GPU"
