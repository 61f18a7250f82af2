# Cronnx on CPU: onnxruntime and pillow-simd (AVX2). README "Container images" has the run line.
#   docker build -t cronnx .
#   docker build --build-arg PIL_DIST=pillow -t cronnx .    # a CPU without AVX2: stock Pillow
# BASE_IMAGE: any Debian-like image with python3 >= 3.11 (and python3-venv); the runtime stage
# is the same base, so that the venv's interpreter is there.
ARG BASE_IMAGE=python:3.12-slim-bookworm

FROM ${BASE_IMAGE} AS build
# pillow-simd: compiled here with AVX2 (its resize is several times Pillow's); pillow: PyPI's wheel.
ARG PIL_DIST=pillow-simd
ARG PILLOW_SIMD_VERSION=12.1.1.post0
COPY docker/build_pil.sh /build/
RUN /build/build_pil.sh "$PIL_DIST" "$PILLOW_SIMD_VERSION" /build/wheels
COPY docker/install_venv.sh docker/check_venv.py /build/
COPY pyproject.toml README.md /build/src/
COPY cronnx /build/src/cronnx
RUN /build/install_venv.sh /opt/cronnx /build/src cpu "$PIL_DIST" /build/wheels

FROM ${BASE_IMAGE}
# A fixed uid and gid, so that a host folder mounted at /models can be given to it (chown 10001).
RUN groupadd --gid 10001 cronnx \
    && useradd --no-log-init --uid 10001 --gid cronnx --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin cronnx \
    && mkdir /config /models \
    && chown cronnx:cronnx /models
COPY --from=build /opt/cronnx /opt/cronnx
COPY docker/cronnx.yaml /config/cronnx.yaml
COPY docker/healthcheck.py /usr/local/bin/cronnx-healthcheck
# onnxruntime 1.29+ uploads usage telemetry from Linux too, and keeps a device id in $HOME:
# a server's container does neither.
ENV PATH=/opt/cronnx/bin:$PATH \
    ORT_DISABLE_TELEMETRY=1
# Relative paths in the config are relative to /: config/cronnx.yaml (the default) is
# /config/cronnx.yaml and models/... is the /models volume, as in a checkout of the repository.
WORKDIR /
# Numeric: Kubernetes' runAsNonRoot can verify only a numeric user.
USER 10001:10001
VOLUME ["/config", "/models"]
# HTTP, and gRPC (server.grpc_port of /config/cronnx.yaml).
EXPOSE 3000 8081
# Cronnx drains on SIGTERM (Docker's stop signal) as PID 1 and exits 0; give it more than
# server.request_timeout_s: docker run --stop-timeout 15 (Docker's default is 10 s).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 CMD ["cronnx-healthcheck"]
ENTRYPOINT ["cronnx"]
CMD ["serve"]
