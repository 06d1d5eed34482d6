"""Logging is configured once, in each service's main(), with the level and format main() passes."""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"
# uvicorn configures its own handlers; in JSON mode its lines go through ours instead.
_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, pid, and exc when there is one.

    A record logged with `extra={"fields": {...}}` (the periodic summaries) also
    carries those fields, under their own keys, so log pipelines need no parsing.
    """

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON (never raises on odd arguments: msg falls back to str)."""
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process if record.process is not None else os.getpid(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                entry.setdefault(str(key), value)
        return json.dumps(entry, default=str, ensure_ascii=False)


def setup_logging(level: str | None = None, fmt: str | None = None) -> None:
    """Root handler at `level` (None: INFO) in `fmt` ("text", the default, or "json").

    main() passes LogSettings().log_level and .log_format. Calling it again
    (a uvicorn worker after its supervisor) replaces the handler.
    """
    kind = (fmt or "text").lower()
    if kind not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', not {fmt!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if kind == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=(level or "INFO").upper(), handlers=[handler], force=True)
    if kind == "json":
        for name in _UVICORN_LOGGERS:
            uvicorn_logger = logging.getLogger(name)
            uvicorn_logger.handlers.clear()
            uvicorn_logger.propagate = True
