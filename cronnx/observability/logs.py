"""Log set-up shared by the server process, the front processes and the workers: JSON lines
(default) or readable text.

Structured fields travel in a log record's `fields` attribute (`log.info(msg, extra={"fields": {...}})`)
and become top-level keys of the JSON line, or `key=value` pairs after the text message.
"""

from __future__ import annotations

import logging
import sys
import time

import msgspec


class LoggingSpec(msgspec.Struct, frozen=True):
    """How every process logs: server.log_level and server.log_format (their defaults are the config's)."""

    level: str
    format: str


_json = msgspec.json.Encoder()


class JsonLinesFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": _iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return _json.encode(line).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            text += " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        return text


def _text_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, (list, dict)):
        return _json.encode(value).decode()
    return str(value)


def _iso_time(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLinesFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's own access log would repeat our per-request line.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
