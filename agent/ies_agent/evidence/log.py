"""The evidence log writer: every reading and event, one signed, append-only line each.

Files in the data directory (the layout the verifier reads too):

- ``evidence.jsonl``: one canonical JSON entry per line (see ``canonical``),
  ``\\n``-terminated; the stored bytes are the hashed bytes. Each entry carries ``seq``
  (0-based, contiguous), ``prev`` (base64 SHA-256 of the previous line), gateway time
  ``t`` with its quality ``tq``, the monotonic clock ``mono`` (µs, declared by
  ``mono_unit`` in the boot event) and the ``boot``
  counter; readings add ``src`` and ``sseq`` (per source, contiguous across boots).
- ``checkpoints.jsonl``: one line ``{"note": <signed note>, "size": N}`` per checkpoint.
  A checkpoint first appends a ``checkpoint`` event, then signs the RFC 6962 root of the
  first ``seq + 1`` entries, so the note covers its own event. The Merkle frontier is
  kept in memory (rebuilt on open), so a checkpoint costs O(log n) hashes, whatever the
  size of the log.
- ``keys/``: the signing key and key card (``ies_agent.evidence.keys``).
- ``lock``: ``flock``-ed while a writer has the log open; the kernel drops the lock when
  the process dies, so a crash never leaves a stale lock.
- ``evidence.jsonl.cut-boot<N>``: bytes cut from a torn tail when boot ``N`` started,
  kept for inspection (never hashed, never read back).

Durability policy. Each entry is written with one ``write(2)`` on an ``O_APPEND``
descriptor (no user-space buffer), so an entry survives a kill of the process as soon
as its append returns. It survives a power cut once fsynced (``fdatasync(2)``): at the
first append at least ``fsync_interval_s`` after the previous fsync, on every
:meth:`EvidenceLog.sync`, at every checkpoint (the log before the checkpoint file, so a
checkpoint never covers entries that could be lost), at ``shutdown``, and right after
``boot`` and ``key_rotation`` events. :attr:`EvidenceLog.durable_seq` is the highest
fsynced ``seq``; a caller that must not lose an entry calls :meth:`~EvidenceLog.sync`
and reports only what it returns. ``fsync_interval_s=0`` fsyncs every entry.

Crash recovery on open. A power cut can leave a partial last line, or (on some file
systems) blocks of zeros, after the last fsync. Entries up to the last checkpoint are
trusted as fsynced; every line after it must be complete, canonical and carry the next
``seq`` and the right ``prev``. At the first line that is not, the file is cut back
(the cut bytes are kept in ``evidence.jsonl.cut-boot<N>``) and the ``boot`` event says
so: ``recovered: {"truncated_bytes": n, "last_seq": s}`` (``s`` is -1 when nothing was
left). Fsynced data never needs cutting, so no entry reported durable is lost. A torn
last line of ``checkpoints.jsonl`` is cut likewise (``checkpoints_truncated_bytes``).
The ``boot`` event also says whether the previous run ended with ``shutdown``
(``prev_shutdown``: ``clean`` or ``unclean``; absent on the first boot).

The writer refuses to start (:class:`LogRollbackError`) when the checkpoints cover
more entries than the log holds, or the log's root at a checkpoint's size is not the
signed one: the log was replaced by an older copy, cut short or altered, and writing on
would hide that. It refuses likewise (:class:`UnsignedHistoryError`) when signatures
went missing: every ``checkpoint`` event must have its note in ``checkpoints.jsonl``,
and the newest note must verify with the gateway's current or a retired key. Only one
note may be missing: that of the last checkpoint event of a run that died between
logging the event and signing it. The next start leaves it unsigned (it cannot sign
past history honestly), reports ``prev_shutdown: unclean`` and names it in
``unsigned_checkpoint``; the next checkpoint covers its entries. Without an outside
copy of the checkpoints, a writer cannot tell a log whose signed tail was cut off
together with its checkpoint events from a shorter honest one: the upstream's copy
(``ies-agent verify --checkpoint``) can.

Time. Each entry uses gateway time from its Reading (when stamped) or from the clock.
Within one boot, when wall time and the monotonic clock disagree by more than 2 s
between two entries, a ``time_step`` event (``delta_ms``: the wall-clock jump beyond
the monotonic time elapsed) is appended before the entry; when the time quality moves
to or from ``S`` (synchronised), a ``time_sync`` event (``state``: ``gained`` or
``lost``) is.

An :class:`EvidenceLog` is not thread-safe: call it from one thread at a time.

Errors (tree in ``ies_agent.evidence.errors``; one more here)::

    EvidenceError                  a file could not be read or written
    ├── EvidenceFormatError        an entry that cannot be stored
    ├── KeyFileError               the signing key is missing, loose or unreadable
    ├── LogLockedError             another agent holds the data directory
    └── LogRollbackError           the log is shorter than, or not, what was signed
        └── UnsignedHistoryError   signatures over the log missing or not ours
"""

from __future__ import annotations

import base64
import calendar
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from ies_agent import __version__
from ies_agent.clock import Clock, SystemClock, Timestamp
from ies_agent.evidence import keys as keystore
from ies_agent.evidence.canonical import canonical_bytes, parse_entry
from ies_agent.evidence.errors import (
    EvidenceError,
    EvidenceFormatError,
    LogLockedError,
    LogRollbackError,
    NoteError,
)
from ies_agent.evidence.merkle import MerkleFrontier
from ies_agent.evidence.note import (
    NoteSigner,
    checkpoint_text,
    open_note,
    parse_checkpoint,
    parse_vkey,
    sign_note,
    split_note,
)
from ies_drivers.reading import Reading, ReadingState

LOG_FILE = "evidence.jsonl"
CHECKPOINTS_FILE = "checkpoints.jsonl"
LOCK_FILE = "lock"
SCHEMA_VERSION = 1
TIME_STEP_LIMIT_MS = 2000
"""Wall-clock vs monotonic disagreement (ms) between two entries that is a step."""

RESERVED_EVENTS = frozenset({"boot", "checkpoint", "shutdown", "key_rotation"})
"""Event kinds only the log itself appends (each has its own method)."""
_ENTRY_FIELDS = frozenset(
    {"v", "seq", "type", "t", "tq", "mono", "boot", "prev", "ev", "src", "sseq"}
)
_DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?")
# In canonical JSON a quote inside a string is escaped, so these match keys only.
_READING_FIELDS = re.compile(rb'"src":"([^"\\]*)","sseq":([0-9]+)[,}]')
_EVENT_KIND = re.compile(rb'"ev":"([^"\\]*)"')

logger = logging.getLogger(__name__)


class UnsignedHistoryError(LogRollbackError):
    """The signatures over the log are missing, cut or not this gateway's.

    Raised by :meth:`EvidenceLog.open` when ``checkpoints.jsonl`` is gone while the
    log holds ``checkpoint`` events, lacks the note of such an event (other than the
    one a crash can leave unsigned), holds a record that is not a signed note, or
    its newest note does not verify with the gateway's keys. Signing on would vouch
    for history nobody can check any more.
    """


def default_origin(gateway_id: str) -> str:
    """Return the checkpoint origin (log name) used when none is configured."""
    return f"ies-agent/{gateway_id}/log-1"


def format_time(t_ms: int) -> str:
    """Return UTC milliseconds ``t_ms`` as ``YYYY-MM-DDTHH:MM:SS.mmmZ``."""
    seconds, millis = divmod(t_ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def parse_time_ms(text: str) -> int | None:
    """Return ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (the form ``format_time`` writes) as UTC
    milliseconds, or ``None`` for any other text."""
    try:
        moment = time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S")
        millis = int(text[20:23]) if text[19:20] == "." and text[23:] == "Z" else -1
    except ValueError:
        return None
    if millis < 0:
        return None
    return calendar.timegm(moment) * 1000 + millis


@dataclass
class _Scan:
    """What a pass over ``evidence.jsonl`` found (see ``_scan_log``)."""

    size: int = 0
    good_bytes: int = 0
    file_bytes: int = 0
    frontier: MerkleFrontier = field(default_factory=MerkleFrontier)
    last_line: bytes | None = None
    sseq: dict[str, int] = field(default_factory=dict)
    last_boot: int = 0
    clean_end: bool = False
    rotation: dict[str, Any] | None = None
    rotation_seq: int = -1
    rotation_abandoned: bool = False
    roots: dict[int, bytes] = field(default_factory=dict)
    """Root of the first N entries, for every size N a checkpoint signs."""
    checkpoint_events: list[int] = field(default_factory=list)
    """Seq of every ``checkpoint`` event."""
    unclean_boot_after: set[int] = field(default_factory=set)
    """Seqs of ``checkpoint`` events directly followed by a boot that says
    ``prev_shutdown: unclean`` (the agent died while signing them)."""


@dataclass
class _Checkpoints:
    """What a pass over ``checkpoints.jsonl`` found."""

    good_bytes: int = 0
    file_bytes: int = 0
    exists: bool = False
    notes: list[tuple[int, str]] = field(default_factory=list)

    @property
    def max_size(self) -> int:
        return max((size for size, _ in self.notes), default=0)

    @property
    def last_note(self) -> str | None:
        return self.notes[-1][1] if self.notes else None


class EvidenceLog:
    """The writer of one gateway's evidence log; create it with :meth:`open`.

    Appends return the new entry's ``seq``. The log is open until :meth:`close`
    (or the end of a ``with`` block), which appends ``shutdown`` and a checkpoint.
    """

    def __init__(
        self,
        *,
        data_dir: Path,
        origin: str,
        gateway_id: str,
        clock: Clock,
        fsync_interval_s: float,
        lock_fd: int,
        log_fd: int,
        checkpoints_fd: int,
        key: keystore.SigningKey,
        scan: _Scan,
        last_checkpoint: str | None,
    ) -> None:
        """Internal: use :meth:`open`."""
        self.data_dir = data_dir
        self.origin = origin
        self.gateway_id = gateway_id
        self._clock = clock
        self._fsync_interval_ns = int(fsync_interval_s * 1e9)
        self._lock_fd = lock_fd
        self._log_fd = log_fd
        self._checkpoints_fd = checkpoints_fd
        self._key = key
        self._signer = key.signer(origin)
        self._handover_signer: NoteSigner | None = None
        self._frontier = scan.frontier
        self._size = scan.size
        self._offset = scan.good_bytes
        self._prev = _b64_sha256(scan.last_line) if scan.last_line is not None else None
        self._sseq = dict(scan.sseq)
        self._boot = scan.last_boot + 1
        self._durable_seq = -1
        self._synced_ns = time.monotonic_ns()
        self._last_checkpoint = last_checkpoint
        self._time_offset_ms: int | None = None
        self._synced_time: bool | None = None
        self._closed = False
        self._broken: str | None = None
        self._listeners: list[Callable[[str, int], None]] = []

    # --- opening ----------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        data_dir: Path,
        *,
        gateway_id: str,
        origin: str | None = None,
        key_alg: str = keystore.ALG_ECDSA_P256,
        clock: Clock | None = None,
        interval_s: int = 900,
        tz: str = "Asia/Kolkata",
        cfg_hash: str = "",
        fsync_interval_s: float = 1.0,
    ) -> EvidenceLog:
        """Open (or create) the log in ``data_dir`` and append its ``boot`` event.

        Creates the directory and the signing key (``key_alg``: ``ecdsa-p256`` or
        ``ed25519``; an existing key is kept) on first start, takes the lock, cuts a
        torn tail, rebuilds the Merkle frontier and per-source counters from the file,
        finishes an interrupted key rotation, and appends ``boot``. ``origin`` names the
        log in checkpoints (default ``ies-agent/<gateway_id>/log-1``); ``interval_s``,
        ``tz`` and ``cfg_hash`` are recorded in the ``boot`` event.

        Raises ``LogLockedError`` when another process holds the data directory,
        ``LogRollbackError`` when the log holds less than, or other than, what its
        checkpoints signed, ``UnsignedHistoryError`` (a ``LogRollbackError``) when
        checkpoint notes are missing or the newest does not verify,
        ``KeyFileError`` for a missing, loose or unreadable key, and
        ``EvidenceError`` when the files cannot be read or written.
        """
        data_dir = Path(data_dir)
        origin = origin or default_origin(gateway_id)
        clock = clock if clock is not None else SystemClock()
        try:
            data_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        except OSError as exc:
            raise EvidenceError(
                f"cannot create data directory {data_dir}: {exc.strerror}"
            ) from None
        lock_fd = _take_lock(data_dir)
        fds = [lock_fd]
        try:
            log_path = data_dir / LOG_FILE
            checkpoints = _scan_checkpoints(data_dir / CHECKPOINTS_FILE)
            sizes = {size for size, _ in checkpoints.notes}
            scan = _scan_log(log_path, checkpoints.max_size, sizes)
            _refuse_rollback(data_dir, scan, checkpoints)
            unsigned = _unsigned_checkpoints(data_dir, scan, checkpoints)
            key_existed = (keystore.keys_dir(data_dir) / keystore.KEY_FILE).exists()
            key = keystore.ensure_key(
                data_dir, gateway_id=gateway_id, origin=origin, alg=key_alg
            )
            if key_existed:
                _check_newest_note(data_dir, checkpoints, key)
            elif scan.size:
                logger.warning(
                    "signing key was missing; created a new one for an existing log",
                    extra={"kv": {"data_dir": str(data_dir), "fp": key.fingerprint}},
                )
            cut = _cut_tail(data_dir, log_path, scan, scan.last_boot + 1)
            cp_cut = _cut_checkpoints(data_dir / CHECKPOINTS_FILE, checkpoints)
            log_fd = _open_append(log_path, 0o640)
            fds.append(log_fd)
            checkpoints_fd = _open_append(data_dir / CHECKPOINTS_FILE, 0o640)
            fds.append(checkpoints_fd)
            keystore.fsync_dir(data_dir)
        except BaseException:
            for fd in reversed(fds):
                os.close(fd)
            raise
        log = cls(
            data_dir=data_dir,
            origin=origin,
            gateway_id=gateway_id,
            clock=clock,
            fsync_interval_s=fsync_interval_s,
            lock_fd=lock_fd,
            log_fd=log_fd,
            checkpoints_fd=checkpoints_fd,
            key=key,
            scan=scan,
            last_checkpoint=checkpoints.last_note,
        )
        try:
            boot: dict[str, Any] = {
                "agent": {"id": gateway_id, "sw": __version__, "cfg": cfg_hash},
                "keys": [{"alg": key.alg_name, "vkey": log._signer.vkey()}],
                "interval_s": interval_s,
                "tz": tz,
                "mono_unit": "us",
            }
            if scan.size:
                # A checkpoint left unsigned means the last run did not finish.
                clean = scan.clean_end and unsigned is None
                boot["prev_shutdown"] = "clean" if clean else "unclean"
            if unsigned is not None:
                boot["unsigned_checkpoint"] = unsigned
                logger.warning(
                    "the last checkpoint was logged but never signed: the agent "
                    "stopped in between; the next checkpoint covers its entries",
                    extra={"kv": {"data_dir": str(data_dir), "seq": unsigned}},
                )
            if cut or cp_cut:
                recovered = {"truncated_bytes": cut, "last_seq": scan.size - 1}
                if cp_cut:
                    recovered["checkpoints_truncated_bytes"] = cp_cut
                boot["recovered"] = recovered
                logger.warning(
                    "recovered the evidence log from a torn tail",
                    extra={"kv": {"data_dir": str(data_dir), **recovered}},
                )
            stamp = log._clock.now()
            log._note_time(stamp)
            log._append_event_entry("boot", boot, stamp)
            log._resume_rotation(scan, checkpoints)
        except BaseException:
            log._release()
            raise
        return log

    # --- appending --------------------------------------------------------------------

    def append_reading(self, reading: Reading) -> int:
        """Append one reading and return its ``seq``.

        The entry takes time, quality and monotonic time from ``reading`` when it was
        stamped (``mono_ns > 0``), else from the clock; ``sseq`` counts per source.
        ``val`` is kept when the reading has a value, ``obis``, ``cum``, ``dt`` and
        ``note`` when set. Raises ``EvidenceFormatError`` when the value is not an
        exact decimal string (or holds what canonical JSON cannot), ``EvidenceError``
        when the log cannot be written.
        """
        self._check_writable()
        if reading.value is not None and not _DECIMAL.fullmatch(reading.value):
            raise EvidenceFormatError(
                f"reading of {reading.source} {reading.quantity}: value "
                f"{reading.value!r} is not an exact decimal string"
            )
        state = ReadingState(reading.state).value
        sseq = self._sseq.get(reading.source, 0)
        fields: dict[str, Any] = {
            "type": "reading",
            "src": reading.source,
            "sseq": sseq,
            "q": reading.quantity,
            "unit": reading.unit,
            "st": state,
            "raw": reading.raw,
        }
        if reading.obis:
            fields["obis"] = reading.obis
        if reading.value is not None:
            fields["val"] = reading.value
        if reading.cumulative:
            fields["cum"] = True
        if reading.device_time:
            fields["dt"] = reading.device_time
        if reading.note:
            fields["note"] = reading.note
        if reading.mono_ns > 0:
            stamp = Timestamp(reading.t_ms, reading.tq, reading.mono_ns)
        else:
            stamp = self._clock.now()
        self._note_time(stamp)
        seq = self._write_entry(fields, stamp)
        self._sseq[reading.source] = sseq + 1
        self._maybe_sync()
        return seq

    def append_event(
        self,
        ev: str,
        fields: Mapping[str, Any] | None = None,
        *,
        src: str | None = None,
    ) -> int:
        """Append an event of kind ``ev`` with extra ``fields``; return its ``seq``.

        ``src`` names the source the event concerns (``source``, ``read_error``).
        Raises ``EvidenceFormatError`` for a kind the log appends itself (``boot``,
        ``checkpoint``, ``shutdown``, ``key_rotation``), for fields that would replace
        an entry field (``seq``, ``t``, ...) or that canonical JSON cannot hold
        (floats), and ``EvidenceError`` when the log cannot be written.
        """
        self._check_writable()
        if not ev or ev in RESERVED_EVENTS:
            raise EvidenceFormatError(
                f"event kind {ev!r} is reserved to the log itself or empty"
            )
        extra = dict(fields or {})
        clash = _ENTRY_FIELDS.intersection(extra)
        if clash:
            raise EvidenceFormatError(
                f"event {ev!r} fields {sorted(clash)} would replace entry fields"
            )
        if src is not None:
            extra["src"] = src
        stamp = self._clock.now()
        self._note_time(stamp)
        seq = self._append_event_entry(ev, extra, stamp)
        self._maybe_sync()
        return seq

    def checkpoint(self) -> str:
        """Append a ``checkpoint`` event, sign the tree over it and return the note.

        The log is fsynced before the note is appended to ``checkpoints.jsonl`` (and
        fsynced), so a checkpoint never covers entries a power cut could take. After a
        key rotation the first checkpoint is signed by both keys. Costs O(log n)
        hashes. Raises ``EvidenceError`` when a file cannot be written; when the note
        could not be stored the log then takes no more entries (until a restart), so
        its event stays the last entry: the one place where a start accepts a
        checkpoint event without its note.
        """
        self._check_writable()
        stamp = self._clock.now()
        self._note_time(stamp)
        self._append_event_entry("checkpoint", {}, stamp)
        self.sync()
        size = self._size
        text = checkpoint_text(self.origin, size, self._frontier.root())
        signers = [self._signer]
        if self._handover_signer is not None:
            signers.append(self._handover_signer)
        note = sign_note(text, signers)
        line = canonical_bytes({"note": note, "size": size}) + b"\n"
        try:
            _write_all(self._checkpoints_fd, line)
            os.fdatasync(self._checkpoints_fd)
        except OSError as exc:
            self._broken = f"checkpoint {size} could not be stored: {exc.strerror}"
            raise EvidenceError(
                f"cannot write checkpoint {size} to "
                f"{self.data_dir / CHECKPOINTS_FILE}: {exc.strerror}"
            ) from None
        self._handover_signer = None
        self._last_checkpoint = note
        if self._listeners:
            self._notify("checkpoint", size)
        return note

    def last_reading_ms(self, source: str, *, max_bytes: int = 32 << 20) -> int | None:
        """Return the gateway time (UTC ms) of ``source``'s latest reading, if any.

        Reads the log backwards from its end (at most ``max_bytes``), so it is cheap
        for a source that was read recently. Used to ask a meter for the intervals
        it recorded while the agent was not running.
        """
        needle = b'"src":' + json.dumps(source).encode()
        path = self.data_dir / LOG_FILE
        with open(path, "rb") as handle:
            end = handle.seek(0, os.SEEK_END)
            tail = b""
            while end > 0 and path.stat().st_size - end < max_bytes:
                start = max(0, end - (1 << 16))
                handle.seek(start)
                chunk = handle.read(end - start) + tail
                lines = chunk.split(b"\n")
                tail = lines[0] if start > 0 else b""
                for line in reversed(lines[1:] if start > 0 else lines):
                    if needle in line and b'"type":"reading"' in line:
                        stamp = json.loads(line).get("t")
                        return parse_time_ms(stamp) if isinstance(stamp, str) else None
                end = start
        return None

    def sync(self) -> int:
        """fsync the log; return the highest durable ``seq`` (-1 if none).

        Raises ``EvidenceError`` when the file cannot be synced.
        """
        if self._durable_seq == self._size - 1:
            return self._durable_seq
        try:
            os.fdatasync(self._log_fd)
        except OSError as exc:
            self._broken = f"fsync failed: {exc.strerror}"
            raise EvidenceError(
                f"cannot fsync {self.data_dir / LOG_FILE}: {exc.strerror}"
            ) from None
        self._durable_seq = self._size - 1
        self._synced_ns = time.monotonic_ns()
        return self._durable_seq

    def rotate_key(self, alg: str | None = None) -> keystore.SigningKey:
        """Replace the signing key (of ``alg``, default the current algorithm).

        Stages the new key, appends a ``key_rotation`` event naming both keys, signs a
        checkpoint with the OLD key, makes the new key current (the old one moves to
        ``keys/retired/``) and has the next checkpoint signed by both. Returns the new
        key. Raises ``KeyFileError`` when key files cannot be written or moved.
        """
        self._check_writable()
        old = self._key
        new = keystore.stage_new_key(self.data_dir, alg or old.alg)
        new_signer = new.signer(self.origin)
        fields = {
            "old_alg": old.alg_name,
            "old_vkey": self._signer.vkey(),
            "old_fingerprint": old.fingerprint,
            "new_alg": new.alg_name,
            "new_vkey": new_signer.vkey(),
            "new_fingerprint": new.fingerprint,
        }
        stamp = self._clock.now()
        self._note_time(stamp)
        self._append_event_entry("key_rotation", fields, stamp)
        self.sync()
        self.checkpoint()
        self._commit_rotation(old, new)
        return self._key

    def close(self) -> None:
        """Append ``shutdown``, checkpoint, fsync and release the data directory.

        Safe to call twice. When the log could not be written earlier, it only releases
        the files. Raises ``EvidenceError`` when the final writes fail (the lock is
        released all the same).
        """
        if self._closed:
            return
        try:
            if self._broken is None:
                stamp = self._clock.now()
                self._note_time(stamp)
                self._append_event_entry("shutdown", {}, stamp)
                self.checkpoint()
        finally:
            self._release()

    def __enter__(self) -> EvidenceLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- listeners --------------------------------------------------------------------

    def add_listener(self, callback: Callable[[str, int], None]) -> None:
        """Call ``callback(kind, n)`` after each new entry and each checkpoint.

        ``kind`` is ``"entry"`` (``n``: its ``seq``, written but not yet fsynced) or
        ``"checkpoint"`` (``n``: the size it signs, already durable). Upstream
        connectors use it to wake up instead of polling. The callback runs inside the
        append, so it must only take note (set an event), never call back into the
        log; an exception it raises is logged and does not fail the append.
        """
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[str, int], None]) -> None:
        """Stop calling ``callback``; unknown callbacks are ignored."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(callback)

    def _notify(self, kind: str, n: int) -> None:
        for callback in list(self._listeners):
            try:
                callback(kind, n)
            except Exception:
                logger.exception("an evidence log listener failed")

    # --- state ------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Number of entries in the log (the next ``seq``)."""
        return self._size

    @property
    def durable_seq(self) -> int:
        """Highest ``seq`` known to be fsynced (-1 if none)."""
        return self._durable_seq

    @property
    def last_checkpoint(self) -> str | None:
        """The most recent signed checkpoint note, or ``None`` if there is none."""
        return self._last_checkpoint

    @property
    def key_fingerprint(self) -> str:
        """SHA-256 hex of the current signing key's SubjectPublicKeyInfo."""
        return self._key.fingerprint

    @property
    def vkey(self) -> str:
        """Signed-note verifier key of the current signing key."""
        return self._signer.vkey()

    @property
    def boot(self) -> int:
        """This run's boot counter (1 on the first start of a log)."""
        return self._boot

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._closed

    def root(self) -> bytes:
        """Return the Merkle root of the log as it stands (O(log n))."""
        return self._frontier.root()

    # --- internals --------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self._closed:
            raise EvidenceError(f"the evidence log in {self.data_dir} is closed")
        if self._broken is not None:
            raise EvidenceError(
                f"the evidence log in {self.data_dir} stopped accepting entries "
                f"({self._broken}); restart the agent to recover it"
            )

    def _append_event_entry(
        self, ev: str, fields: Mapping[str, Any], stamp: Timestamp
    ) -> int:
        seq = self._write_entry({"type": "event", "ev": ev, **fields}, stamp)
        if ev in ("boot", "key_rotation", "shutdown"):
            self.sync()
        return seq

    def _note_time(self, stamp: Timestamp) -> None:
        """Append ``time_step``/``time_sync`` events that explain ``stamp``."""
        offset_ms = stamp.t_ms - stamp.mono_ns // 1_000_000
        if self._time_offset_ms is not None:
            delta_ms = offset_ms - self._time_offset_ms
            if abs(delta_ms) > TIME_STEP_LIMIT_MS:
                self._write_entry(
                    {"type": "event", "ev": "time_step", "delta_ms": delta_ms}, stamp
                )
        self._time_offset_ms = offset_ms
        synced = stamp.tq == "S"
        if self._synced_time is not None and synced != self._synced_time:
            state = "gained" if synced else "lost"
            self._write_entry(
                {"type": "event", "ev": "time_sync", "state": state}, stamp
            )
        self._synced_time = synced

    def _write_entry(self, fields: Mapping[str, Any], stamp: Timestamp) -> int:
        """Encode, write and hash one entry; the log's state moves only on success."""
        seq = self._size
        entry: dict[str, Any] = {
            "v": SCHEMA_VERSION,
            "seq": seq,
            "t": format_time(stamp.t_ms),
            "tq": stamp.tq,
            "mono": stamp.mono_ns // 1_000,  # µs: below 2^53 for 285 years
            "boot": self._boot,
        }
        if self._prev is not None:
            entry["prev"] = self._prev
        entry.update(fields)
        line = canonical_bytes(entry)
        data = line + b"\n"
        try:
            _write_all(self._log_fd, data)
        except OSError as exc:
            self._undo_partial_write(exc)
            raise EvidenceError(
                f"cannot append entry {seq} to {self.data_dir / LOG_FILE}: "
                f"{exc.strerror}; the entry was not recorded"
            ) from None
        digest = hashlib.sha256(line).digest()
        self._frontier.append(hashlib.sha256(b"\x00" + line).digest())
        self._prev = base64.b64encode(digest).decode("ascii")
        self._offset += len(data)
        self._size = seq + 1
        if self._listeners:
            self._notify("entry", seq)
        return seq

    def _undo_partial_write(self, exc: OSError) -> None:
        try:
            os.ftruncate(self._log_fd, self._offset)
        except OSError:
            self._broken = f"a failed write could not be undone: {exc.strerror}"

    def _maybe_sync(self) -> None:
        if time.monotonic_ns() - self._synced_ns >= self._fsync_interval_ns:
            self.sync()

    def _resume_rotation(self, scan: _Scan, checkpoints: _Checkpoints) -> None:
        """Finish a key rotation an earlier run started (see ``rotate_key``)."""
        rotation = scan.rotation
        staged = keystore.load_staged_key(self.data_dir)
        if rotation is None:
            if staged is not None:
                keystore.discard_staged_key(self.data_dir)
            return
        old_fp = rotation.get("old_fingerprint")
        new_fp = rotation.get("new_fingerprint")
        if self._key.fingerprint == old_fp:
            if staged is not None and staged.fingerprint == new_fp:
                # Logged but not switched: checkpoint the rotation under the old key
                # (its own checkpoint may be lost), then switch.
                self.checkpoint()
                self._commit_rotation(self._key, staged)
                return
            if staged is not None:
                keystore.discard_staged_key(self.data_dir)
            if not scan.rotation_abandoned:
                logger.warning(
                    "an interrupted key rotation lost its new key; keeping the old one",
                    extra={"kv": {"fp": self._key.fingerprint}},
                )
                self._write_entry(
                    {
                        "type": "event",
                        "ev": "key_rotation_abandoned",
                        "new_fingerprint": new_fp,
                    },
                    self._clock.now(),
                )
            return
        if staged is not None:
            keystore.discard_staged_key(self.data_dir)
        if self._key.fingerprint != new_fp or not isinstance(old_fp, str):
            return
        vkey = rotation.get("new_vkey")
        if _signed_after(checkpoints, scan.rotation_seq, vkey):
            return
        try:
            old = keystore.load_retired_key(self.data_dir, old_fp)
        except EvidenceError as exc:
            logger.warning(
                "cannot co-sign the first checkpoint after a key rotation",
                extra={"kv": {"reason": str(exc)}},
            )
            return
        self._handover_signer = old.signer(self.origin)

    def _commit_rotation(
        self, old: keystore.SigningKey, new: keystore.SigningKey
    ) -> None:
        key = keystore.commit_rotation(
            self.data_dir, old, new, gateway_id=self.gateway_id, origin=self.origin
        )
        self._handover_signer = self._signer
        self._key = key
        self._signer = key.signer(self.origin)

    def _release(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fd in (self._checkpoints_fd, self._log_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        finally:
            os.close(self._lock_fd)


# --- opening helpers ------------------------------------------------------------------


def _take_lock(data_dir: Path) -> int:
    """Take the exclusive lock on ``data_dir``; return the lock file descriptor."""
    path = data_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise EvidenceError(f"cannot open lock file {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        who = f" (pid {holder})" if holder.isdigit() else ""
        raise LogLockedError(
            f"the evidence log in {data_dir} is in use by another process{who}; "
            f"stop that agent first, or give this one another data directory"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd


def _scan_checkpoints(path: Path) -> _Checkpoints:
    """Read ``checkpoints.jsonl``; trailing torn or invalid lines are not kept."""
    result = _Checkpoints()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return result
    except OSError as exc:
        raise EvidenceError(f"cannot read {path}: {exc.strerror}") from None
    result.exists = True
    result.file_bytes = len(data)
    offset = 0
    for raw in data.splitlines(keepends=True):
        offset += len(raw)
        if not raw.endswith(b"\n"):
            break
        try:
            item = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(item, dict):
            continue
        size, note = item.get("size"), item.get("note")
        if (
            isinstance(size, int)
            and not isinstance(size, bool)
            and isinstance(note, str)
        ):
            result.notes.append((size, note))
            result.good_bytes = offset
    return result


def _scan_log(path: Path, check_size: int, sizes: set[int]) -> _Scan:
    """Read ``evidence.jsonl``: hash every entry, rebuild counters, find a torn tail.

    Lines before ``check_size`` (covered by a checkpoint, hence fsynced) are only
    parsed; from there on each line must be canonical with the expected ``seq`` and
    ``prev``, and the scan stops at the first that is not. The root of the first N
    entries is kept for every N in ``sizes`` (the sizes checkpoints sign), and the
    seq of every ``checkpoint`` event is noted.
    """
    scan = _Scan()
    try:
        stream = path.open("rb")
    except FileNotFoundError:
        return scan
    except OSError as exc:
        raise EvidenceError(f"cannot read {path}: {exc.strerror}") from None
    sha256 = hashlib.sha256
    frontier = scan.frontier
    sseq = scan.sseq
    last_line: bytes | None = None
    after_checkpoint = False
    index = 0
    offset = 0
    with stream:
        for raw in stream:
            if not raw.endswith(b"\n"):
                break
            line = raw[:-1]
            if index < check_size:
                entry = _summarize(line)
            else:
                try:
                    full = parse_entry(line)
                except EvidenceFormatError:
                    break
                if not _continues(full, index, last_line):
                    break
                entry = full
            frontier.append(sha256(b"\x00" + line).digest())
            last_line = line
            offset += len(raw)
            index += 1
            if index in sizes:
                scan.roots[index] = frontier.root()
            if entry is None or entry.get("type") == "reading":
                scan.clean_end = after_checkpoint = False
                src = entry.get("src") if entry else None
                counter = entry.get("sseq") if entry else None
                if isinstance(src, str) and isinstance(counter, int):
                    sseq[src] = max(sseq.get(src, 0), counter + 1)
                continue
            ev = entry.get("ev")
            if ev == "boot" and after_checkpoint:
                started = _summarize(line, full=True) or {}
                if started.get("prev_shutdown") == "unclean":
                    scan.unclean_boot_after.add(index - 2)
            after_checkpoint = ev == "checkpoint"
            if after_checkpoint:
                scan.checkpoint_events.append(index - 1)
            # A clean stop ends with ``shutdown`` and the checkpoint after it.
            if ev == "shutdown":
                scan.clean_end = True
            elif ev != "checkpoint":
                scan.clean_end = False
            if ev == "key_rotation":
                scan.rotation = dict(entry)
                scan.rotation_seq = index - 1
                scan.rotation_abandoned = False
            elif ev == "key_rotation_abandoned":
                scan.rotation_abandoned = True
        scan.file_bytes = stream.seek(0, os.SEEK_END)
    scan.size = index
    scan.good_bytes = offset
    scan.last_line = last_line
    if last_line is not None:
        last = _summarize(last_line, full=True)
        boot = last.get("boot") if last else None
        scan.last_boot = boot if isinstance(boot, int) else 0
    return scan


def _summarize(line: bytes, *, full: bool = False) -> Mapping[str, Any] | None:
    """Return what the scan needs of a trusted entry line, or ``None`` if unreadable.

    Lines covered by a checkpoint were fsynced before it was signed, so they are not
    re-checked here (the verifier does that); reading ``src``/``sseq`` or ``ev`` with
    a pattern instead of a JSON parse makes opening a large log several times faster.
    Anything the patterns cannot read unambiguously, and ``full=True``, is parsed.
    """
    if not full:
        if b'"type":"reading"' in line:
            found = _READING_FIELDS.findall(line)
            if len(found) == 1:
                src, sseq = found[0]
                return {"type": "reading", "src": src.decode(), "sseq": int(sseq)}
        elif b'"type":"event"' in line:
            kinds = _EVENT_KIND.findall(line)
            if len(kinds) == 1 and not kinds[0].startswith(b"key_rotation"):
                return {"type": "event", "ev": kinds[0].decode()}
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def _continues(entry: Mapping[str, Any], index: int, last_line: bytes | None) -> bool:
    """Tell whether ``entry`` is a valid next entry at position ``index``."""
    if entry.get("seq") != index or entry.get("type") not in ("reading", "event"):
        return False
    prev = entry.get("prev")
    if prev is None or last_line is None:
        return True
    return bool(prev == _b64_sha256(last_line))


def _refuse_rollback(data_dir: Path, scan: _Scan, checkpoints: _Checkpoints) -> None:
    """Raise ``LogRollbackError`` when the log no longer holds what was signed.

    Every note's root must be the root of the log at the note's size; a note that
    cannot be read, or whose record gives another size than the note signs, counts
    as altered (``UnsignedHistoryError``).
    """
    if not checkpoints.notes:
        return
    log_path, cp_path = data_dir / LOG_FILE, data_dir / CHECKPOINTS_FILE
    size = checkpoints.max_size
    if scan.size < size:
        raise LogRollbackError(
            f"{cp_path} signs {size} entries but {log_path} holds only {scan.size}: "
            f"the log was replaced by an older copy, cut short or deleted. The agent "
            f"will not write over the gap. Restore the log from a backup, or move "
            f"{data_dir} aside (keep it as evidence) to start a new log."
        )
    for line, (declared, signed_note) in enumerate(checkpoints.notes, start=1):
        try:
            text, _ = split_note(signed_note)
            checkpoint = parse_checkpoint(text)
        except NoteError as exc:
            raise UnsignedHistoryError(
                f"checkpoint record {line} of {cp_path} (size {declared}) is not a "
                f"signed note ({exc}): the file was edited. {_WILL_NOT_SIGN}"
                f"{_restore_hint(data_dir)}"
            ) from None
        if checkpoint.size != declared:
            raise UnsignedHistoryError(
                f"checkpoint record {line} of {cp_path} says size {declared} but its "
                f"note signs {checkpoint.size}: the file was edited. {_WILL_NOT_SIGN}"
                f"{_restore_hint(data_dir)}"
            )
        if scan.roots.get(declared, checkpoint.root) != checkpoint.root:
            raise LogRollbackError(
                f"the first {declared} entries of {log_path} do not match the root "
                f"signed in {cp_path}: the log was altered or replaced. The agent "
                f"will not write on. Run `ies-agent verify {data_dir}` to find the "
                f"entries, then move {data_dir} aside (keep it as evidence) to start "
                f"a new log."
            )


_WILL_NOT_SIGN = "The agent will not sign over history it cannot check."


def _restore_hint(data_dir: Path) -> str:
    return (
        f" Restore {CHECKPOINTS_FILE} from a backup or from the copy the upstream "
        f"received (then run `ies-agent verify {data_dir}`), or move {data_dir} "
        f"aside (keep it as evidence) to start a new log."
    )


def _unsigned_checkpoints(
    data_dir: Path, scan: _Scan, checkpoints: _Checkpoints
) -> int | None:
    """Check that every ``checkpoint`` event has its signed note.

    The writer appends the event, fsyncs, then appends the note: a crash in between
    leaves the last checkpoint event of that run without a note, and nothing else
    does. That event is either the last entry of the log (this start is the first
    since the crash: its seq is returned, for the ``boot`` event to record) or is
    followed by a ``boot`` that says ``prev_shutdown: unclean`` (an earlier start
    recorded it). Any other event without its note means ``checkpoints.jsonl`` was
    deleted, cut or edited: raises ``UnsignedHistoryError``. Returns ``None`` when no
    note is missing for a new reason.
    """
    events = scan.checkpoint_events
    if not events:
        return None
    log_path, cp_path = data_dir / LOG_FILE, data_dir / CHECKPOINTS_FILE
    if not checkpoints.exists:
        raise UnsignedHistoryError(
            f"{cp_path} is missing, but {log_path} holds {len(events)} checkpoint "
            f"event(s) (the first at seq {events[0]}) whose signed notes it kept: the "
            f"file was deleted, and the log may have been altered with it. "
            f"{_WILL_NOT_SIGN}{_restore_hint(data_dir)}"
        )
    signed = {size for size, _ in checkpoints.notes}
    crashed: int | None = None
    missing = []
    for seq in events:
        if seq + 1 in signed or seq in scan.unclean_boot_after:
            continue
        if seq == scan.size - 1:
            crashed = seq
        else:
            missing.append(seq)
    if missing:
        more = (
            f" (and {len(missing) - 1} more, up to seq {missing[-1]})"
            if len(missing) > 1
            else ""
        )
        raise UnsignedHistoryError(
            f"the checkpoint event at seq {missing[0]} of {log_path}{more} has no "
            f"signed note (size {missing[0] + 1}) in {cp_path}: the file was edited, "
            f"cut or deleted, and the log may have been altered with it. "
            f"{_WILL_NOT_SIGN}{_restore_hint(data_dir)}"
        )
    return crashed


def _check_newest_note(
    data_dir: Path, checkpoints: _Checkpoints, key: keystore.SigningKey
) -> None:
    """Raise ``UnsignedHistoryError`` unless the largest checkpoint is signed by this
    gateway's current or a retired key.

    Its root was already matched with the log, and it covers every entry it counts:
    one signature check (not one per checkpoint) shows that the history it signs is
    the one this gateway wrote, whatever was done to older notes.
    """
    if not checkpoints.notes:
        return
    size = checkpoints.max_size
    signed_note = next(n for s, n in reversed(checkpoints.notes) if s == size)
    text, _ = split_note(signed_note)  # parsed before, by _refuse_rollback
    origin = parse_checkpoint(text).origin
    verifiers = [
        parse_vkey(k.signer(origin).vkey()) for k in _known_keys(data_dir, key)
    ]
    try:
        card = keystore.read_key_card(data_dir) or {}
    except EvidenceError:
        card = {}
    listed = [card.get("vkey")] + [
        item.get("vkey") for item in card.get("retired") or [] if isinstance(item, dict)
    ]
    for vkey in listed:
        with contextlib.suppress(NoteError):
            if isinstance(vkey, str):
                verifiers.append(parse_vkey(vkey))
    try:
        opened = open_note(signed_note, verifiers)
    except NoteError as exc:
        problem = str(exc)
    else:
        if opened.verified_by:
            return
        problem = "signed by none of the keys in keys/ (current or retired)"
    raise UnsignedHistoryError(
        f"the newest checkpoint in {data_dir / CHECKPOINTS_FILE} (size {size}) does "
        f"not verify: {problem}. Its signature was forged or the note altered, or "
        f"keys/ belongs to another log. {_WILL_NOT_SIGN} Run `ies-agent verify "
        f"{data_dir} --key FILE` with the gateway's registered key to see what "
        f"changed.{_restore_hint(data_dir)}"
    )


def _known_keys(
    data_dir: Path, current: keystore.SigningKey
) -> list[keystore.SigningKey]:
    """Return the current key and every retired key that can be loaded."""
    found = [current]
    retired = keystore.keys_dir(data_dir) / keystore.RETIRED_DIR
    for path in sorted(retired.glob("*.pem")):
        with contextlib.suppress(EvidenceError):
            found.append(keystore.load_private_key(path))
    return found


def _cut_tail(data_dir: Path, path: Path, scan: _Scan, boot: int) -> int:
    """Cut ``path`` back to its last valid entry, keeping the cut bytes aside.

    The bytes go to ``evidence.jsonl.cut-boot<boot>`` (fsynced before the log is cut).
    Returns the number of bytes cut for this boot, counting those an earlier attempt
    to start the same boot cut before it died (its ``boot`` event never written).
    """
    keep = data_dir / f"{LOG_FILE}.cut-boot{boot}"
    cut = scan.file_bytes - scan.good_bytes
    try:
        if cut > 0:
            with path.open("rb") as stream:
                stream.seek(scan.good_bytes)
                tail = stream.read()
            fd = os.open(keep, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                _write_all(fd, tail)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.truncate(path, scan.good_bytes)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return keep.stat().st_size if keep.exists() else 0
    except OSError as exc:
        raise EvidenceError(
            f"cannot cut the torn tail of {path}: {exc.strerror}"
        ) from None


def _cut_checkpoints(path: Path, checkpoints: _Checkpoints) -> int:
    cut = checkpoints.file_bytes - checkpoints.good_bytes
    if cut <= 0:
        return 0
    try:
        os.truncate(path, checkpoints.good_bytes)
    except OSError as exc:
        raise EvidenceError(
            f"cannot cut the torn tail of {path}: {exc.strerror}"
        ) from None
    return cut


def _open_append(path: Path, mode: int) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
    except OSError as exc:
        raise EvidenceError(f"cannot open {path} to append: {exc.strerror}") from None


def _signed_after(checkpoints: _Checkpoints, seq: int, vkey: Any) -> bool:
    """Tell whether a checkpoint covering entry ``seq`` is signed by ``vkey``."""
    if not isinstance(vkey, str):
        return True
    try:
        verifier = parse_vkey(vkey)
    except NoteError:
        return True
    for size, note in checkpoints.notes:
        if size <= seq:
            continue
        try:
            if open_note(note, [verifier]).verified_by:
                return True
        except NoteError:
            continue
    return False


# --- small helpers --------------------------------------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _b64_sha256(line: bytes) -> str:
    return base64.b64encode(hashlib.sha256(line).digest()).decode("ascii")
