"""Delivery of the evidence log to one upstream: a cursor, a window, a reconnect loop.

Every upstream kind (MQTT, IES over HTTPS, a directory) plugs a
:class:`Transport` into the same :class:`Connector`, which owns what must be right
everywhere:

- **the cursor** (``ies_agent.upstream.cursor``): the last ``seq`` the upstream
  acknowledged; it advances only when the transport's ``send`` returns, i.e. on an
  acknowledgement covering the batch (MQTT PUBACK of a QoS 1 message, an HTTP ACK
  body, a file fsynced). No copy of the data is kept anywhere else: batches are read
  from the log on disk when they are sent.
- **order and replay**: batches go out in ``seq`` order from the cursor; after any
  failure everything not acknowledged is abandoned and sent again from the cursor
  (duplicates are possible and carry their ``seq``; gaps are not).
- **durability first**: only entries the writer has fsynced are sent (the connector
  asks the writer to ``sync()`` when needed), so a power cut can never take back an
  entry an upstream already holds.
- **checkpoints ride with their entries**: a batch carries every not yet sent
  checkpoint whose size it reaches, so a checkpoint goes out with (or right after)
  the entry that completes it, and the collector can verify at once.
- **end-to-end confirmation** (optional): a second cursor moves on a collector's
  confirmations; when they stall for ``e2e_timeout_s`` while the first cursor is
  ahead (a broker lost acknowledged messages), sending restarts from it.
- **reconnection, in one place**: capped, jittered exponential back-off
  (:class:`Backoff`); an outage is logged once when it starts and once when it ends.

States of a connector (the table :data:`TRANSITIONS` refuses anything else)::

    idle ──▶ connecting ──up──▶ delivering ──failure──▶ waiting ──back-off──▶ connecting
                  └──failure──▶ waiting
    any state ──stop──▶ stopped
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ies_agent.evidence.errors import EvidenceError
from ies_agent.state import UpstreamState
from ies_agent.upstream.cursor import Cursor, CursorStore
from ies_agent.upstream.errors import (
    AuthError,
    LinkError,
    TlsError,
    UpstreamError,
)
from ies_agent.upstream.reader import LogReader

if TYPE_CHECKING:
    from ies_agent.evidence.log import EvidenceLog

log = logging.getLogger(__name__)

CURSOR_SAVE_S = 1.0
"""Longest a changed cursor waits in memory before it is written (seconds)."""
POLL_S = 1.0
"""How often a connector looks at the log files when nothing woke it (seconds)."""
BACKLOG_REFRESH_S = 0.5
"""Shortest time between two backlog counts while the log grows (seconds)."""
MAX_CHECKPOINTS_PER_BATCH = 64

TRANSITIONS: dict[str, frozenset[str]] = {
    "idle": frozenset({"connecting", "stopped"}),
    "connecting": frozenset({"delivering", "waiting", "stopped"}),
    "delivering": frozenset({"waiting", "stopped"}),
    "waiting": frozenset({"connecting", "stopped"}),
    "stopped": frozenset(),
}


@dataclass
class Batch:
    """Entries ``first..last`` (bytes ``start..end`` of the log) and checkpoints.

    ``cp_start..cp_end`` are the indexes of the checkpoint lines carried, in
    ``checkpoints`` as ``(size, note)``.
    """

    first: int
    block: bytes
    count: int
    start: int
    end: int
    cp_start: int
    cp_end: int
    checkpoints: list[tuple[int, str]] = field(default_factory=list)

    @property
    def last(self) -> int:
        """``seq`` of the last entry (``first - 1`` when the batch has none)."""
        return self.first + self.count - 1

    @property
    def lines(self) -> list[bytes]:
        """The entry lines, without newlines (``block`` holds them as on disk)."""
        return self.block.split(b"\n")[:-1]

    @property
    def size_bytes(self) -> int:
        """Bytes of entry lines carried."""
        return self.end - self.start


class Session(Protocol):
    """One live connection to an upstream, as a transport opens it.

    ``window`` is how many batches may await their acknowledgement at once;
    ``lost`` is set (with ``lost_reason``) when the connection dies on its own.
    """

    window: int
    lost: asyncio.Event
    lost_reason: str

    async def send(self, batch: Batch) -> None:
        """Deliver ``batch``; return only once the upstream acknowledged it.

        Raises :class:`~ies_agent.upstream.errors.UpstreamError` subclasses.
        """
        ...


class Transport(Protocol):
    """An upstream kind: opens sessions; knows nothing of cursors."""

    kind: str
    target: str
    """Where it delivers, for logs and status (never with a secret in it)."""

    def bind(self, connector: Connector) -> None:
        """Called once before the first session, with the connector that drives it."""
        ...

    def connect(self) -> AbstractAsyncContextManager[Session]:
        """Return a context that opens a session (raising ``UpstreamError``)."""
        ...


class Backoff:
    """Capped, jittered exponential back-off: the one place reconnect delays come from.

    Delays double from ``base_s`` up to ``cap_s``; each is drawn uniformly from the
    upper half of the current step, so gateways that lost the same broker do not
    come back in step, and no delay is ever near zero.
    """

    def __init__(
        self,
        cap_s: float,
        *,
        base_s: float = 0.5,
        rng: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.cap_s = cap_s
        self.base_s = min(base_s, cap_s)
        self._rng = rng
        self._attempt = 0

    def next_delay(self) -> float:
        """Return the delay before the next attempt (seconds) and count it."""
        step = min(self.cap_s, self.base_s * 2.0**self._attempt)
        self._attempt = min(self._attempt + 1, 32)
        return self._rng(step / 2, step)

    def reset(self) -> None:
        """Start again from ``base_s`` (after a success)."""
        self._attempt = 0


class LogSource:
    """The evidence log as connectors see it: its files, and the writer if in-process.

    With the writer (``log``) open in this process, connectors are woken by its
    listener and send only what :meth:`~ies_agent.evidence.log.EvidenceLog.sync`
    reports durable. Without it (a log written elsewhere or closed), every complete
    line on disk counts and connectors look every ``POLL_S``.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        gateway_id: str,
        origin: str,
        log: EvidenceLog | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.gateway_id = gateway_id
        self.origin = origin
        self.log = log
        self._reader = LogReader(self.data_dir)
        self._wakers: list[asyncio.Event] = []
        if log is not None:
            log.add_listener(self._on_log)

    def waker(self) -> asyncio.Event:
        """Return a new event set whenever the log grows or is checkpointed."""
        event = asyncio.Event()
        self._wakers.append(event)
        return event

    def wake_all(self) -> None:
        """Wake every connector (after the log was closed, for instance)."""
        for event in self._wakers:
            event.set()

    def durable_end(self) -> int:
        """Return how many entries may be sent: those on disk for good.

        Raises :class:`~ies_agent.evidence.errors.EvidenceError` when the writer
        cannot fsync (the disk failed); the caller treats it as a pause.
        """
        if self.log is not None and not self.log.closed:
            return self.log.sync() + 1
        return self._reader.count()

    def known_durable_end(self) -> int:
        """Like :meth:`durable_end`, without asking the writer to fsync now."""
        if self.log is not None and not self.log.closed:
            return self.log.durable_seq + 1
        return self._reader.count()

    def detach(self) -> None:
        """Stop listening to the writer (it is being closed)."""
        if self.log is not None:
            self.log.remove_listener(self._on_log)
            self.log = None
        self.wake_all()

    def _on_log(self, kind: str, n: int) -> None:
        del kind, n
        for event in self._wakers:
            event.set()


class Connector:
    """Delivers one data directory's evidence log to one upstream, forever.

    Create it, then run :meth:`run` as a task; :meth:`drain` makes it finish once
    everything on disk is acknowledged (and confirmed, with end-to-end
    confirmations). Cancelling the task stops it at once; the cursor is saved.
    """

    def __init__(
        self,
        name: str,
        transport: Transport,
        source: LogSource,
        state: UpstreamState,
        *,
        max_entries: int = 200,
        max_bytes: int = 256 * 1024,
        backoff_max_s: float = 60.0,
        e2e_timeout_s: float | None = None,
    ) -> None:
        self.name = name
        self.transport = transport
        self.source = source
        self.state = state
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.e2e_timeout_s = e2e_timeout_s
        self.backoff = Backoff(backoff_max_s)
        self.reader = LogReader(source.data_dir)
        self.store = CursorStore(source.data_dir, name)
        self.cursor = Cursor(name)
        self.phase = "idle"
        self._wake = source.waker()
        self._drain_requested = asyncio.Event()
        self._draining = False
        self._send_seq = 0
        self._send_offset = 0
        self._send_cp = 0
        self._cursor_dirty = False
        self._cursor_saved_at = 0.0
        self._confirm_moved_at = time.monotonic()
        self._in_outage = False
        self._outage_started = 0.0
        self._ever_connected = False
        self._backlog_wake = source.waker()
        self._backlog_end = (0, 0)  # durable end: (entries, bytes)
        state.kind = transport.kind
        state.target = transport.target
        transport.bind(self)

    # --- what transports and the manager call -----------------------------------------

    @property
    def gateway_id(self) -> str:
        """The gateway whose log this is."""
        return self.source.gateway_id

    @property
    def origin(self) -> str:
        """The checkpoint origin (log name) of the log."""
        return self.source.origin

    def history(self, seq: int, count: int) -> list[bytes]:
        """Return up to ``count`` entry lines before ``seq`` (for stateful encoders)."""
        return self.reader.history(seq, count)

    def last_event(self, seq: int, ev: str) -> dict[str, Any] | None:
        """Return the last ``ev`` event entry before ``seq`` (e.g. the ``boot``)."""
        return self.reader.last_event(seq, ev)

    def confirm(self, upto: int) -> None:
        """Take an end-to-end confirmation: the collector holds ``0..upto``."""
        upto = min(upto, max(self.cursor.acked, self._send_seq - 1))
        if upto <= self.cursor.confirmed:
            return
        self.cursor.confirmed = upto
        self.state.confirmed = upto
        self._confirm_moved_at = time.monotonic()
        self._cursor_dirty = True
        self._wake.set()

    def drain(self) -> None:
        """Finish :meth:`run` once everything durable is delivered."""
        self._draining = True
        self._drain_requested.set()
        self._wake.set()

    def caught_up(self) -> bool:
        """Whether every durable entry and checkpoint is delivered (and confirmed)."""
        end = self._durable_end()
        if self.cursor.acked < end - 1:
            return False
        if self.cursor.checkpoints < self.reader.checkpoints_covering(end):
            return False
        return self.e2e_timeout_s is None or self.cursor.confirmed >= end - 1

    # --- the loop ---------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, deliver, and on any failure wait and connect again, until done.

        Returns after :meth:`drain` once caught up; never raises for link, peer or
        credential problems (they are logged once and retried with back-off).
        """
        self._load_cursor()
        watcher = asyncio.create_task(
            self._watch_backlog(), name=f"upstream:{self.name}:backlog"
        )
        try:
            while True:
                if self._draining and self.caught_up():
                    return
                self._enter("connecting")
                try:
                    async with self.transport.connect() as session:
                        self._connected()
                        await self._pump(session)
                except UpstreamError as exc:
                    self._failed(exc)
                except OSError as exc:
                    self._failed(LinkError(f"{exc.__class__.__name__}: {exc}"))
                except Exception as exc:  # a bug must not end delivery for good
                    log.exception(
                        "upstream connector error",
                        extra={"kv": {"upstream": self.name}},
                    )
                    self._failed(UpstreamError(f"internal error: {exc!r}"))
                finally:
                    self.state.connected = False
                    self._save_cursor(force=True)
                if self._draining and self.caught_up():
                    return
                self._enter("waiting")
                await self._sleep(self.backoff.next_delay())
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            self._enter("stopped")
            self._save_cursor(force=True)
            self.reader.close()

    async def _pump(self, session: Session) -> None:
        """Send batches in order, ``session.window`` at a time, until drained."""
        inflight: deque[tuple[Batch, asyncio.Task[None]]] = deque()
        lost = asyncio.create_task(
            session.lost.wait(), name=f"upstream:{self.name}:lost"
        )
        self._rewind()
        try:
            while True:
                self._wake.clear()
                while len(inflight) < session.window:
                    batch = self._next_batch()
                    if batch is None:
                        break
                    task = asyncio.create_task(
                        session.send(batch),
                        name=f"upstream:{self.name}:send:{batch.first}",
                    )
                    inflight.append((batch, task))
                if inflight:
                    batch, head = inflight[0]
                    await asyncio.wait(
                        {head, lost}, return_when=asyncio.FIRST_COMPLETED
                    )
                    if not head.done():
                        raise LinkError(session.lost_reason or "connection lost")
                    head.result()  # raises the transport's error
                    inflight.popleft()
                    self._acknowledged(batch)
                    continue
                self._save_cursor()
                self.refresh_backlog()
                if self._in_outage:
                    self._recovered()
                if self._draining and self.caught_up():
                    return
                if self._e2e_stalled():
                    continue
                if session.lost.is_set():
                    raise LinkError(session.lost_reason or "connection lost")
                waker = asyncio.create_task(self._wake.wait())
                try:
                    await asyncio.wait(
                        {waker, lost},
                        timeout=self._idle_timeout(),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    waker.cancel()
        finally:
            lost.cancel()
            for _, task in inflight:
                task.cancel()
            await asyncio.gather(
                *(t for _, t in inflight), lost, return_exceptions=True
            )

    # --- batches ----------------------------------------------------------------------

    def _next_batch(self) -> Batch | None:
        """Read the next batch from disk at the send position, or ``None``."""
        end = self._durable_end()
        chunk = self.reader.read(
            self._send_seq,
            self._send_offset,
            upto=end - 1,
            max_entries=self.max_entries,
            max_bytes=self.max_bytes,
        )
        reach = chunk.last + 1
        cp_stop = min(
            self.reader.checkpoints_covering(reach),
            self._send_cp + MAX_CHECKPOINTS_PER_BATCH,
        )
        if not chunk.count and cp_stop <= self._send_cp:
            return None
        batch = Batch(
            first=chunk.first,
            block=chunk.block,
            count=chunk.count,
            start=chunk.start,
            end=chunk.end,
            cp_start=self._send_cp,
            cp_end=max(cp_stop, self._send_cp),
            checkpoints=self.reader.checkpoints(self._send_cp, cp_stop),
        )
        self._send_seq = reach
        self._send_offset = chunk.end
        self._send_cp = batch.cp_end
        return batch

    def _acknowledged(self, batch: Batch) -> None:
        """Advance the cursor over an acknowledged batch (never backwards)."""
        cursor = self.cursor
        if cursor.confirmed >= cursor.acked:
            self._confirm_moved_at = time.monotonic()  # the wait starts now
        if batch.last > cursor.acked:
            cursor.acked = batch.last
            cursor.offset = batch.end
        cursor.checkpoints = max(cursor.checkpoints, batch.cp_end)
        self._cursor_dirty = True
        self.state.acked = cursor.acked
        self.state.checkpoints = cursor.checkpoints
        self.state.last_ack_ms = int(time.time() * 1000)
        self._count_backlog()
        self.backoff.reset()
        if self._in_outage:
            self._recovered()
        self._save_cursor()

    def _rewind(self) -> None:
        """Set the send position back to the cursor (or the confirmed cursor)."""
        cursor = self.cursor
        if self.e2e_timeout_s is not None and cursor.confirmed < cursor.acked:
            seq = cursor.confirmed + 1
            self._send_offset = self.reader.locate(seq)
            self._send_cp = self.reader.checkpoints_covering(seq)
        else:
            seq = cursor.acked + 1
            self._send_offset = self.reader.locate(seq, cursor.offset)
            self._send_cp = cursor.checkpoints
        self._send_seq = seq
        self._confirm_moved_at = time.monotonic()

    def _e2e_stalled(self) -> bool:
        """Resend from the confirmed cursor when confirmations stalled; say if so."""
        if self.e2e_timeout_s is None or self.cursor.confirmed >= self.cursor.acked:
            return False
        if time.monotonic() - self._confirm_moved_at < self.e2e_timeout_s:
            return False
        log.warning(
            "collector confirmations stalled; resending what it has not confirmed",
            extra={
                "kv": {
                    "upstream": self.name,
                    "confirmed": self.cursor.confirmed,
                    "acked": self.cursor.acked,
                }
            },
        )
        self._rewind()
        return True

    def _idle_timeout(self) -> float:
        if self.e2e_timeout_s is not None and self.cursor.confirmed < self.cursor.acked:
            left = self._confirm_moved_at + self.e2e_timeout_s - time.monotonic()
            return max(0.05, min(POLL_S, left))
        return POLL_S

    # --- cursor and status ------------------------------------------------------------

    def _load_cursor(self) -> None:
        self.cursor = self.store.load(self.reader.log_id())
        self.state.acked = self.cursor.acked
        self.state.confirmed = self.cursor.confirmed
        self.state.checkpoints = self.cursor.checkpoints
        self.refresh_backlog()

    def _save_cursor(self, *, force: bool = False) -> None:
        if not self._cursor_dirty:
            return
        now = time.monotonic()
        if not force and now - self._cursor_saved_at < CURSOR_SAVE_S:
            return
        if not self.cursor.log:
            self.cursor.log = self.reader.log_id()
        try:
            self.store.save(self.cursor)
        except OSError as exc:
            log.warning(
                "cannot save an upstream cursor (entries may be sent twice)",
                extra={"kv": {"upstream": self.name, "error": exc.strerror}},
            )
            return
        self._cursor_dirty = False
        self._cursor_saved_at = now

    def _durable_end(self) -> int:
        """The durable end of the log; what is on disk if the writer cannot fsync."""
        try:
            return self.source.durable_end()
        except EvidenceError:
            return self.reader.count()

    def refresh_backlog(self) -> None:
        """Count the backlog now: durable entries beyond the cursor, and their bytes.

        ``backlog_entries`` is (durable size of the log - 1 - cursor),
        ``backlog_bytes`` the bytes of those entries in ``evidence.jsonl``. Runs
        whenever the log grows (at most every ``BACKLOG_REFRESH_S``), connected or
        not, and after acknowledgements. A log that cannot be read leaves the last
        count (the delivery loop reports that problem).
        """
        end = self.source.known_durable_end()
        try:
            if end >= self.reader.count():
                end, end_offset = self.reader.count(), self.reader.size_bytes()
            else:
                end_offset = self.reader.locate(end)
        except (UpstreamError, OSError):
            return
        self._backlog_end = (end, end_offset)
        self._count_backlog()

    def _count_backlog(self) -> None:
        """Set the backlog from the last durable end counted and the cursor."""
        end, end_offset = self._backlog_end
        self.state.backlog_entries = max(0, end - 1 - self.cursor.acked)
        self.state.backlog_bytes = max(0, end_offset - self.cursor.offset)

    async def _watch_backlog(self) -> None:
        """Keep the backlog counted as the log grows, in every state of the loop."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._backlog_wake.wait(), timeout=POLL_S)
            self._backlog_wake.clear()
            self.refresh_backlog()
            await asyncio.sleep(BACKLOG_REFRESH_S)

    # --- outages: logged once, recovery once ------------------------------------------

    def _enter(self, phase: str) -> None:
        if phase == self.phase:
            return
        if phase not in TRANSITIONS[self.phase]:
            raise RuntimeError(f"upstream {self.name}: {self.phase} -> {phase}")
        self.phase = phase

    def _connected(self) -> None:
        self._enter("delivering")
        self.state.connected = True
        if not self._ever_connected:
            self._ever_connected = True
            log.info(
                "delivering evidence upstream",
                extra={
                    "kv": {
                        "upstream": self.name,
                        "kind": self.transport.kind,
                        "target": self.transport.target,
                        "from_seq": self.cursor.acked + 1,
                    }
                },
            )

    def _failed(self, exc: UpstreamError) -> None:
        self.state.connected = False
        self.state.last_error = str(exc)
        if self._in_outage:
            log.debug("upstream still unreachable", extra={"kv": {"error": str(exc)}})
            return
        self._in_outage = True
        self._outage_started = time.monotonic()
        self.state.outage_since_ms = int(time.time() * 1000)
        self.refresh_backlog()
        level = (
            logging.ERROR if isinstance(exc, AuthError | TlsError) else logging.WARNING
        )
        log.log(
            level,
            "upstream unreachable; entries wait in the log until it is back",
            extra={
                "kv": {
                    "upstream": self.name,
                    "target": self.transport.target,
                    "error": str(exc),
                    "backlog": self.state.backlog_entries,
                }
            },
        )

    def _recovered(self) -> None:
        self._in_outage = False
        self.state.outage_since_ms = None
        self.refresh_backlog()
        log.info(
            "upstream reachable again; replaying from the cursor",
            extra={
                "kv": {
                    "upstream": self.name,
                    "outage_s": round(time.monotonic() - self._outage_started, 1),
                    "backlog": self.state.backlog_entries,
                }
            },
        )

    async def _sleep(self, delay_s: float) -> None:
        """Wait ``delay_s`` seconds of back-off; a drain request shortens it to 1 s."""
        if self._draining:
            delay_s = min(delay_s, 1.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drain_requested.wait(), timeout=delay_s)
        self._drain_requested.clear()
