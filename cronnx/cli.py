"""The `cronnx` command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .config import ConfigError, load_config, with_server_overrides
from .logs import setup_logging

DEFAULT_CONFIG = "config/cronnx.yaml"
DEFAULT_DEMO_PATH = "models/mobilenetv2-demo.onnx"
CONFIG_ERROR_EXIT = 2


def _fail(message: str, code: int) -> None:
    click.echo(f"cronnx: {message}", err=True)
    sys.exit(code)


@click.group()
def main() -> None:
    """Cronnx: an ONNX inference server for vision models."""


@main.command()
@click.option("--config", "config_path", default=DEFAULT_CONFIG, show_default=True, help="YAML config file.")
@click.option("--host", default=None, help="Address to bind (overrides server.host).")
@click.option("--port", type=int, default=None, help="Port to bind (overrides server.port).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None)
@click.option("--log-format", type=click.Choice(["json", "text"]), default=None,
              help="JSON lines (default) or human-readable text (overrides server.log_format).")
def serve(config_path: str, host: str | None, port: int | None, log_level: str | None, log_format: str | None) -> None:
    """Serve the models of a config file over HTTP."""
    from .server import run_server

    try:
        config = with_server_overrides(load_config(config_path), host=host, port=port, log_level=log_level,
                                       log_format=log_format)
    except ConfigError as exc:
        _fail(f"config error: {exc}", CONFIG_ERROR_EXIT)
    setup_logging(config.server.log_level, config.server.log_format)
    try:
        code = run_server(config, config_path)
    except ConfigError as exc:
        _fail(f"config error: {exc}", CONFIG_ERROR_EXIT)
    except OSError as exc:
        _fail(f"cannot serve on {config.server.host}:{config.server.port}: {exc}", 1)
    sys.exit(code)


@main.group()
def models() -> None:
    """Build, download and inspect models."""


@models.command()
@click.option("--output", default=DEFAULT_DEMO_PATH, show_default=True, help="Where to write the model.")
def demo(output: str) -> None:
    """Build the deterministic, untrained demo MobileNetV2 (no download)."""
    from .demo_model import write_demo_model

    setup_logging("info", "text")
    path = write_demo_model(output)
    click.echo(f"wrote {path} (untrained demo: its predictions carry no meaning)")


@models.command()
@click.argument("name")
@click.option("--dir", "dest_dir", default="models", show_default=True, help="Folder to download into.")
def pull(name: str, dest_dir: str) -> None:
    """Download a pretrained model of the ONNX Model Zoo and verify its sha256."""
    from .zoo import ZOO, PullError, pull as pull_entry, pull_labels

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
    from .model_inspect import describe
    from .model_spec import ModelSpecError, inspect_model

    try:
        spec, dynamic_size = inspect_model(path), False
    except ModelSpecError as exc:
        if "dynamic" not in str(exc):
            _fail(f"cannot serve {path}: {exc}", 2)
        spec, dynamic_size = inspect_model(path, size_hint=224), True
    click.echo(describe(path, spec, dynamic_size))
