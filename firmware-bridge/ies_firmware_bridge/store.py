"""What the bridge keeps on disk: the file cache, transfer records, the event outbox.

Layout::

    <cache_dir>/objects/<sha256>        a verified file, named by its SHA-256
    <cache_dir>/objects/<sha256>.json   what it is: name, size, source, verified by
    <cache_dir>/partial/<transfer>.part a download in progress (resumed from its size)
    <cache_dir>/uploads/<transfer>.bin  a charger's diagnostics file, until forwarded
    <state_dir>/transfers/<id>.json     one record per transfer
    <state_dir>/outbox.jsonl            evidence events not yet taken by the agent
    <state_dir>/outbox.ack              the last event seq the agent appended

Everything is written to a temporary name, flushed and renamed, so a power cut leaves
either the old or the new file. The cache is content addressed: the same image asked
for twice is downloaded once. The quota covers objects, ``.part`` files and uploads;
to make room the least recently used objects not needed by a live transfer go first.

Errors::

    StoreError       base
    └── QuotaError   a file cannot fit in the quota even after evicting what may go
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_SHA256 = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")
OUTBOX_MAX_EVENTS = 10_000
"""Events kept for the agent at most; beyond this the oldest are summarised."""


class StoreError(Exception):
    """Raised when the bridge's files cannot be read or written."""


class QuotaError(StoreError):
    """Raised when a file cannot fit in the cache quota."""


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a flushed temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


# --- the cache ------------------------------------------------------------------------


@dataclass(frozen=True)
class CachedFile:
    """One verified file in the cache; ``size`` in bytes, times in ms since epoch."""

    sha256: str
    size: int
    name: str
    source: str
    verified_by: str
    stored_ms: int
    used_ms: int


class FileCache:
    """Content-addressed verified files, partial downloads and uploads, in a quota."""

    def __init__(self, root: Path, quota_bytes: int) -> None:
        self.root = Path(root)
        self.quota_bytes = quota_bytes
        self.objects = self.root / "objects"
        self.partial = self.root / "partial"
        self.uploads = self.root / "uploads"
        for directory in (self.objects, self.partial, self.uploads):
            directory.mkdir(parents=True, exist_ok=True)
        for stale in self.objects.glob("*.tmp"):
            stale.unlink(missing_ok=True)

    def path_of(self, sha256: str) -> Path:
        """Where the verified file ``sha256`` is (whether or not it exists)."""
        if not _SHA256.fullmatch(sha256):
            raise StoreError(f"{sha256!r} is not a SHA-256 hex digest")
        return self.objects / sha256

    def get(self, sha256: str) -> CachedFile | None:
        """The cached file with that hash, or ``None``."""
        path = self.path_of(sha256)
        meta = path.with_name(sha256 + ".json")
        if not path.is_file() or not meta.is_file():
            return None
        try:
            info = json.loads(meta.read_text())
            cached = CachedFile(**info)
        except (OSError, ValueError, TypeError):
            return None
        if cached.size != path.stat().st_size:
            return None
        return cached

    def touch(self, sha256: str) -> None:
        """Mark the file as used now (for least-recently-used eviction)."""
        cached = self.get(sha256)
        if cached is not None:
            self._write_meta(CachedFile(**{**asdict(cached), "used_ms": _now_ms()}))

    def part_path(self, transfer_id: str) -> Path:
        return self.partial / f"{_checked_id(transfer_id)}.part"

    def upload_path(self, transfer_id: str) -> Path:
        return self.uploads / f"{_checked_id(transfer_id)}.bin"

    def commit(
        self, part: Path, sha256: str, *, name: str, source: str, verified_by: str
    ) -> CachedFile:
        """Move the verified ``part`` into the cache under its hash."""
        target = self.path_of(sha256)
        size = part.stat().st_size
        os.replace(part, target)
        now = _now_ms()
        cached = CachedFile(sha256, size, name, source, verified_by, now, now)
        self._write_meta(cached)
        return cached

    def files(self) -> list[CachedFile]:
        """Every verified file, most recently used first."""
        found = []
        for meta in self.objects.glob("*.json"):
            cached = self.get(meta.stem) if _SHA256.fullmatch(meta.stem) else None
            if cached is not None:
                found.append(cached)
        return sorted(found, key=lambda c: c.used_ms, reverse=True)

    def used_bytes(self) -> int:
        """Bytes in objects, ``.part`` files and uploads."""
        total = 0
        for directory in (self.objects, self.partial, self.uploads):
            for path in directory.iterdir():
                with contextlib.suppress(OSError):
                    total += path.stat().st_size
        return total

    def make_room(self, needed_bytes: int, keep: Iterable[str] = ()) -> list[str]:
        """Evict least recently used objects (not in ``keep``) until ``needed_bytes``
        more fit in the quota; return the evicted hashes.

        Raises :class:`QuotaError` when even evicting everything allowed is not enough.
        """
        if needed_bytes > self.quota_bytes:
            raise QuotaError(
                f"{needed_bytes} bytes is more than the whole cache quota "
                f"({self.quota_bytes} bytes): raise quota_mb"
            )
        kept = set(keep)
        evicted: list[str] = []
        candidates = [c for c in reversed(self.files()) if c.sha256 not in kept]
        while self.used_bytes() + needed_bytes > self.quota_bytes:
            if not candidates:
                raise QuotaError(
                    f"{needed_bytes} bytes do not fit: the cache holds "
                    f"{self.used_bytes()} of {self.quota_bytes} bytes in files still "
                    "in use"
                )
            victim = candidates.pop(0)
            self.path_of(victim.sha256).unlink(missing_ok=True)
            self.objects.joinpath(victim.sha256 + ".json").unlink(missing_ok=True)
            evicted.append(victim.sha256)
        return evicted

    def _write_meta(self, cached: CachedFile) -> None:
        data = json.dumps(asdict(cached), sort_keys=True).encode()
        write_atomic(self.objects / f"{cached.sha256}.json", data)


# --- transfers ------------------------------------------------------------------------


@dataclass
class Transfer:
    """One file moving through the bridge: a firmware image or a diagnostics file.

    ``kind`` is ``firmware`` or ``upload``; ``state`` one of ``downloading``,
    ``ready`` (verified, served), ``rejected`` (failed verification: never served),
    ``failed`` (could not be downloaded or forwarded), ``waiting`` (an upload target
    not used yet), ``received``, ``forwarded``. Times in ms since the epoch; sizes in
    bytes.
    """

    id: str
    token: str
    kind: str
    charger: str
    ocpp: str
    action: str
    location: str
    state: str
    created_ms: int
    request_id: int | None = None
    name: str = ""
    signing_certificate: str | None = None
    signature: str | None = None
    expected_sha256: str | None = None
    expected_size: int | None = None
    sha256: str | None = None
    size: int | None = None
    trust: str = ""
    reason: str = ""
    status: str = ""
    validator: str = ""
    served: int = 0
    charger_status: str = ""
    content_type: str = ""
    method: str = ""
    updated_ms: int = 0
    history: list[str] = field(default_factory=list)

    @property
    def final(self) -> bool:
        """Nothing more will happen to it without a new request."""
        return self.state in ("rejected", "failed", "forwarded")

    def summary(self) -> dict[str, Any]:
        """What ``ies-agent firmware list`` shows (no tokens, no signatures)."""
        shown = {
            k: v
            for k, v in asdict(self).items()
            if k not in ("token", "signing_certificate", "signature", "history")
        }
        shown["location"] = redact(self.location)
        return shown


class TransferBook:
    """Transfer records, one JSON file each, loaded at start."""

    def __init__(self, directory: Path, keep: int = 200) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.by_id: dict[str, Transfer] = {}
        self.by_token: dict[str, Transfer] = {}
        for path in sorted(self.directory.glob("*.json")):
            try:
                transfer = Transfer(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                continue
            self._index(transfer)

    def add(self, transfer: Transfer) -> None:
        self._index(transfer)
        self.save(transfer)
        self._prune()

    def save(self, transfer: Transfer) -> None:
        transfer.updated_ms = _now_ms()
        data = json.dumps(asdict(transfer), sort_keys=True).encode()
        write_atomic(self.directory / f"{_checked_id(transfer.id)}.json", data)

    def recent(self, limit: int = 50) -> list[Transfer]:
        return sorted(self.by_id.values(), key=lambda t: t.created_ms, reverse=True)[
            :limit
        ]

    def live(self) -> list[Transfer]:
        return [t for t in self.by_id.values() if not t.final]

    def _index(self, transfer: Transfer) -> None:
        self.by_id[transfer.id] = transfer
        self.by_token[transfer.token] = transfer

    def _prune(self) -> None:
        old = [t for t in self.recent(len(self.by_id)) if t.final][self.keep :]
        for transfer in old:
            self.by_id.pop(transfer.id, None)
            self.by_token.pop(transfer.token, None)
            (self.directory / f"{transfer.id}.json").unlink(missing_ok=True)


# --- the event outbox -----------------------------------------------------------------


class Outbox:
    """Evidence events waiting for the agent, kept until it says it appended them.

    Events carry a ``seq`` (per bridge, from 1). They are sent again on every
    connection until acknowledged, so an event is appended at least once; the agent
    records ``bseq`` so a repeat is recognisable.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "outbox.jsonl"
        self.ack_path = Path(state_dir) / "outbox.ack"
        self.events: list[dict[str, Any]] = []
        self.acked = 0
        with contextlib.suppress(OSError, ValueError):
            self.acked = int(self.ack_path.read_text().strip() or 0)
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if isinstance(event, dict) and event.get("seq", 0) > self.acked:
                        self.events.append(event)
        last = max((e["seq"] for e in self.events), default=self.acked)
        self.next_seq = last + 1
        self._handle = self.path.open("a", encoding="utf-8")

    def add(self, ev: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Queue event ``ev``; return it with its ``seq``."""
        event = {"seq": self.next_seq, "ev": ev, "fields": fields}
        self.next_seq += 1
        self._handle.write(json.dumps(event, sort_keys=True) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.events.append(event)
        if len(self.events) > OUTBOX_MAX_EVENTS:
            dropped = len(self.events) - OUTBOX_MAX_EVENTS
            del self.events[:dropped]
        return event

    def ack(self, seq: int) -> None:
        """The agent appended every event up to ``seq``."""
        if seq <= self.acked:
            return
        self.acked = seq
        write_atomic(self.ack_path, str(seq).encode())
        self.events = [e for e in self.events if e["seq"] > seq]
        if not self.events:
            self._handle.close()
            write_atomic(self.path, b"")
            self._handle = self.path.open("a", encoding="utf-8")

    def pending(self) -> list[dict[str, Any]]:
        return list(self.events)

    def close(self) -> None:
        self._handle.close()


def redact(url: str) -> str:
    """``url`` without its query and user info (signed URLs carry secrets there)."""
    head = url.split("?", 1)[0].split("#", 1)[0]
    scheme, sep, rest = head.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        rest = rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"


def _checked_id(value: str) -> str:
    if not _ID.fullmatch(value):
        raise StoreError(f"{value!r} is not a transfer id")
    return value


def _now_ms() -> int:
    return int(time.time() * 1000)
