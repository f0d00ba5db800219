"""What the agent keeps on disk per charger: the journal, its cursor, a small state.

Files in ``<data_dir>/ocpp/<charger id>/``:

- ``journal.jsonl``: the billing-critical messages of the charger (transactions and
  meter values), one JSON line each ``{"n", "t", "v", "a", "id", "p"}`` — entry
  number, gateway time (UTC ms), OCPP version, action, the charger's message id and
  the payload with its numbers exactly as sent. An entry is written and fsynced
  before the charger gets its answer, so an acknowledged message survives a crash
  or a power cut.
- ``cursor.json``: ``{"n", "offset"}``, the next entry the CSMS has not confirmed and
  its byte offset, rewritten in place (one ``pwrite`` of a fixed-size record).
  Replay reads from there in order, from disk, so an outage of any length costs
  disk, never memory. When everything is delivered and the journal has grown past
  256 KiB it is cut back to zero bytes, so its size is bounded by the longest outage.
- ``state.json``: small and bounded: the local transaction ids given while the CSMS
  was away and the CSMS ids they map to, the authorisation cache, the last
  BootNotification per version, the open transactions. Replaced atomically.

Durability: journal appends are fsynced; the cursor is written in place and not
fsynced, so a power cut can make the CSMS see messages twice (an unreadable cursor
means: replay the whole journal), never miss one.
A torn last journal line (a crash mid-write) is cut on open: it was never answered.

Errors::

    JournalError    a file cannot be read or written; says which and why
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ies_drivers.ocpp.rpc import dumps, loads
from ies_drivers.ocpp.versions import OcppVersion, UnknownVersionError

log = logging.getLogger(__name__)

JOURNAL_FILE = "journal.jsonl"
CURSOR_FILE = "cursor.json"
STATE_FILE = "state.json"
AUTH_CACHE_MAX = 1000
"""Authorisation cache entries kept per charger (oldest dropped first)."""
TX_MAP_MAX = 256
"""Local → CSMS transaction id pairs kept per charger (oldest dropped first)."""
READ_CHUNK = 65536
CURSOR_BYTES = 64
"""Size of the cursor record (JSON padded with spaces), written with one pwrite."""
COMPACT_BYTES = 256 * 1024
"""The journal is cut back to zero once everything is delivered and it is this big."""


class JournalError(Exception):
    """A journal, cursor or state file cannot be read or written."""


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One billing-critical message as the charger sent it.

    ``n`` numbers entries per charger from 0; ``offset``/``end`` are its bytes in the
    journal file; ``t_ms`` is when the agent received it.
    """

    n: int
    t_ms: int
    version: OcppVersion
    action: str
    unique_id: str
    payload: dict[str, Any]
    offset: int = 0
    end: int = 0


@dataclass
class ChargerState:
    """The small persistent state of one charger (``state.json``).

    ``next_local_tx`` is the next local OCPP 1.6 transaction id to give; ``pending``
    maps a journal entry number to the local id given for its StartTransaction;
    ``tx_map`` maps local ids to the CSMS's; ``boots`` holds the last
    BootNotification payload per version; ``auth`` the authorisation cache
    (idTag → {"info": idTagInfo, "t": ms}); ``open_tx`` the open transactions
    (``ies_agent.ocpp.transactions``).
    """

    next_local_tx: int = 0
    pending: dict[str, int] = field(default_factory=dict)
    tx_map: dict[str, int] = field(default_factory=dict)
    boots: dict[str, dict[str, Any]] = field(default_factory=dict)
    auth: dict[str, dict[str, Any]] = field(default_factory=dict)
    open_tx: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "next_local_tx": self.next_local_tx,
            "pending": self.pending,
            "tx_map": self.tx_map,
            "boots": self.boots,
            "auth": self.auth,
            "open_tx": self.open_tx,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ChargerState:
        return cls(
            next_local_tx=int(data.get("next_local_tx", 0)),
            pending=dict(data.get("pending", {})),
            tx_map=dict(data.get("tx_map", {})),
            boots=dict(data.get("boots", {})),
            auth=dict(data.get("auth", {})),
            open_tx=dict(data.get("open_tx", {})),
        )


class ChargerStore:
    """The journal, cursor and state of one charger; open with :meth:`open`.

    Not thread-safe: use it from the event loop's thread only.
    """

    def __init__(
        self, directory: Path, fd: int, cursor_fd: int, state: ChargerState
    ) -> None:
        """Internal: use :meth:`open`."""
        self.directory = directory
        self.state = state
        self._fd = fd
        self._cursor_fd = cursor_fd
        self._size = 0
        self._next_n = 0
        self._cursor_n = 0
        self._cursor_offset = 0
        self._peeked: JournalEntry | None = None

    @classmethod
    def open(cls, directory: Path) -> ChargerStore:
        """Open (or create) the files in ``directory``; cut a torn journal tail.

        Raises :class:`JournalError` when the directory or a file is unusable.
        """
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o750)
            state = _read_state(directory / STATE_FILE)
            fd = os.open(
                directory / JOURNAL_FILE, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640
            )
        except OSError as exc:
            raise JournalError(f"cannot open {directory}: {exc.strerror}") from None
        try:
            cursor_fd = os.open(directory / CURSOR_FILE, os.O_RDWR | os.O_CREAT, 0o640)
        except OSError as exc:
            os.close(fd)
            raise JournalError(f"cannot open {directory}: {exc.strerror}") from None
        store = cls(directory, fd, cursor_fd, state)
        try:
            store._recover()
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        """Close the journal file (appends after this raise ``JournalError``)."""
        if self._fd >= 0:
            os.close(self._fd)
            os.close(self._cursor_fd)
            self._fd = -1

    # --- journal ----------------------------------------------------------------------

    @property
    def backlog(self) -> int:
        """Entries not yet confirmed by the CSMS."""
        return self._next_n - self._cursor_n

    @property
    def next_n(self) -> int:
        """Number the next appended entry gets."""
        return self._next_n

    def append(
        self,
        version: OcppVersion,
        action: str,
        unique_id: str,
        payload: dict[str, Any],
        t_ms: int | None = None,
    ) -> JournalEntry:
        """Append one message and fsync it; return its entry.

        Raises :class:`JournalError` when it cannot be written durably; the caller
        must then not acknowledge the message.
        """
        n = self._next_n
        t_ms = int(time.time() * 1000) if t_ms is None else t_ms
        record: dict[str, Any] = {
            "n": n,
            "t": t_ms,
            "v": version.value,
            "a": action,
            "id": unique_id,
            "p": payload,
        }
        line = (dumps(record) + "\n").encode()
        try:
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(0, f"short write ({written} of {len(line)} bytes)")
            os.fdatasync(self._fd)
        except OSError as exc:
            # A partial line is cut at the next open; nothing was answered.
            raise JournalError(
                f"cannot write {self.directory / JOURNAL_FILE}: {exc.strerror}"
            ) from None
        offset = self._size
        self._size += len(line)
        self._next_n = n + 1
        entry = JournalEntry(
            n, t_ms, version, action, unique_id, payload, offset, offset + len(line)
        )
        if n == self._cursor_n:
            self._peeked = entry  # the next to deliver: no need to read it back
        return entry

    def peek(self) -> JournalEntry | None:
        """Return the oldest entry the CSMS has not confirmed, read from disk."""
        if self._cursor_n >= self._next_n:
            return None
        if self._peeked is not None and self._peeked.n == self._cursor_n:
            return self._peeked
        line = self._read_line(self._cursor_offset)
        entry = _parse_entry(line, self._cursor_offset)
        if entry is None:
            raise JournalError(
                f"{self.directory / JOURNAL_FILE}: entry at byte {self._cursor_offset} "
                "is unreadable"
            )
        self._peeked = entry
        return entry

    def advance(self, entry: JournalEntry) -> None:
        """Mark ``entry`` (the one :meth:`peek` returned) as confirmed by the CSMS.

        When nothing is left the journal is cut back to zero bytes. Raises
        :class:`JournalError` when the cursor cannot be written.
        """
        if entry.n != self._cursor_n:
            raise JournalError(
                f"advance past entry {entry.n}, cursor is {self._cursor_n}"
            )
        self._cursor_n = entry.n + 1
        self._cursor_offset = entry.end
        self._peeked = None
        if self._cursor_n == self._next_n and self._size >= COMPACT_BYTES:
            try:
                os.ftruncate(self._fd, 0)
            except OSError as exc:
                raise JournalError(
                    f"cannot truncate {self.directory / JOURNAL_FILE}: {exc.strerror}"
                ) from None
            self._size = 0
            self._cursor_offset = 0
        self._write_cursor()

    # --- state ------------------------------------------------------------------------

    def save_state(self) -> None:
        """Replace ``state.json`` atomically (write, fsync, rename).

        Raises :class:`JournalError` when it cannot be written.
        """
        state = self.state
        while len(state.auth) > AUTH_CACHE_MAX:
            state.auth.pop(next(iter(state.auth)))
        while len(state.tx_map) > TX_MAP_MAX:
            state.tx_map.pop(next(iter(state.tx_map)))
        _atomic_write(
            self.directory / STATE_FILE, dumps(state.to_json()).encode(), fsync=True
        )

    # --- internals --------------------------------------------------------------------

    def _recover(self) -> None:
        """Find the entries on disk, cut a torn tail, load the cursor."""
        path = self.directory / JOURNAL_FILE
        data = _read_file(path)
        good = 0
        last_n: int | None = None
        first_n: int | None = None
        for line in data.splitlines(keepends=True):
            entry = _parse_entry(line, good) if line.endswith(b"\n") else None
            if entry is None:
                break
            first_n = entry.n if first_n is None else first_n
            last_n = entry.n
            good += len(line)
        if good < len(data):
            log.warning(
                "%s: cut %d bytes of a torn journal entry (it was never answered)",
                path,
                len(data) - good,
            )
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, good)
        self._size = good
        cursor = _read_cursor(self.directory / CURSOR_FILE)
        cursor_n, cursor_offset = cursor if cursor else (first_n or 0, 0)
        if last_n is None:
            self._next_n = cursor_n
            self._cursor_n, self._cursor_offset = cursor_n, 0
            return
        self._next_n = last_n + 1
        if cursor_offset > good or cursor_n > self._next_n:
            # The journal was cut back after the cursor moved: all delivered.
            cursor_n, cursor_offset = self._next_n, good
        if first_n is not None and cursor_n < first_n:
            cursor_n, cursor_offset = first_n, 0
        self._cursor_n, self._cursor_offset = cursor_n, cursor_offset

    def _read_line(self, offset: int) -> bytes:
        chunks: list[bytes] = []
        position = offset
        while True:
            try:
                chunk = os.pread(self._fd, READ_CHUNK, position)
            except OSError as exc:
                raise JournalError(
                    f"cannot read {self.directory / JOURNAL_FILE}: {exc.strerror}"
                ) from None
            if not chunk:
                return b"".join(chunks)
            newline = chunk.find(b"\n")
            if newline >= 0:
                chunks.append(chunk[: newline + 1])
                return b"".join(chunks)
            chunks.append(chunk)
            position += len(chunk)

    def _write_cursor(self) -> None:
        text = dumps({"n": self._cursor_n, "offset": self._cursor_offset})
        record = text.encode().ljust(CURSOR_BYTES - 1) + b"\n"
        try:
            os.pwrite(self._cursor_fd, record, 0)
        except OSError as exc:
            raise JournalError(
                f"cannot write {self.directory / CURSOR_FILE}: {exc.strerror}"
            ) from None


def _parse_entry(line: bytes, offset: int) -> JournalEntry | None:
    try:
        record = loads(line)
        return JournalEntry(
            n=int(record["n"]),
            t_ms=int(record["t"]),
            version=OcppVersion.parse(record["v"]),
            action=str(record["a"]),
            unique_id=str(record["id"]),
            payload=dict(record["p"]),
            offset=offset,
            end=offset + len(line),
        )
    except (ValueError, KeyError, TypeError, UnknownVersionError):
        return None


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""
    except OSError as exc:
        raise JournalError(f"cannot read {path}: {exc.strerror}") from None


def _read_cursor(path: Path) -> tuple[int, int] | None:
    data = _read_file(path)
    if not data:
        return None
    try:
        record = loads(data)
        return int(record["n"]), int(record["offset"])
    except (ValueError, KeyError, TypeError):
        log.warning("%s is unreadable; replaying the whole journal", path)
        return None


def _read_state(path: Path) -> ChargerState:
    data = _read_file(path)
    if not data:
        return ChargerState()
    try:
        return ChargerState.from_json(loads(data))
    except (ValueError, TypeError, AttributeError) as exc:
        raise JournalError(
            f"{path} is unreadable ({exc}); move it aside to start afresh"
        ) from None


def _atomic_write(path: Path, data: bytes, *, fsync: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, data)
            if fsync:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        raise JournalError(f"cannot write {path}: {exc.strerror}") from None
