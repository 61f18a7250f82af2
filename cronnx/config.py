"""The one configuration object: typed msgspec structs, parsed and validated once at start-up."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import msgspec.yaml

from cronnx.ipc.cpu import usable_cores

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
ModelName = Annotated[str, msgspec.Meta(pattern=MODEL_NAME_PATTERN)]
Triple = Annotated[list[float], msgspec.Meta(min_length=3, max_length=3)]
# A model version: 1 to 2**63-1. Versions cross the pipes as msgpack integers and are read back
# as int64, so a number beyond int64 could name no version a worker or a front process can hold.
MAX_VERSION = 2 ** 63 - 1
Version = Annotated[int, msgspec.Meta(ge=1, le=MAX_VERSION)]
_MAX_VERSION_DIGITS = len(str(MAX_VERSION))

IMAGENET_MEAN = [0.485, 0.456, 0.406]
# 100 microseconds to 10 seconds: the span of inference latencies, from a tiny model on a GPU
# to a large one on a busy CPU.
DEFAULT_LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                             0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
IMAGENET_STD = [0.229, 0.224, 0.225]
# A model entry's batch size when it sets none (also what `cronnx models inspect` suggests).
DEFAULT_BATCH_SIZE = 8


def version_number(digits: str) -> int | None:
    """The version that ASCII `digits` name ("007" is 7), or None outside 1 to MAX_VERSION. A
    long string is refused by its length, without converting thousands of digits."""
    digits = digits.lstrip("0")
    if not digits or len(digits) > _MAX_VERSION_DIGITS:
        return None
    number = int(digits)
    return number if number <= MAX_VERSION else None


class ConfigError(Exception):
    """An invalid configuration; the message names the file and the field."""


class NotInConfig(ConfigError):
    """A model asked for by name (admin API) that the config file does not have."""


class Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


ADMIN_TOKEN_ENV = "CRONNX_ADMIN_TOKEN"


class AdminConfig(Strict):
    """The model-control API (load, unload, reload): off unless enabled, and then only with a token."""

    enabled: bool = False
    # Or the CRONNX_ADMIN_TOKEN environment variable, which keeps it out of the file.
    token: str | None = None

    def resolved_token(self) -> str | None:
        return self.token or os.environ.get(ADMIN_TOKEN_ENV) or None


class TracingConfig(Strict):
    """OpenTelemetry traces of inference requests (observability/tracing.py). The standard OTEL_*
    environment variables say where spans go and how they are sampled."""

    # None: on when an OTLP endpoint is set (OTEL_EXPORTER_OTLP_ENDPOINT or
    # OTEL_EXPORTER_OTLP_TRACES_ENDPOINT). OTEL_SDK_DISABLED=true turns it off whatever this says.
    enabled: bool | None = None
    # How long a stop waits for the last spans to reach the collector, inside the drain (at most
    # a minute: the drain of front processes waits this long more).
    shutdown_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 2.0


class ServerConfig(Strict):
    host: str = "127.0.0.1"
    port: Port = 3000
    # aiohttp's default of 1 MiB is too small for a base64 phone photo.
    max_body_bytes: PositiveInt = 20 * 1024 * 1024
    request_timeout_s: PositiveFloat = 10.0
    # Connections open at once; more are answered 503 and closed at once. Keep it below the
    # process's open-file limit (`ulimit -n`), which the workers' pipes share.
    max_connections: PositiveInt = 1000
    # The bodies that requests waiting for a ring slot may hold, all models together; past it a
    # request that must wait gets 503 (queue_full). 0: no bound. 256 MiB leaves most of a 2 GiB
    # pod to the models, rings and workers, and still lets 1,000 typical photos (~100 kB) wait.
    max_queue_bytes: Annotated[int, msgspec.Meta(ge=0)] = 256 * 1024 * 1024
    # A connection with no request in progress (idle between requests, or whose request headers
    # have not all arrived: a slow-headers client) is closed after this many seconds.
    idle_timeout_s: PositiveFloat = 30.0
    # A connection whose client takes none of an answer's waiting bytes (more than 64 KiB of it
    # waiting in the server) for this long is reset: a client that never reads its answers would
    # otherwise hold its connection for ever. A slow reader keeps it (nginx's send_timeout, the
    # time between two successive writes; its default is 60 s).
    send_timeout_s: PositiveFloat = 30.0
    # A version whose workers are not all ready by then fails to load.
    model_load_timeout_s: PositiveFloat = 120.0
    # Liveness: a live worker between batches is pinged every worker_ping_interval_s and killed
    # (and replaced) when it has not answered for worker_ping_timeout_s; one whose batch runs
    # longer than batch_run_timeout_s is killed too. Its requests get 503 with the reason.
    worker_ping_interval_s: PositiveFloat = 1.0
    worker_ping_timeout_s: PositiveFloat = 5.0
    batch_run_timeout_s: PositiveFloat = 60.0
    # Where images are decoded and resized (cronnx/preprocessing/). preprocess_processes > 0:
    # that many preprocessing processes, outside the server process's GIL; 0: preprocess_threads
    # threads of the server process (decode and resize release the GIL, the rest of a fill and the
    # event loop do not).
    # None: the usable cores when a model runs on CUDA (decoding is then the ceiling), else 0
    # (inference shares the cores): see bench/README.md, "Preprocessing processes".
    preprocess_processes: Annotated[int, msgspec.Meta(ge=0)] | None = None
    preprocess_threads: PositiveInt = msgspec.field(default_factory=usable_cores)
    # Processes serving HTTP on the port. 1: this process. N > 1: N front processes share the port
    # (SO_REUSEPORT), each reading bodies and decoding images in preprocess_threads / N threads,
    # while this process keeps the models, rings and workers (cronnx/fronts/): one
    # event loop caps near 1,000 /predict requests a second (bench/README.md, "Front processes").
    front_processes: PositiveInt = 1
    # The Open Inference Protocol over gRPC (Triton's GRPCInferenceService) on this port, beside
    # HTTP; 0: a free port (the log says which); None: off. Off unless asked for, so that two
    # servers on one host never contend for a port one of them does not use; the container
    # images, the Kubernetes manifests and KServe's ServingRuntime ask for 8081 (KServe's gRPC port).
    grpc_port: Port | None = None
    # Pillow refuses images above this many pixels (decompression bombs).
    max_image_pixels: PositiveInt = 50_000_000
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # json: one JSON object per line (for log collectors); text: for a person at a terminal.
    log_format: Literal["json", "text"] = "json"
    # Histogram buckets of every latency metric, in seconds.
    latency_buckets_s: Annotated[list[PositiveFloat], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: list(DEFAULT_LATENCY_BUCKETS_S))

    # A Triton-style folder: <name>/<version>/model.onnx, with optional <name>/config.yaml
    # holding that model's settings (the fields of a models[] entry).
    model_repository: str | None = None
    admin: AdminConfig = AdminConfig()
    tracing: TracingConfig = TracingConfig()

    def __post_init__(self) -> None:
        if sorted(set(self.latency_buckets_s)) != list(self.latency_buckets_s):
            raise ValueError("latency_buckets_s must be strictly increasing")
        if self.max_queue_bytes and self.max_queue_bytes < self.max_body_bytes:
            raise ValueError(f"max_queue_bytes ({self.max_queue_bytes}) must be 0 (no bound) or at least "
                             f"max_body_bytes ({self.max_body_bytes}): else a large request could never wait")


class PreprocessConfig(Strict):
    # crop: scale the shorter side to size/crop_ratio, then take the centre size x size.
    # stretch: scale the whole image to size x size.
    resize: Literal["crop", "stretch"] = "crop"
    crop_ratio: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.875
    # None: read from the model's input shape.
    size: PositiveInt | None = None
    # A float input gets (pixel * scale - mean) / std per channel; a uint8 input gets the pixels.
    scale: PositiveFloat = 1.0 / 255.0
    mean: Triple = msgspec.field(default_factory=lambda: list(IMAGENET_MEAN))
    std: Triple = msgspec.field(default_factory=lambda: list(IMAGENET_STD))
    channel_order: Literal["RGB", "BGR"] = "RGB"

    def __post_init__(self) -> None:
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")


class CudaConfig(Strict):
    """onnxruntime CUDA execution provider settings (used only when a worker runs on CUDA).

    TF32 is off by default, unlike onnxruntime's own default: with it on, the demo ResNet-50's
    probabilities differed from the CPU EP's by up to 0.11, with it off by 2.5e-5 (measured on an
    H200, onnxruntime-gpu 1.31.1, when the GPU targets were set). Turn it on for speed when that
    difference is fine.
    """

    use_tf32: bool = False
    # How cuDNN picks convolution algorithms for each input shape (onnxruntime's default).
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = "EXHAUSTIVE"
    # The CUDA memory arena's limit in bytes; None: onnxruntime's default (no limit).
    gpu_mem_limit_bytes: PositiveInt | None = None
    # CUDA graphs: each bucket's session records its kernels once and replays them, saving the
    # launch of every kernel on each run (small batches gain most). onnxruntime needs the inputs and
    # outputs at the same device addresses on every run, so each session gets fixed device buffers
    # (the batch is copied in and out) and batch_buckets must not be [] (one shape per session).
    # Every node must run on CUDA. Unmeasured on a GPU so far: python -m bench.gpu_check compares.
    enable_cuda_graph: bool = False
    # Page-lock the ring's shared segments and the worker's staging buffers (cudaHostRegister), so
    # that the copies of inputs to the GPU and of outputs back run by DMA straight from them instead
    # of through the driver's bounce buffer (cronnx/workers/pinned_memory.py). Off until the GPU
    # check (python -m bench.gpu_check) measures it faster on a GPU.
    pinned_ring_memory: bool = False

    def provider_options(self, device_id: int | None) -> dict[str, str]:
        """The CUDAExecutionProvider options, as onnxruntime's Python API takes them (strings)."""
        options = {"use_tf32": "1" if self.use_tf32 else "0", "cudnn_conv_algo_search": self.cudnn_conv_algo_search}
        if self.enable_cuda_graph:
            options["enable_cuda_graph"] = "1"
        if device_id is not None:
            options["device_id"] = str(device_id)
        if self.gpu_mem_limit_bytes is not None:
            options["gpu_mem_limit"] = str(self.gpu_mem_limit_bytes)
        return options


class VersionPolicy(Strict):
    """Which versions of a repository to serve: the `latest` N, the `specific` ones, or all."""

    latest: PositiveInt | None = None
    specific: list[Version] | None = None

    def __post_init__(self) -> None:
        if self.latest is not None and self.specific is not None:
            raise ValueError("set either latest or specific, not both")


class ModelConfig(Strict):
    name: ModelName
    # One model file (served as `version`), or a folder of versions: <repository>/<version>/model.onnx.
    path: str | None = None
    repository: str | None = None
    version: Version = 1
    version_policy: VersionPolicy = VersionPolicy(latest=1)
    # Split POST /predict/{name} across versions by weight, e.g. {1: 90, 2: 10}. Without it the
    # highest ready version takes all traffic.
    traffic: dict[Version, Annotated[float, msgspec.Meta(ge=0)]] | None = None
    batch_size: PositiveInt = DEFAULT_BATCH_SIZE
    # The batch sizes the sessions run, each on a session of its own that only ever sees that
    # shape; a batch is padded with zeros up to the smallest bucket that holds it. [] runs one
    # session for every batch size. None: [] on CPU, powers of two up to batch_size on CUDA
    # (where every change of a session's input shape is slow; see bench/README.md).
    batch_buckets: list[PositiveInt] | None = None
    batch_timeout_ms: NonNegativeFloat = 2.0
    # CPU: how many worker processes. GPU: ignored when devices is set (one per device).
    workers: PositiveInt = 1
    devices: list[Annotated[int, msgspec.Meta(ge=0)]] = []
    # "auto" picks CUDA when onnxruntime-gpu sees a GPU, else CPU.
    providers: list[str] | Literal["auto"] = "auto"
    intra_op_threads: PositiveInt = 1
    inter_op_threads: PositiveInt = 1
    # A second session with this many threads runs a request that is alone in the model (no
    # other request in flight): lowest latency when idle, one thread per worker under load.
    solo_intra_op_threads: PositiveInt | None = None
    # onnxruntime's idle threads spin by default and steal CPU from the server process and the
    # preprocessing.
    allow_spinning: bool = False
    # Slots per worker ring: requests beyond this wait in the version's admission queue.
    ring_slots: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 64
    # Requests that may wait for a ring slot, per version; past it a request gets 503 at once.
    # 0: no bound (Triton's max_queue_size). The default lets every connection the server takes
    # (server.max_connections, 1000) wait; server.max_queue_bytes bounds the bodies they hold.
    max_queue_size: Annotated[int, msgspec.Meta(ge=0)] = 1000
    # Priority levels of the admission queue, as Triton's: 1 is served first; 0 levels: one
    # queue in arrival order. A request without a priority gets default_priority_level (unset:
    # the lowest, priority_levels).
    priority_levels: Annotated[int, msgspec.Meta(ge=0, le=100)] = 0
    default_priority_level: PositiveInt | None = None
    # How long a request may wait for a slot before its 504 (unset: until its request timeout),
    # and whether a request may ask for less (Triton's default_timeout_microseconds and
    # allow_timeout_override, in milliseconds).
    default_timeout_ms: PositiveFloat | None = None
    allow_timeout_override: bool = False
    top_k: PositiveInt = 5
    labels: str | None = None
    # Build the deterministic demo model at `path` when the file is missing.
    demo: bool = False
    # logits get a softmax; probabilities are reported as they are. auto: probabilities when the
    # model's output comes straight from a Softmax node.
    outputs: Literal["auto", "logits", "probabilities"] = "auto"
    preprocess: PreprocessConfig = PreprocessConfig()
    cuda: CudaConfig = CudaConfig()

    def __post_init__(self) -> None:
        buckets = self.batch_buckets
        if buckets:
            if any(a >= b for a, b in zip(buckets, buckets[1:])):
                raise ValueError(f"batch_buckets must be strictly increasing, got {buckets}")
            if buckets[-1] != self.batch_size:
                raise ValueError(f"batch_buckets must end with batch_size ({self.batch_size}), got {buckets}")
        if (self.path is None) == (self.repository is None):
            raise ValueError("set exactly one of path (one model file) or repository (a folder of versions)")
        if self.traffic is not None and not sum(self.traffic.values()) > 0:
            raise ValueError("traffic weights must add up to more than 0")
        if self.ring_slots < self.batch_size:
            raise ValueError(f"ring_slots ({self.ring_slots}) must be >= batch_size ({self.batch_size})")
        if self.default_priority_level is not None and self.default_priority_level > self.priority_levels:
            raise ValueError(f"default_priority_level ({self.default_priority_level}) must be within "
                             f"priority_levels (1 to {self.priority_levels})")

    @property
    def worker_count(self) -> int:
        return len(self.devices) if self.devices else self.workers


class Config(Strict):
    models: list[ModelConfig] = []
    server: ServerConfig = ServerConfig()

    def __post_init__(self) -> None:
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique, repeated: {', '.join(duplicates)}")
        if not self.models and self.server.model_repository is None:
            raise ValueError("no models: list them under `models` or set server.model_repository")
        if self.server.admin.enabled and not self.server.admin.resolved_token():
            raise ValueError(f"server.admin.enabled needs a token: server.admin.token or {ADMIN_TOKEN_ENV}")


# A command-line override that sets a field to null (`--grpc-port off`): None means "not given".
OFF = object()


def load_config(path: str | os.PathLike[str], **server_overrides: object) -> Config:
    """Read and validate a YAML config; every problem becomes one ConfigError naming file and field.

    `server_overrides` (the command line's; None means not given, OFF null) replace fields of
    the `server` section before validation, so that a config naming no model is valid with
    --model-repository."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    try:
        data = msgspec.yaml.decode(raw)
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    given = {k: (None if v is OFF else v) for k, v in server_overrides.items() if v is not None}
    if given and isinstance(data, dict) and isinstance(data.get("server", {}), dict):
        data = {**data, "server": {**data.get("server", {}), **given}}
    try:
        return msgspec.convert(data, type=Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from None
