"""Per-upstream delivery cursors, kept in the data directory and written atomically.

A cursor says how far one upstream has acknowledged the evidence log; there is no
other copy of the data. ``<data_dir>/upstream/<name>.cursor.json`` holds::

    {"acked": 1041, "checkpoints": 9, "confirmed": 1000, "log": "<id>",
     "offset": 401234, "upstream": "broker", "v": 1}

- ``acked``: every ``seq`` up to and including it was acknowledged by the upstream
  (MQTT PUBACK, an HTTP ACK, a file fsynced); -1 before the first.
- ``confirmed``: the same for end-to-end confirmations by a collector (MQTT
  ``e2e_ack``); -1 when unused. With confirmations on, a restart replays from here.
- ``checkpoints``: how many lines of ``checkpoints.jsonl`` were acknowledged.
- ``offset``: byte offset in ``evidence.jsonl`` of entry ``acked + 1``, a hint that
  spares a scan of a large log (checked before use).
- ``log``: identifies the log (hash of its first line), so a cursor never carries over
  to a new log started in the same directory.

The file is replaced with write-to-temporary, fsync, rename, fsync of the directory: a
crash leaves the old cursor or the new one, never a torn one. Cursors are saved at most
about once a second while acknowledgements stream in, so after a crash the cursor may
lag what was acknowledged: that re-sends entries (duplicates, recognisable by ``seq``),
never skips one. A cursor file that cannot be read is set aside and delivery restarts
from ``seq`` 0, for the same reason.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CURSOR_DIR = "upstream"
_VERSION = 1


@dataclass
class Cursor:
    """Where one upstream stands; see the module docstring for each field."""

    upstream: str
    log: str = ""
    acked: int = -1
    confirmed: int = -1
    checkpoints: int = 0
    offset: int = 0


class CursorStore:
    """Loads and saves the cursor of upstream ``name`` in ``data_dir``."""

    def __init__(self, data_dir: Path, name: str) -> None:
        self.path = Path(data_dir) / CURSOR_DIR / f"{name}.cursor.json"
        self.name = name

    def load(self, log_id: str) -> Cursor:
        """Return the stored cursor, or a fresh one when none fits this log.

        A missing file, one of another log (``log_id`` differs) or an unreadable one
        gives a cursor at the start; an unreadable file is kept beside as
        ``*.bad`` and a warning is logged. Never raises for file content.
        """
        fresh = Cursor(self.name, log=log_id)
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return fresh
        except OSError as exc:
            log.warning(
                "cannot read an upstream cursor; delivering from the start",
                extra={"kv": {"file": str(self.path), "error": exc.strerror}},
            )
            return fresh
        try:
            data = json.loads(raw)
            cursor = Cursor(
                upstream=self.name,
                log=str(data["log"]),
                acked=_int(data["acked"]),
                confirmed=_int(data.get("confirmed", -1)),
                checkpoints=_int(data.get("checkpoints", 0)),
                offset=_int(data.get("offset", 0)),
            )
        except (ValueError, KeyError, TypeError):
            bad = self.path.with_suffix(".bad")
            with contextlib.suppress(OSError):
                os.replace(self.path, bad)
            log.warning(
                "an upstream cursor file is damaged; delivering from the start "
                "(duplicates, never gaps)",
                extra={"kv": {"file": str(self.path), "kept_as": str(bad)}},
            )
            return fresh
        if cursor.log != log_id:
            log.warning(
                "the upstream cursor belongs to another evidence log; delivering "
                "this log from the start",
                extra={"kv": {"upstream": self.name, "file": str(self.path)}},
            )
            return fresh
        return cursor

    def save(self, cursor: Cursor) -> None:
        """Replace the stored cursor atomically (temporary file, fsync, rename).

        Raises ``OSError`` when the directory cannot be written; the caller keeps
        going with its in-memory cursor (a stale file only causes duplicates).
        """
        self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        data = asdict(cursor)
        data["v"] = _VERSION
        body = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, body + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("not an integer")
    return value
