"""One charger's link to the CSMS: connect, replay the boot, deliver the journal.

An :class:`UpstreamLink` holds at most one WebSocket connection to the CSMS under the
charger's identity (``<csms url>/<charger id>``, subprotocol = the version of the
messages it carries). It runs one task that:

1. connects while there is something to carry (the charger is connected, or the
   journal holds undelivered messages), with capped, jittered back-off
   (:class:`Backoff`) reset on success; an outage is logged once and its recovery
   once. Every link to one CSMS shares a :class:`CsmsReachability`: when one of them
   gets through, the others stop backing off and try at once, so all chargers
   return together instead of each at a random point of its own back-off (a 1.6
   link back after 1 s, a 2.0.1 link after 27 s);
2. replays the charger's last BootNotification of that version on every connect
   and waits for ``Accepted`` before sending anything else;
3. delivers the journal in order, one entry at a time, rewriting OCPP 1.6
   transaction ids given locally during an outage to the ids the CSMS gave, and
   advances the cursor only on an answer. A CALLERROR answer is an answer (the
   CSMS saw the message and refused it: recorded, never retried forever); a timeout
   or a lost connection is not (the entry is sent again). A 2.x TransactionEvent
   received before the link was last ready goes with ``offline: true``;
4. once the journal is delivered after a (re)connect, re-sends each connector's last
   StatusNotification of that version, so the CSMS knows the connectors' state
   (the ones the charger sent meanwhile were answered by the agent).

The charger's session asks :meth:`UpstreamLink.deliver` to hand it the CSMS's answer
to a billing-critical message when it arrives within ``answer_wait_s``, else answers
itself; either way the entry is already on disk. The CSMS's own calls are handed to
the hub (forwarded to the charger).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

from websockets.asyncio.client import connect
from websockets.datastructures import Headers
from websockets.exceptions import InvalidHandshake, InvalidURI
from websockets.typing import Subprotocol

from ies_agent.ocpp.connection import (
    CallHandler,
    CallRejected,
    CallTimeout,
    LinkClosed,
    OcppLinkError,
    RpcConnection,
)
from ies_agent.ocpp.journal import JournalEntry, JournalError
from ies_drivers.ocpp.rpc import Call
from ies_drivers.ocpp.versions import OcppVersion

if TYPE_CHECKING:
    from ies_agent.ocpp.config import CsmsConfig

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.5
BACKOFF_JITTER = 0.2
"""Each delay is drawn from ``delay * (1 ± 0.2)`` so chargers do not retry in step."""
BOOT_RETRY_MAX_S = 30.0


class Backoff:
    """Capped, jittered exponential back-off: ``first_s``, doubling, at most ``cap_s``.

    :meth:`next_delay` returns the next pause in seconds and doubles the base;
    :meth:`reset` (after a success) starts again from ``first_s``.
    """

    def __init__(self, first_s: float, cap_s: float) -> None:
        self.first_s = first_s
        self.cap_s = max(cap_s, first_s)
        self._base = first_s

    def next_delay(self) -> float:
        """The pause before the next attempt, in seconds (jittered, capped)."""
        delay = min(self._base, self.cap_s) * random.uniform(
            1 - BACKOFF_JITTER, 1 + BACKOFF_JITTER
        )
        self._base = min(self._base * 2, self.cap_s)
        return min(delay, self.cap_s)

    def reset(self) -> None:
        """Start again from the first delay (the last attempt succeeded)."""
        self._base = self.first_s


class CsmsReachability:
    """What all links to one CSMS know together: whether it was reached lately.

    A link whose boot the CSMS accepted calls :meth:`reached`; links backing off
    wait on the :meth:`signal` event as well as their own delay, and retry as soon
    as another link got through.
    """

    def __init__(self) -> None:
        self._reached = asyncio.Event()

    def reached(self) -> None:
        """A link just connected: wake every link that is backing off."""
        event, self._reached = self._reached, asyncio.Event()
        event.set()

    def signal(self) -> asyncio.Event:
        """The event the next :meth:`reached` sets (take it before pausing)."""
        return self._reached


class UpstreamUnavailable(OcppLinkError):
    """No usable CSMS connection for this version right now."""


@dataclass
class _Waiter:
    """A charger waiting for the CSMS's answer to one journal entry."""

    future: asyncio.Future[dict[str, Any]]
    abandoned: bool = False


@dataclass
class LinkStats:
    """What the status page shows about one link."""

    connected: bool = False
    version: str | None = None
    delivered: int = 0
    rejected: int = 0
    retries: int = 0
    outage_since_ms: int | None = None
    last_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class HubPort(Protocol):
    """What a link needs of its charger's hub (implemented by ``ChargerHub``)."""

    @property
    def charger_id(self) -> str:
        """The charger's identity."""
        ...

    def live_version(self) -> OcppVersion | None:
        """The version of the charger's open connection, or ``None``."""
        ...

    def backlog(self) -> int:
        """Undelivered journal entries."""
        ...

    def peek(self) -> JournalEntry | None:
        """The oldest undelivered journal entry."""
        ...

    def prepare(self, entry: JournalEntry) -> dict[str, Any]:
        """The payload to send for ``entry`` (transaction ids mapped)."""
        ...

    def delivered(
        self, entry: JournalEntry, answer: dict[str, Any] | None, handed: bool
    ) -> None:
        """``entry`` was answered (``None``: with a CALLERROR); advance the cursor."""
        ...

    def boot_payload(self, version: OcppVersion) -> dict[str, Any] | None:
        """The last BootNotification of this charger in ``version``."""
        ...

    def last_status(self, version: OcppVersion) -> list[dict[str, Any]]:
        """The last StatusNotification payload of each connector, in ``version``."""
        ...

    async def handle_csms_call(
        self, call: Call, version: OcppVersion
    ) -> dict[str, Any]:
        """Forward a CSMS call to the charger; return the charger's answer."""
        ...


class UpstreamLink:
    """The CSMS connection of one charger and the ordered delivery of its journal."""

    def __init__(
        self,
        hub: HubPort,
        csms: CsmsConfig,
        *,
        password: bytes | None,
        ssl_context: ssl.SSLContext | None,
        call_timeout_s: float,
        reconnect_max_s: float,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        on_connected: Callable[[bool], None] | None = None,
        reachability: CsmsReachability | None = None,
    ) -> None:
        self.hub = hub
        self.csms = csms
        self.url = f"{csms.url}/{quote(hub.charger_id, safe='')}"
        self._password = password
        self._ssl = ssl_context
        self.call_timeout_s = call_timeout_s
        self.reconnect_max_s = reconnect_max_s
        self._on_event = on_event
        self._on_connected = on_connected
        self.conn: RpcConnection | None = None
        self._ready = False
        self._wake = asyncio.Event()
        self._stopped = asyncio.Event()
        self._waiters: dict[int, _Waiter] = {}
        self._task: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._stopping = False
        self.stats = LinkStats()
        self.backoff = Backoff(BACKOFF_FIRST_S, reconnect_max_s)
        self.reachability = reachability or CsmsReachability()
        self.ready_since_ms = 0
        """Wall-clock ms when the link last became ready (0: never)."""
        self._status_due = False

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start the link's task (idempotent)."""
        if self._task is None or self._task.done():
            self._stopping = False
            self._stopped.clear()
            self._task = asyncio.create_task(
                self._run(), name=f"ocpp:{self.hub.charger_id}:upstream"
            )

    def wake(self) -> None:
        """Tell the link there is news: a journal entry, a charger (dis)connect."""
        self._wake.set()

    async def stop(self) -> None:
        """Close the connection and end the task."""
        self._stopping = True
        self._stopped.set()
        self._wake.set()
        if self.conn is not None:
            await self.conn.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None

    @property
    def ready(self) -> bool:
        """Connected, booted and able to carry messages now."""
        return self._ready and self.conn is not None and not self.conn.closed

    def ready_for(self, version: OcppVersion) -> bool:
        """Ready and carrying ``version``."""
        return self.ready and self.conn is not None and self.conn.version is version

    # --- the charger's side -----------------------------------------------------------

    async def deliver(
        self, entry: JournalEntry, wait_s: float
    ) -> dict[str, Any] | None:
        """Wait up to ``wait_s`` for the CSMS's answer to ``entry``; ``None`` if not.

        Answers only when the link is ready for the entry's version and nothing older
        is queued; otherwise returns ``None`` at once and the entry goes later, in
        order. After ``None`` the caller answers the charger itself.
        """
        self.wake()
        if not self.ready_for(entry.version) or self.hub.backlog() > 1 or wait_s <= 0:
            return None
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future())
        self._waiters[entry.n] = waiter
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.future), wait_s)
        except TimeoutError:
            if waiter.future.done() and not waiter.future.cancelled():
                return waiter.future.result()
            waiter.abandoned = True
            return None
        finally:
            self._waiters.pop(entry.n, None)

    async def forward(
        self,
        version: OcppVersion,
        action: str,
        payload: Mapping[str, Any],
        timeout_s: float,
    ) -> dict[str, Any]:
        """Send a charger's call that is not journaled; return the CSMS's answer.

        Raises :class:`UpstreamUnavailable` when there is no link for ``version``
        (also before the boot is accepted, except for the BootNotification itself),
        and the call errors of :meth:`RpcConnection.call`.
        """
        conn = self.conn
        if conn is None or conn.closed or conn.version is not version:
            raise UpstreamUnavailable(f"{self.hub.charger_id}: CSMS not connected")
        if not self._ready and action != "BootNotification":
            raise UpstreamUnavailable(f"{self.hub.charger_id}: CSMS boot not accepted")
        answer = await conn.call(action, payload, timeout_s=timeout_s)
        if action == "BootNotification" and answer.get("status") == "Accepted":
            self._set_ready(True)
        return answer

    # --- the task ---------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            # Clear before looking, so news that comes while we act is not lost.
            self._wake.clear()
            version = self._wanted_version()
            if version is None:
                await self._disconnect("nothing to carry")
                await self._sleep_until_woken(None)
                continue
            conn = self.conn
            if conn is not None and (conn.closed or conn.version is not version):
                await self._disconnect(
                    "reconnecting as " + version.subprotocol if not conn.closed else ""
                )
            if self.conn is None:
                try:
                    await self._connect(version)
                except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
                    self._outage(f"cannot connect to {self.url}: {_why(exc)}")
                    await self._back_off()
                    continue
            try:
                was_ready = self._ready
                await self._boot(version)
                if not was_ready:
                    self.backoff.reset()
                    self.reachability.reached()
                await self._pump(version)
            except OcppLinkError as exc:
                self._outage(f"{self.url}: {exc}")
                await self._disconnect("")
                await self._back_off()
            except JournalError as exc:
                log.error(
                    "%s: journal unusable, delivery stopped: %s",
                    self.hub.charger_id,
                    exc,
                )
                self.stats.last_error = str(exc)
                await self._pause(self.reconnect_max_s)
        await self._disconnect("")

    def _wanted_version(self) -> OcppVersion | None:
        entry = self.hub.peek() if self.hub.backlog() else None
        if entry is not None:
            return entry.version
        return self.hub.live_version()

    async def _connect(self, version: OcppVersion) -> None:
        headers = Headers()
        if self._password is not None and self.csms.security_profile in (1, 2):
            token = base64.b64encode(
                self.hub.charger_id.encode() + b":" + self._password
            )
            headers["Authorization"] = "Basic " + token.decode()
        websocket = await connect(
            self.url,
            subprotocols=[Subprotocol(version.subprotocol)],
            additional_headers=headers,
            ssl=self._ssl,
            open_timeout=self.call_timeout_s,
            ping_interval=20,
            ping_timeout=20,
            compression=None,
            proxy=None,
        )
        if websocket.subprotocol != version.subprotocol:
            await websocket.close(1002, "subprotocol not accepted")
            raise InvalidHandshake(
                f"CSMS did not accept subprotocol {version.subprotocol} "
                f"(answered {websocket.subprotocol!r})"
            )
        handler: CallHandler = lambda call: self.hub.handle_csms_call(call, version)  # noqa: E731
        self.conn = RpcConnection(
            websocket,
            version=version,
            name=f"{self.hub.charger_id} csms",
            handler=handler,
            call_timeout_s=self.call_timeout_s,
        )
        self._reader = asyncio.create_task(
            self._read(self.conn), name=f"ocpp:{self.hub.charger_id}:csms-reader"
        )
        self._connected(True)
        self.stats.version = version.value
        if self.stats.outage_since_ms is not None:
            log.info(
                "%s: CSMS reachable again after %.0f s",
                self.hub.charger_id,
                (time.time() * 1000 - self.stats.outage_since_ms) / 1000,
            )
            self.stats.outage_since_ms = None
        else:
            log.info(
                "%s: connected to CSMS %s as %s",
                self.hub.charger_id,
                self.url,
                version.subprotocol,
            )

    async def _read(self, conn: RpcConnection) -> None:
        try:
            await conn.run()
        finally:
            self._set_ready(False)
            self._connected(False)
            self._wake.set()

    async def _boot(self, version: OcppVersion) -> None:
        """Replay the last BootNotification until the CSMS accepts it."""
        delay = 1.0
        while not self._ready:
            conn = self.conn
            if conn is None or conn.closed:
                raise LinkClosed("connection closed during boot")
            payload = self.hub.boot_payload(version)
            if payload is None:
                # Never booted in this version: the charger's own boot (forwarded
                # as it comes) will tell the CSMS who it is.
                log.info(
                    "%s: no BootNotification known for %s; carrying on without",
                    self.hub.charger_id,
                    version.subprotocol,
                )
                self._set_ready(True)
                return
            answer = await conn.call("BootNotification", payload)
            if answer.get("status") == "Accepted":
                self._set_ready(True)
                return
            interval = answer.get("interval")
            wait = (
                float(interval) if isinstance(interval, int) and interval > 0 else delay
            )
            log.info(
                "%s: CSMS answered the boot with %s; retrying in %.0f s",
                self.hub.charger_id,
                answer.get("status"),
                min(wait, BOOT_RETRY_MAX_S),
            )
            await asyncio.sleep(min(wait, BOOT_RETRY_MAX_S))
            delay = min(delay * 2, BOOT_RETRY_MAX_S)

    async def _pump(self, version: OcppVersion) -> None:
        """Deliver journal entries of ``version`` in order while the link holds."""
        while not self._stopping:
            conn = self.conn
            if conn is None or conn.closed:
                raise LinkClosed("connection closed")
            if not self._ready:
                return
            self._wake.clear()
            entry = self.hub.peek()
            if entry is None:
                if self._status_due:
                    self._status_due = False
                    await self._resend_status(conn, version)
                    continue
                if self.hub.live_version() is not version:
                    return
                await self._sleep_until_woken(None, conn)
                continue
            if entry.version is not version:
                return
            payload = self.hub.prepare(entry)
            try:
                answer: dict[str, Any] | None = await conn.call(entry.action, payload)
            except CallRejected as exc:
                self.stats.rejected += 1
                log.warning(
                    "%s: CSMS refused %s (entry %d): %s",
                    self.hub.charger_id,
                    entry.action,
                    entry.n,
                    exc,
                )
                self._event(
                    "ocpp_upstream_rejected",
                    {
                        "charger": self.hub.charger_id,
                        "action": entry.action,
                        "message_id": entry.unique_id,
                        "code": exc.code,
                        "description": exc.description[:200],
                    },
                )
                answer = None
            except CallTimeout:
                self.stats.retries += 1
                raise
            waiter = self._waiters.pop(entry.n, None)
            handed = False
            if waiter is not None and not waiter.abandoned and answer is not None:
                waiter.future.set_result(answer)
                handed = True
            self.hub.delivered(entry, answer, handed)
            self.stats.delivered += 1

    async def _resend_status(self, conn: RpcConnection, version: OcppVersion) -> None:
        """Send each connector's last StatusNotification again (after a reconnect).

        A refusal is logged and dropped (the CSMS saw it); a lost connection or a
        timeout raises, and the statuses go again after the next connect.
        """
        for payload in self.hub.last_status(version):
            try:
                await conn.call("StatusNotification", payload)
            except CallRejected as exc:
                log.warning(
                    "%s: CSMS refused the repeated StatusNotification: %s",
                    self.hub.charger_id,
                    exc,
                )
            except OcppLinkError:
                self._status_due = True
                raise

    async def _back_off(self) -> None:
        """Pause for the next back-off delay, or until another link reaches the CSMS
        or the link stops."""
        delay = self.backoff.next_delay()
        reached = self.reachability.signal()
        waits = [
            asyncio.ensure_future(self._stopped.wait()),
            asyncio.ensure_future(reached.wait()),
        ]
        try:
            await asyncio.wait(
                waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in waits:
                task.cancel()

    async def _disconnect(self, reason: str) -> None:
        conn, self.conn = self.conn, None
        self._set_ready(False)
        if conn is not None:
            if reason:
                log.info(
                    "%s: closing CSMS connection (%s)", self.hub.charger_id, reason
                )
            await conn.close()
        reader, self._reader = self._reader, None
        if reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(reader, 5)
        self._connected(False)

    async def _sleep_until_woken(
        self, timeout_s: float | None, conn: RpcConnection | None = None
    ) -> None:
        """Wait for :meth:`wake` (set since the caller last cleared it), the
        connection to close, or ``timeout_s``."""
        waits: list[Awaitable[Any]] = [self._wake.wait()]
        if conn is not None:
            waits.append(conn.wait_closed())
        tasks = [asyncio.ensure_future(w) for w in waits]
        try:
            await asyncio.wait(
                tasks, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in tasks:
                task.cancel()

    async def _pause(self, seconds: float) -> None:
        """Back off for ``seconds`` (news does not cut it short; stopping does)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), seconds)

    def _connected(self, connected: bool) -> None:
        self.stats.connected = connected
        if self._on_connected is not None:
            self._on_connected(connected)

    def _set_ready(self, ready: bool) -> None:
        if ready and not self._ready:
            self.ready_since_ms = int(time.time() * 1000)
            self._status_due = True
        self._ready = ready
        if ready:
            self._wake.set()

    def _outage(self, message: str) -> None:
        self.stats.last_error = message
        if self.stats.outage_since_ms is None:
            self.stats.outage_since_ms = int(time.time() * 1000)
            log.warning(
                "%s: CSMS unreachable, queueing on disk: %s",
                self.hub.charger_id,
                message,
            )
        else:
            log.debug("%s: still unreachable: %s", self.hub.charger_id, message)

    def _event(self, ev: str, fields: dict[str, Any]) -> None:
        if self._on_event is not None:
            self._on_event(ev, fields)


def _why(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:200]
