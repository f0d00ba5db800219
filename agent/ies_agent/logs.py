"""Structured logging: ``key=value`` lines, one per outage and one per recovery.

Never pass key material or secrets to a logger; values are quoted when they hold spaces.
"""

from __future__ import annotations

import logging
import sys


class KeyValueFormatter(logging.Formatter):
    """Format records as ``ts=… level=… logger=… msg="…"`` plus any ``kv`` extras."""

    def format(self, record: logging.LogRecord) -> str:
        """Return one ``key=value`` line for ``record``."""
        parts = [
            f"ts={self.formatTime(record, '%Y-%m-%dT%H:%M:%S')}",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={_quote(record.getMessage())}",
        ]
        extra = getattr(record, "kv", None)
        if isinstance(extra, dict):
            parts.extend(f"{k}={_quote(str(v))}" for k, v in extra.items())
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def _quote(text: str) -> str:
    """Quote ``text`` when it holds spaces, quotes or ``=``."""
    if text and not any(c in text for c in ' "=\n'):
        return text
    return (
        '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    )


def setup_logging(level: str = "INFO") -> None:
    """Send ``key=value`` log lines at ``level`` to standard error."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pymodbus logs every retry and transport hiccup; we report those ourselves.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    # The ocpp and websockets libraries log every message and connection at INFO;
    # the central system logs what matters (connects, outages, refusals) itself.
    for name in ("ocpp", "websockets"):
        logging.getLogger(name).setLevel(logging.WARNING)
