"""The `cronnx` command line."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from urllib.parse import urlsplit

import click

from cronnx.config import OFF, ConfigError, load_config
from cronnx.observability.logs import setup_logging

DEFAULT_CONFIG = "config/cronnx.yaml"
DEFAULT_DEMO_PATH = "models/mobilenetv2-demo.onnx"
CONFIG_ERROR_EXIT = 2


def _fail(message: str, code: int) -> None:
    click.echo(f"cronnx: {message}", err=True)
    sys.exit(code)


class _GrpcPort(click.ParamType):
    """A port number, or "off" (config.OFF)."""

    name = "PORT|off"

    def convert(self, value, param, ctx):
        if value is OFF or isinstance(value, int):
            return value
        if value == "off":
            return OFF
        try:
            return int(value)
        except ValueError:
            self.fail(f"{value!r} is neither a port number nor 'off'", param, ctx)


GRPC_PORT = _GrpcPort()


@click.group()
@click.version_option(package_name="cronnx", prog_name="cronnx")
def main() -> None:
    """Cronnx: an ONNX inference server for vision models."""


@main.command()
@click.option("--config", "config_path", default=DEFAULT_CONFIG, show_default=True, help="YAML config file.")
@click.option("--host", default=None, help="Address to bind (overrides server.host).")
@click.option("--port", type=int, default=None, help="Port to bind (overrides server.port).")
@click.option("--grpc-port", type=GRPC_PORT, default=None,
              help="Serve the Open Inference Protocol over gRPC on this port too (0: a free one; off: not at all; "
                   "overrides server.grpc_port).")
@click.option("--model-repository", default=None,
              help="A folder of <name>/<version>/model.onnx to serve (overrides server.model_repository; "
                   "Triton's --model-repository, KServe's /mnt/models).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None)
@click.option("--log-format", type=click.Choice(["json", "text"]), default=None,
              help="JSON lines (default) or human-readable text (overrides server.log_format).")
def serve(config_path: str, host: str | None, port: int | None, grpc_port: object, model_repository: str | None,
          log_level: str | None, log_format: str | None) -> None:
    """Serve the models of a config file over HTTP."""
    from cronnx.server.main import run_server

    overrides = {"host": host, "port": port, "grpc_port": grpc_port, "model_repository": model_repository,
                 "log_level": log_level, "log_format": log_format}
    try:
        config = load_config(config_path, **overrides)
    except ConfigError as exc:
        _fail(f"config error: {exc}", CONFIG_ERROR_EXIT)
    setup_logging(config.server.log_level, config.server.log_format)
    try:
        code = run_server(config, config_path, overrides)
    except ConfigError as exc:
        _fail(f"config error: {exc}", CONFIG_ERROR_EXIT)
    except OSError as exc:
        _fail(f"cannot serve: {exc}", 1)
    sys.exit(code)


@main.group()
def models() -> None:
    """Build, download and inspect models."""


@models.command()
@click.option("--arch", type=click.Choice(["mobilenetv2", "resnet50"]), default="mobilenetv2", show_default=True)
@click.option("--output", default=None, help=f"Where to write the model [default: {DEFAULT_DEMO_PATH}, "
                                             "or models/resnet50-demo.onnx].")
def demo(arch: str, output: str | None) -> None:
    """Build a deterministic, untrained demo model (no download)."""
    from cronnx.models.demo import write_demo_model

    setup_logging("info", "text")
    path = write_demo_model(output or (DEFAULT_DEMO_PATH if arch == "mobilenetv2" else f"models/{arch}-demo.onnx"), arch)
    click.echo(f"wrote {path} (untrained demo: its predictions carry no meaning)")


@models.command()
@click.argument("name")
@click.option("--dir", "dest_dir", default="models", show_default=True, help="Folder to download into.")
def pull(name: str, dest_dir: str) -> None:
    """Download a pretrained model of the ONNX Model Zoo and verify its sha256."""
    from cronnx.models.zoo import ZOO, PullError, pull_labels
    from cronnx.models.zoo import pull as pull_entry

    entry = ZOO.get(name)
    if entry is None:
        _fail(f"unknown model {name!r}; available: {', '.join(sorted(ZOO))}", 2)
    try:
        path = pull_entry(entry, Path(dest_dir))
        labels = pull_labels(Path(dest_dir))
    except PullError as exc:
        _fail(f"pull failed: {exc}", 1)
    click.echo(f"wrote {path} (sha256 verified) and {labels}\n\nconfig entry:\n"
               f"  - name: {name.split('-')[0]}\n    path: {path}\n    labels: {labels}")


@models.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
def inspect(path: str) -> None:
    """Print a model's inputs and outputs and a config entry to serve it."""
    from cronnx.models.inspect import describe
    from cronnx.models.spec import ModelSpecError, inspect_model

    try:
        spec, dynamic_size = inspect_model(path), False
    except ModelSpecError as exc:
        if "dynamic" not in str(exc):
            _fail(f"cannot serve {path}: {exc}", 2)
        spec, dynamic_size = inspect_model(path, size_hint=224), True
    click.echo(describe(path, spec, dynamic_size))


@main.command()
@click.argument("url", default="http://127.0.0.1:3000")  # or a full predict URL
@click.option("--model", default="mobilenetv2", show_default=True, help="Model name (POST URL/predict/MODEL).")
@click.option("--protocol", type=click.Choice(["predict", "v2", "grpc"]), default="predict", show_default=True,
              help="predict: POST /predict/MODEL with the images; v2: POST /v2/models/MODEL/infer and grpc: "
                   "ModelInfer, each with the model's input tensor (its metadata gives the shape; filled once "
                   "with fixed values) as binary data. URL is then the server's base URL.")
@click.option("--grpc-url", default=None, metavar="HOST:PORT",
              help="With --protocol grpc: the server's gRPC address (`cronnx serve --grpc-port`); the server's "
                   "/metrics and /models are still read at URL.")
@click.option("--grpc-channels", type=click.Choice(["per-client", "shared"]), default="per-client",
              show_default=True,
              help="With --protocol grpc: a channel (connection) per client, as HTTP's clients each keep a "
                   "connection, or one channel per client process that every client's calls share (HTTP/2 streams).")
@click.option("--image", "images", multiple=True, type=click.Path(exists=True, dir_okay=False), help="An image (repeatable).")
@click.option("--images", "folder", type=click.Path(exists=True, file_okay=False), help="A folder of images, cycled.")
@click.option("--mode", type=click.Choice(["raw", "json"]), default="raw", show_default=True,
              help="Raw image bytes, or JSON with base64.")
@click.option("--concurrency", type=int, default=8, show_default=True, help="Closed loop: clients sending back to back.")
@click.option("--rate", type=float, default=None, help="Open loop: requests per second (instead of --concurrency).")
@click.option("--arrivals", type=click.Choice(["constant", "poisson"]), default="constant", show_default=True)
@click.option("--duration", type=float, default=10.0, show_default=True, help="Seconds measured.")
@click.option("--requests", type=int, default=None, help="Measure exactly this many requests instead of --duration.")
@click.option("--warmup", type=float, default=2.0, show_default=True, help="Seconds of load before measuring.")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Per-request timeout in seconds.")
@click.option("--procs", type=int, default=1, show_default=True, help="Client processes.")
@click.option("--retry-after/--no-retry-after", default=True, show_default=True,
              help="Closed loop: after a 503 with Retry-After, a client waits that long before its next request.")
@click.option("--priority", type=click.IntRange(min=0), default=None,
              help="Ask for this admission priority level (Cronnx's /predict?priority=, V2's and gRPC's priority "
                   "parameter; 1 is served first).")
@click.option("--sweep", default=None, help="Comma-separated concurrencies (or rates with --rate) to run in turn.")
@click.option("--plot", "plot_path", default=None, help="With --sweep: draw latency against throughput (PNG).")
@click.option("--json", "json_path", default=None, help="Write the results as JSON here.")
def bench(url, model, protocol, grpc_url, grpc_channels, images, folder, mode, concurrency, rate, arrivals, duration,
          requests, warmup, timeout, procs, retry_after, priority, sweep, plot_path, json_path) -> None:
    """Load a Cronnx server (or any server with the same API) and report what it sustained."""
    import msgspec

    from cronnx.loadgen import bench as loadgen
    from cronnx.loadgen import payloads, report
    from cronnx.loadgen.runner import LoadSpec

    # What an option needs is checked before the run: a run's results are never thrown away.
    if plot_path and importlib.util.find_spec("matplotlib") is None:
        _fail("--plot needs matplotlib: pip install 'cronnx[bench]' (checked before the run)", 2)
    try:
        target = _bench_target(protocol, url, grpc_url, model, priority, list(images), folder, mode)
    except ValueError as exc:
        _fail(str(exc), 2)
    except payloads.PayloadError as exc:
        _fail(f"cannot build the requests: {exc}", 1)
    points = [float(p) for p in sweep.split(",")] if sweep else [rate if rate else concurrency]
    results = []
    for point in points:
        spec = LoadSpec(url=target.url, bodies=target.bodies, content_type=target.headers.get("Content-Type", ""),
                        protocol=protocol, headers=target.headers,
                        grpc_channels=None if grpc_channels == "per-client" else 1,
                        concurrency=None if rate else int(point), rate=point if rate else None, arrivals=arrivals,
                        duration_s=None if requests else duration, requests=requests, warmup_s=warmup,
                        timeout_s=timeout, progress=sys.stderr.isatty(), retry_after=retry_after)
        result = loadgen.run(spec, procs, model, http_url=url)
        click.echo(report.summary(result))
        results.append(result)
    if len(results) > 1:
        click.echo("\n" + report.sweep_table(results))
    if json_path:  # first: whatever happens to the plot, the measurements are kept
        Path(json_path).write_bytes(msgspec.json.format(msgspec.json.encode(results)) + b"\n")
        click.echo(f"wrote {json_path}")
    if plot_path:
        report.plot(results, plot_path)
        click.echo(f"wrote {plot_path}")


def _bench_target(protocol: str, url: str, grpc_url: str | None, model: str, priority: int | None,
                  images: list[str], folder: str | None, mode: str):
    """What `cronnx bench` loads, and with what (`loadgen.payloads.Target`). Raises ValueError for
    options that do not go together, PayloadError when the model's metadata cannot be read."""
    from cronnx.loadgen import bench as loadgen
    from cronnx.loadgen import payloads

    if protocol == "predict":
        if grpc_url:
            raise ValueError("--grpc-url is for --protocol grpc")
        return payloads.predict_target(url, model, priority, loadgen.image_files(images, folder), mode)
    if images or folder:
        raise ValueError(f"--protocol {protocol} sends the model's input tensor, not images: leave out "
                         "--image and --images")
    if urlsplit(url).path not in ("", "/"):
        raise ValueError(f"--protocol {protocol} takes the server's base URL (http://HOST:PORT), not {url}")
    if protocol == "v2":
        if grpc_url:
            raise ValueError("--grpc-url is for --protocol grpc")
        return payloads.v2_target(url, model, priority)
    if not grpc_url:
        raise ValueError("--protocol grpc needs --grpc-url HOST:PORT (the server's gRPC port)")
    return payloads.grpc_target(grpc_url, model, priority)
