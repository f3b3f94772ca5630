"""Structured logs to stderr (journald picks them up): JSON lines or plain text."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
# C0 and C1 controls (tab kept; newlines are escaped below), line/paragraph separators and
# lone surrogates (unencodable: the handler would drop the whole line).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_NEWLINES = re.compile("[\n\r\u2028\u2029]")


def _clean(value: Any) -> Any:
    # Log lines carry agent- and user-supplied text: strip control characters and escape
    # line breaks, so nobody can forge log lines or send terminal escapes (text format;
    # JSON escapes them anyway).
    if not isinstance(value, str):
        return value
    value = _CONTROL.sub("", value)
    return _NEWLINES.sub(lambda m: repr(m.group())[1:-1], value)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {
        k: _clean(v)
        for k, v in record.__dict__.items()
        if k not in _STANDARD and not k.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg and the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": _clean(record.getMessage()),
        }
        out.update(_fields(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``ts level logger: msg key=value ...`` for humans (``lpmosd dev``)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        extras = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{ts} {record.levelname.lower():7} {record.name}: {_clean(record.getMessage())}"
        if extras:
            line += f"  {extras}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: str = "info", fmt: str = "json") -> None:
    """Route every lpmosd log to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries are chatty at info; keep their warnings.
    for name in ("hypercorn", "quart", "httpx", "httpcore", "grpclib", "trio_asyncio"):
        logging.getLogger(name).setLevel(logging.WARNING)
