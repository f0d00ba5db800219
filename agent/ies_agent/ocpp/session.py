"""One charger: its hub (lives as long as the agent) and its connections (sessions).

A :class:`ChargerHub` exists per charger identity and owns what outlives a WebSocket
connection: the journal and state on disk, the open transactions, the CSMS link and
any dispatch limit. A :class:`ChargerSession` is one connection of that charger, in
the version negotiated for it; nothing version-specific is kept in the hub between
connections (field case FC-12: a 1.6 probe followed by a 2.0.1 connection).

How a charger's CALL is answered:

1. its payload is checked against the schema of the session's version; harmless
   breaks are logged and counted (FC-09), others answered with a CALLERROR;
2. billing-critical messages (1.6 StartTransaction, StopTransaction, MeterValues;
   2.x TransactionEvent, MeterValues) are written to the journal and fsynced, their
   meter values appended to the evidence log, and then answered with the CSMS's answer
   when it comes within ``answer_wait_s``, else by the agent (1.6: a local
   transaction id the CSMS's id is later mapped to; auth from the cache);
3. other messages go to the CSMS when it is there and are answered locally when not.

At the end of a transaction the hub appends a ``session_receipt`` event and signs a
checkpoint over it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal, Protocol

from ies_agent.ocpp.bridge import UpstreamLink, UpstreamUnavailable
from ies_agent.ocpp.connection import (
    CallRejected,
    CallTimeout,
    LinkClosed,
    OcppLinkError,
    Reject,
    RpcConnection,
)
from ies_agent.ocpp.journal import ChargerStore, JournalEntry, JournalError
from ies_agent.ocpp.transactions import Outcome, TransactionBook, parse_time
from ies_drivers.ocpp.measurands import (
    DEFAULT_MEASURAND,
    MeasurandTable,
    NumberError,
    plain_number,
)
from ies_drivers.ocpp.rpc import Call, ErrorCode, dumps
from ies_drivers.ocpp.validation import PayloadError, check_payload
from ies_drivers.ocpp.versions import OcppVersion
from ies_drivers.reading import Reading, ReadingState

if TYPE_CHECKING:
    from websockets.asyncio.server import ServerConnection

    from ies_agent.clock import Clock
    from ies_agent.ocpp.config import ChargerConfig, OcppConfig
    from ies_agent.state import ChargerStatus

log = logging.getLogger(__name__)

CRITICAL_16 = frozenset({"StartTransaction", "StopTransaction", "MeterValues"})
CRITICAL_2X = frozenset({"TransactionEvent", "MeterValues"})
LOCAL_TX_FIRST_BRIDGED = 2_147_483_647
"""First local 1.6 transaction id given while bridged; counts down, far from the
CSMS's own ids, so a local id never equals one the CSMS gives."""
DISPATCH_PROFILE_ID = 2_000_000_000
"""Charging profile id of the agent's dispatch limit (never the CSMS's)."""
DISPATCH_PURPOSE = {
    OcppVersion.V16: "ChargePointMaxProfile",
    OcppVersion.V201: "ChargingStationMaxProfile",
    OcppVersion.V21: "ChargingStationMaxProfile",
}
LocationRewriter = Callable[[str, str, str], str]
"""``(charger_id, action, location) -> location``: where a firmware or diagnostics
file is fetched from or sent to, as the charger should see it (firmware bridge)."""
FILE_CALLS = frozenset(
    {"UpdateFirmware", "SignedUpdateFirmware", "GetDiagnostics", "GetLog"}
)
"""CSMS calls naming a file the firmware bridge carries."""
FILE_STATUS_CALLS = frozenset(
    {
        "FirmwareStatusNotification",
        "SignedFirmwareStatusNotification",
        "DiagnosticsStatusNotification",
        "LogStatusNotification",
    }
)
"""Charger calls reporting on such a file (relayed to the CSMS as any other)."""
RAW_MAX_CHARS = 512
"""Longest sampled value kept verbatim in a reading's ``raw``; a longer one is kept
as its SHA-256, so no charger can make evidence lines large."""
FLAG_BAD_TIME = "timestamp is not a time"
MAX_CONNECTORS = 64
"""Most connectors whose last status a hub keeps (a charger has a handful)."""


@dataclass(frozen=True, slots=True)
class FileCall:
    """What the firmware bridge made of a CSMS file call: the ``payload`` the charger
    gets, or, when ``answer`` is set, the CSMS's answer without asking the charger."""

    payload: dict[str, Any]
    answer: dict[str, Any] | None = None


class FileBridge(Protocol):
    """The firmware bridge as the OCPP bridge sees it (ies_agent.firmware_client)."""

    async def for_charger(
        self,
        charger_id: str,
        version: OcppVersion,
        action: str,
        payload: dict[str, Any],
    ) -> FileCall:
        """Decide what the charger sees of a file call (may raise ``Reject``)."""
        ...

    def charger_reported(
        self,
        charger_id: str,
        version: OcppVersion,
        action: str,
        payload: dict[str, Any],
    ) -> None:
        """Note a file status the charger sent (already relayed to the CSMS)."""
        ...


class EvidenceWriter(Protocol):
    """What the OCPP bridge needs of the evidence log."""

    def append_reading(self, reading: Reading) -> int:
        """Append one reading; return its ``seq``."""
        ...

    def append_event(
        self, ev: str, fields: dict[str, Any] | None = None, *, src: str | None = None
    ) -> int:
        """Append one event; return its ``seq``."""
        ...

    def checkpoint(self) -> str:
        """Sign a checkpoint; return the note."""
        ...


@dataclass(frozen=True, slots=True)
class DispatchLimit:
    """A dispatch limit on one charger: ``limit`` in ``unit`` (A or W) ``until``."""

    limit: Decimal
    unit: Literal["A", "W"]
    until: datetime

    def as_dict(self) -> dict[str, Any]:
        return {
            "limit": format(self.limit, "f"),
            "unit": self.unit,
            "until": _iso(self.until),
        }


class ChargerHub:
    """Everything about one charger that outlives a connection."""

    def __init__(
        self,
        charger: ChargerConfig,
        ocpp: OcppConfig,
        store: ChargerStore,
        *,
        evidence: EvidenceWriter,
        table: MeasurandTable,
        clock: Clock,
        status: ChargerStatus,
        location_rewriter: Callable[[], LocationRewriter | None],
        file_bridge: Callable[[], FileBridge | None] = lambda: None,
    ) -> None:
        self.config = charger
        self.ocpp = ocpp
        self.store = store
        self.evidence = evidence
        self.table = table
        self.clock = clock
        self.status = status
        self.book = TransactionBook(charger.id, store.state)
        self.link: UpstreamLink | None = None
        self.session: ChargerSession | None = None
        self.dispatch: DispatchLimit | None = None
        self._dispatch_task: asyncio.Task[None] | None = None
        self._location_rewriter = location_rewriter
        self.file_bridge = file_bridge
        self._evidence_broken = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._statuses: dict[tuple[OcppVersion, str], dict[str, Any]] = {}
        """(version, connector key) -> the last StatusNotification payload."""
        self.bad_time_warned = False
        self.warned_kinds: set[tuple[str, ...]] = set()
        """Kinds of unusable sampled values already logged (once each)."""
        """A warning about unparseable charger timestamps was logged (once)."""
        self.cadence_declared: set[str] = set()
        """Connector sources whose ``source`` event (``cadence: event``) is written."""
        self.status.open_transactions = self.book.open_count
        self.status.journal_backlog = store.backlog

    @property
    def charger_id(self) -> str:
        return self.config.id

    # --- sessions ---------------------------------------------------------------------

    async def attach(self, session: ChargerSession) -> None:
        """Make ``session`` the charger's connection, closing an older one."""
        old, self.session = self.session, session
        if old is not None:
            log.info("%s: new connection replaces the previous one", self.charger_id)
            await old.conn.close(1000, "replaced by a new connection")
        self.status.connected = True
        self.status.version = session.version.value
        self.status.last_seen_ms = _now_ms()
        self.record(
            "ocpp_connected",
            {"charger": self.charger_id, "version": session.version.value},
        )
        if self.link is not None:
            self.link.start()
            self.link.wake()
        if self.dispatch is not None:
            self._spawn(self._reapply_dispatch(delay_s=1.0), "dispatch-reapply")

    def detach(self, session: ChargerSession) -> None:
        """Forget ``session`` when it closes (unless a newer one replaced it)."""
        if self.session is session:
            self.session = None
            self.status.connected = False
            self.record(
                "ocpp_disconnected",
                {"charger": self.charger_id, "version": session.version.value},
            )
        if self.link is not None:
            self.link.wake()

    # --- HubPort (for the link) -------------------------------------------------------

    def live_version(self) -> OcppVersion | None:
        session = self.session
        return (
            session.version if session is not None and not session.conn.closed else None
        )

    def backlog(self) -> int:
        return self.store.backlog

    def peek(self) -> JournalEntry | None:
        return self.store.peek()

    def prepare(self, entry: JournalEntry) -> dict[str, Any]:
        """Map local 1.6 transaction ids to the CSMS's in an entry about to go.

        A 2.x TransactionEvent received before the link was last ready (the CSMS was
        away, or the agent restarted) goes with ``offline: true``, as the charger
        would have sent it had it known.
        """
        payload = dict(entry.payload)
        if (
            not entry.version.is_16
            and entry.action == "TransactionEvent"
            and self.link is not None
            and entry.t_ms < self.link.ready_since_ms
        ):
            payload["offline"] = True
        if entry.version.is_16 and entry.action in ("MeterValues", "StopTransaction"):
            tx = payload.get("transactionId")
            mapped = self.store.state.tx_map.get(str(tx)) if tx is not None else None
            if mapped is not None:
                payload["transactionId"] = mapped
        return payload

    def delivered(
        self, entry: JournalEntry, answer: dict[str, Any] | None, handed: bool
    ) -> None:
        """Record the CSMS's answer to ``entry`` and advance the cursor."""
        state = self.store.state
        changed = False
        if (
            answer is not None
            and entry.version.is_16
            and entry.action == "StartTransaction"
        ):
            local = state.pending.pop(str(entry.n), None)
            csms_id = answer.get("transactionId")
            if local is not None and isinstance(csms_id, int):
                state.tx_map[str(local)] = csms_id
                self.record(
                    "ocpp_transaction_mapped",
                    {"charger": self.charger_id, "local_id": local, "csms_id": csms_id},
                )
                log.info(
                    "%s: offline transaction %d is %d at the CSMS",
                    self.charger_id,
                    local,
                    csms_id,
                )
            changed = True
        elif (
            answer is None
            and entry.version.is_16
            and entry.action == "StartTransaction"
        ):
            state.pending.pop(str(entry.n), None)
            changed = True
        if answer is not None:
            changed |= self._cache_auth_from(entry, answer)
        if changed:
            self.save_state()
        self.store.advance(entry)
        self.status.journal_backlog = self.store.backlog

    def boot_payload(self, version: OcppVersion) -> dict[str, Any] | None:
        boot = self.store.state.boots.get(version.value)
        return dict(boot) if boot is not None else None

    def last_status(self, version: OcppVersion) -> list[dict[str, Any]]:
        return [dict(p) for (v, _), p in self._statuses.items() if v is version]

    def note_status(
        self, version: OcppVersion, key: str, payload: dict[str, Any]
    ) -> None:
        """Keep a connector's last StatusNotification (re-sent after a reconnect).

        At most :data:`MAX_CONNECTORS` connectors are kept per version.
        """
        known = sum(1 for v, _ in self._statuses if v is version)
        if (version, key) in self._statuses or known < MAX_CONNECTORS:
            self._statuses[(version, key)] = dict(payload)

    async def handle_csms_call(
        self, call: Call, version: OcppVersion
    ) -> dict[str, Any]:
        """Forward a CSMS call to the charger and return its answer."""
        session = self.session
        if session is None or session.conn.closed or session.version is not version:
            raise Reject(
                ErrorCode.GENERIC_ERROR,
                f"charger {self.charger_id} is not connected in OCPP {version.value}",
            )
        payload = dict(call.payload)
        bridge = self.file_bridge()
        if bridge is not None and call.action in FILE_CALLS:
            decided = await bridge.for_charger(
                self.charger_id, version, call.action, payload
            )
            if decided.answer is not None:
                return decided.answer
            payload = decided.payload
        payload = self._for_charger(call.action, payload, version)
        try:
            answer = await session.conn.call(
                call.action, payload, timeout_s=self.ocpp.call_timeout_s
            )
        except CallRejected as exc:
            code = ErrorCode.from_text(exc.code) or ErrorCode.GENERIC_ERROR
            raise Reject(code, exc.description, exc.details) from None
        except CallTimeout:
            raise Reject(
                ErrorCode.GENERIC_ERROR, f"charger did not answer {call.action} in time"
            ) from None
        except LinkClosed:
            raise Reject(
                ErrorCode.GENERIC_ERROR, f"charger disconnected during {call.action}"
            ) from None
        if call.action == "ClearChargingProfile" and self.dispatch is not None:
            self._spawn(self._reapply_dispatch(delay_s=0.0), "dispatch-reapply")
        return answer

    # --- CSMS → charger rewriting -----------------------------------------------------

    def _for_charger(
        self, action: str, payload: dict[str, Any], version: OcppVersion
    ) -> dict[str, Any]:
        """Map CSMS transaction ids back to local ones, keep dispatch on top, and
        hand file locations to the firmware bridge's rewriter."""
        if version.is_16:
            if action == "RemoteStopTransaction":
                payload["transactionId"] = self._local_tx(payload.get("transactionId"))
            if action == "SetChargingProfile":
                profile = payload.get("csChargingProfiles")
                if isinstance(profile, dict):
                    profile = dict(profile)
                    if "transactionId" in profile:
                        profile["transactionId"] = self._local_tx(
                            profile["transactionId"]
                        )
                    payload["csChargingProfiles"] = self._below_dispatch(
                        profile, version
                    )
        elif action == "SetChargingProfile" and isinstance(
            payload.get("chargingProfile"), dict
        ):
            payload["chargingProfile"] = self._below_dispatch(
                dict(payload["chargingProfile"]), version
            )
        rewriter = self._location_rewriter()
        if rewriter is not None:
            _rewrite_locations(
                action, payload, lambda loc: rewriter(self.charger_id, action, loc)
            )
        return payload

    def _local_tx(self, csms_id: Any) -> Any:
        for local, mapped in self.store.state.tx_map.items():
            if mapped == csms_id:
                return int(local)
        return csms_id

    def _below_dispatch(
        self, profile: dict[str, Any], version: OcppVersion
    ) -> dict[str, Any]:
        level = self.ocpp.dispatch_stack_level
        purpose = profile.get("chargingProfilePurpose")
        stack = profile.get("stackLevel")
        if (
            purpose == DISPATCH_PURPOSE[version]
            and isinstance(stack, int)
            and stack >= level
        ):
            log.warning(
                "%s: CSMS profile at stack level %d moved to %d, below dispatch",
                self.charger_id,
                stack,
                level - 1,
            )
            profile["stackLevel"] = level - 1
        return profile

    # --- transactions, auth, state ----------------------------------------------------

    def assign_local_tx(self, entry: JournalEntry | None) -> int:
        """Give a 1.6 StartTransaction a local id; persisted before it is answered."""
        state = self.store.state
        if self.link is None:
            tx_id = state.next_local_tx or 1
            state.next_local_tx = tx_id + 1
        else:
            tx_id = (
                state.next_local_tx
                if state.next_local_tx > 1_000_000
                else LOCAL_TX_FIRST_BRIDGED
            )
            state.next_local_tx = tx_id - 1
            if entry is not None:
                state.pending[str(entry.n)] = tx_id
        self.save_state()
        return tx_id

    def csms_id_for(self, tx_id: Any) -> int | None:
        return self.store.state.tx_map.get(str(tx_id))

    def offline_auth(self, id_tag: str | None) -> dict[str, Any]:
        """The idTagInfo / idTokenInfo to give while the CSMS is away."""
        if id_tag is not None:
            cached = self.store.state.auth.get(id_tag)
            if cached is not None and isinstance(cached.get("info"), dict):
                info = dict(cached["info"])
                if info.get("status") == "Accepted":
                    return {"status": "Accepted"}
                return {"status": info.get("status", "Invalid")}
        return {"status": self.ocpp.offline_unknown_id_tag}

    def cache_auth(self, id_tag: str | None, info: Any) -> bool:
        """Remember the CSMS's verdict on ``id_tag``; True when it changed."""
        if not id_tag or not isinstance(info, dict) or "status" not in info:
            return False
        auth = self.store.state.auth
        old = auth.pop(id_tag, None)
        auth[id_tag] = {"info": {"status": info["status"]}, "t": _now_ms()}
        return old is None or old.get("info") != auth[id_tag]["info"]

    def _cache_auth_from(self, entry: JournalEntry, answer: dict[str, Any]) -> bool:
        payload = entry.payload
        if entry.version.is_16:
            return self.cache_auth(payload.get("idTag"), answer.get("idTagInfo"))
        token = payload.get("idToken")
        id_token = token.get("idToken") if isinstance(token, dict) else None
        return self.cache_auth(id_token, answer.get("idTokenInfo"))

    def save_state(self) -> None:
        try:
            self.store.save_state()
        except JournalError as exc:
            log.error("%s: %s", self.charger_id, exc)
        self.status.open_transactions = self.book.open_count

    # --- evidence ---------------------------------------------------------------------

    def record(
        self, ev: str, fields: dict[str, Any], *, src: str | None = None
    ) -> int | None:
        """Append an event; a broken log is reported once and never stops charging."""
        try:
            return self.evidence.append_event(ev, fields, src=src)
        except Exception as exc:
            self._evidence_failed(exc)
            return None

    def csms_connected(self, connected: bool) -> None:
        """The CSMS link came up or went down (for the status page)."""
        self.status.csms_connected = connected

    def record_event(self, ev: str, fields: dict[str, Any]) -> None:
        """Append an event (for the CSMS link's reports)."""
        self.record(ev, fields)

    def record_reading(self, reading: Reading) -> int | None:
        try:
            return self.evidence.append_reading(reading)
        except Exception as exc:
            self._evidence_failed(exc)
            return None

    def record_outcome(self, outcome: Outcome) -> None:
        """Append a receipt (or unmatched stop) and sign a checkpoint over it."""
        self.record(outcome.ev, outcome.fields)
        try:
            self.evidence.checkpoint()
        except Exception as exc:
            self._evidence_failed(exc)

    def _evidence_failed(self, exc: Exception) -> None:
        if not self._evidence_broken:
            log.error("%s: cannot write evidence: %s", self.charger_id, exc)
        self._evidence_broken = True

    # --- dispatch ---------------------------------------------------------------------

    async def set_dispatch(self, limit: DispatchLimit | None) -> str:
        """Apply (or with ``None`` clear) the dispatch limit; return the charger's
        status word, ``"Pending"`` when it is not connected (applied on connect)."""
        if self._dispatch_task is not None:
            self._dispatch_task.cancel()
            self._dispatch_task = None
        if limit is None:
            self.dispatch = None
            self.status.dispatch = None
            return await self._clear_dispatch_profile()
        self.dispatch = limit
        self.status.dispatch = limit.as_dict()
        self._dispatch_task = asyncio.create_task(
            self._expire_dispatch(limit), name=f"ocpp:{self.charger_id}:dispatch-expiry"
        )
        return await self._apply_dispatch(limit)

    async def _apply_dispatch(self, limit: DispatchLimit) -> str:
        session = self.session
        fields = {"charger": self.charger_id, **limit.as_dict()}
        fields["stack_level"] = self.ocpp.dispatch_stack_level
        if session is None or session.conn.closed:
            self.record("dispatch_limit_pending", fields)
            return "Pending"
        action, payload = dispatch_profile(
            session.version, limit, self.ocpp.dispatch_stack_level, _utcnow()
        )
        try:
            answer = await session.conn.call(action, payload)
            status = str(answer.get("status", "Unknown"))
        except OcppLinkError as exc:
            status = f"Failed: {exc}"
        fields["status"] = status
        self.record("dispatch_limit_applied", fields)
        return status

    async def _clear_dispatch_profile(self) -> str:
        session = self.session
        if session is None or session.conn.closed:
            self.record(
                "dispatch_limit_cleared",
                {"charger": self.charger_id, "status": "NotConnected"},
            )
            return "NotConnected"
        if session.version.is_16:
            payload: dict[str, Any] = {"id": DISPATCH_PROFILE_ID}
        else:
            payload = {"chargingProfileId": DISPATCH_PROFILE_ID}
        try:
            answer = await session.conn.call("ClearChargingProfile", payload)
            status = str(answer.get("status", "Unknown"))
        except OcppLinkError as exc:
            status = f"Failed: {exc}"
        self.record(
            "dispatch_limit_cleared", {"charger": self.charger_id, "status": status}
        )
        return status

    async def _expire_dispatch(self, limit: DispatchLimit) -> None:
        delay = (limit.until - _utcnow()).total_seconds()
        await asyncio.sleep(max(delay, 0.0))
        if self.dispatch is limit:
            self.dispatch = None
            self.status.dispatch = None
            self._dispatch_task = None
            await self._clear_dispatch_profile()

    async def _reapply_dispatch(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        limit = self.dispatch
        if limit is not None and limit.until > _utcnow():
            await self._apply_dispatch(limit)

    def _spawn(self, work: Any, label: str) -> None:
        task = asyncio.ensure_future(work)
        task.set_name(f"ocpp:{self.charger_id}:{label}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop the link and timers, close the files."""
        if self._dispatch_task is not None:
            self._dispatch_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self.link is not None:
            await self.link.stop()
        self.store.close()


class ChargerSession:
    """One WebSocket connection of a charger, in one OCPP version."""

    def __init__(
        self, hub: ChargerHub, websocket: ServerConnection, version: OcppVersion
    ) -> None:
        self.hub = hub
        self.version = version
        self.conn = RpcConnection(
            websocket,
            version=version,
            name=f"{hub.charger_id} charger",
            handler=self.handle,
            call_timeout_s=hub.ocpp.call_timeout_s,
            quirks=hub.config.quirks.frames(),
            on_warning=self._warned,
        )

    async def run(self) -> None:
        """Serve the connection until it closes."""
        await self.conn.run()

    def _warned(self, text: str) -> None:
        self.hub.status.warnings += 1
        self.hub.status.last_warning = text[:200]

    # --- dispatching a call -----------------------------------------------------------

    async def handle(self, call: Call) -> dict[str, Any]:
        """Answer one CALL of the charger (see the module docstring)."""
        hub = self.hub
        hub.status.last_seen_ms = _now_ms()
        try:
            checked = check_payload(
                self.version, call.action, call.payload, quirks=hub.config.quirks
            )
        except PayloadError as exc:
            self._warned(str(exc))
            log.warning("%s: refused %s: %s", hub.charger_id, call.action, exc)
            raise Reject(exc.code, str(exc)) from None
        for warning in checked.warnings:
            self.conn.warn(warning)
        critical = CRITICAL_16 if self.version.is_16 else CRITICAL_2X
        if call.action in critical:
            return await self._critical(call)
        return await self._plain(call)

    async def _plain(self, call: Call) -> dict[str, Any]:
        hub = self.hub
        payload = call.payload
        if call.action == "BootNotification":
            self._booted(payload)
        answer: dict[str, Any] | None = None
        if hub.link is not None:
            try:
                answer = await hub.link.forward(
                    self.version, call.action, payload, self._upstream_wait()
                )
            except CallRejected as exc:
                code = ErrorCode.from_text(exc.code) or ErrorCode.GENERIC_ERROR
                raise Reject(code, exc.description, exc.details) from None
            except (UpstreamUnavailable, CallTimeout, LinkClosed):
                answer = None
        if answer is None:
            answer = self._local_answer(call)
        if call.action == "Authorize":
            if self.version.is_16:
                changed = hub.cache_auth(payload.get("idTag"), answer.get("idTagInfo"))
            else:
                token = payload.get("idToken")
                changed = hub.cache_auth(
                    token.get("idToken") if isinstance(token, dict) else None,
                    answer.get("idTokenInfo"),
                )
            if changed:
                hub.save_state()
        elif call.action == "StatusNotification":
            self._status(payload)
        elif call.action in FILE_STATUS_CALLS:
            bridge = hub.file_bridge()
            if bridge is not None:
                bridge.charger_reported(
                    hub.charger_id, self.version, call.action, payload
                )
        return answer

    def _upstream_wait(self) -> float:
        ocpp = self.hub.ocpp
        return ocpp.answer_wait_s if ocpp.answer_wait_s > 0 else ocpp.call_timeout_s

    async def _critical(self, call: Call) -> dict[str, Any]:
        hub = self.hub
        entry: JournalEntry | None = None
        if hub.link is not None:
            try:
                entry = hub.store.append(
                    self.version, call.action, call.unique_id, call.payload
                )
            except JournalError as exc:
                log.error("%s: %s", hub.charger_id, exc)
                raise Reject(
                    ErrorCode.INTERNAL_ERROR,
                    "cannot store the message durably; retry later",
                ) from None
            hub.status.journal_backlog = hub.store.backlog
        if self.version.is_16:
            return await self._critical_16(call, entry)
        return await self._critical_2x(call, entry)

    async def _from_csms(self, entry: JournalEntry | None) -> dict[str, Any] | None:
        if entry is None or self.hub.link is None:
            return None
        return await self.hub.link.deliver(entry, self.hub.ocpp.answer_wait_s)

    # --- OCPP 1.6 ---------------------------------------------------------------------

    async def _critical_16(
        self, call: Call, entry: JournalEntry | None
    ) -> dict[str, Any]:
        hub = self.hub
        p = call.payload
        if call.action == "MeterValues":
            connector = _int(p.get("connectorId"), 0)
            tx = p.get("transactionId")
            self._meter_values(connector, p.get("meterValue"), _tx_key(tx), call.action)
            return await self._from_csms(entry) or {}
        if call.action == "StartTransaction":
            connector = _int(p.get("connectorId"), 0)
            id_tag = p.get("idTag")
            self._register(
                connector, p.get("meterStart"), p.get("timestamp"), call.action
            )
            answer = await self._from_csms(entry)
            local = answer is None or not isinstance(answer.get("transactionId"), int)
            if local:
                tx_id = hub.assign_local_tx(entry)
                answer = {"transactionId": tx_id, "idTagInfo": hub.offline_auth(id_tag)}
            else:
                assert answer is not None
                tx_id = answer["transactionId"]
            outcomes = hub.book.start(
                self.version,
                str(tx_id),
                connector=connector,
                id_tag=id_tag,
                timestamp=_valid_time(p.get("timestamp")),
                meter_start_wh=_wh(p.get("meterStart")),
                local=local,
            )
            hub.save_state()
            for outcome in outcomes:
                hub.record_outcome(outcome)
            return answer
        # StopTransaction
        tx_key = _tx_key(p.get("transactionId")) or "?"
        record = hub.store.state.open_tx.get(tx_key)
        connector = _int(record.get("connector"), 0) if record else 0
        self._register(connector, p.get("meterStop"), p.get("timestamp"), call.action)
        self._meter_values(connector, p.get("transactionData"), tx_key, call.action)
        answer = await self._from_csms(entry)
        outcome = hub.book.stop(
            tx_key,
            timestamp=_valid_time(p.get("timestamp")),
            meter_stop_wh=_wh(p.get("meterStop")),
            reason=p.get("reason"),
            csms_id=hub.csms_id_for(tx_key),
        )
        if outcome.ev != "session_receipt":
            log.warning(
                "%s: StopTransaction for transaction %s, which is not open: recorded "
                "as unmatched (%s)",
                hub.charger_id,
                tx_key,
                ", ".join(outcome.fields.get("flags", [])),
            )
        hub.save_state()
        hub.record_outcome(outcome)
        if answer is None:
            answer = {}
            if p.get("idTag"):
                answer["idTagInfo"] = hub.offline_auth(p.get("idTag"))
        return answer

    # --- OCPP 2.0.1 / 2.1 -------------------------------------------------------------

    async def _critical_2x(
        self, call: Call, entry: JournalEntry | None
    ) -> dict[str, Any]:
        hub = self.hub
        p = call.payload
        if call.action == "MeterValues":
            self._meter_values(
                _int(p.get("evseId"), 0), p.get("meterValue"), None, call.action
            )
            return await self._from_csms(entry) or {}
        # TransactionEvent
        info = _table(p.get("transactionInfo"))
        tx_id = str(info.get("transactionId", "?"))
        evse = _table(p.get("evse"))
        record = hub.store.state.open_tx.get(tx_id)
        evse_id = _int(
            evse.get("id"), _int(record.get("connector"), 0) if record else 0
        )
        token = p.get("idToken") if isinstance(p.get("idToken"), dict) else None
        id_token = token.get("idToken") if token else None
        event = p.get("eventType")
        seq_no = p.get("seqNo")
        if not (
            isinstance(seq_no, int) and not isinstance(seq_no, bool) and seq_no >= 0
        ):
            # Not a sequence this charger could have sent in order: keep what it
            # said (readings included), open or close nothing.
            flags = ["seq_no_invalid"]
            if not hub.book.is_open(tx_id):
                flags.append("unknown_transaction")
            outcome = hub.book.unmatched_event(
                tx_id,
                event_type=event,
                seq_no=seq_no,
                timestamp=_valid_time(p.get("timestamp")),
                flags=flags,
            )
            message = (
                f"TransactionEvent {_shown(event)} seqNo {_shown(seq_no)} for "
                f"transaction {_shown(tx_id)}: recorded, nothing opened or closed "
                f"({', '.join(flags)})"
            )
            self._warned(message)
            log.warning("%s: %s", hub.charger_id, message)
            hub.record_outcome(outcome)
            self._meter_values(
                evse_id,
                p.get("meterValue"),
                tx_id if hub.book.is_open(tx_id) else None,
                call.action,
            )
            answer = await self._from_csms(entry)
            return answer if answer is not None else {}
        if event != "Ended" and not hub.book.is_open(tx_id):
            for outcome in hub.book.start(
                self.version,
                tx_id,
                connector=evse_id,
                id_tag=id_token,
                timestamp=_valid_time(p.get("timestamp")),
                meter_start_wh=None,
            ):
                hub.record_outcome(outcome)
        elif id_token and record is not None and not record.get("id_tag"):
            record["id_tag"] = id_token
        self._meter_values(evse_id, p.get("meterValue"), tx_id, call.action)
        answer = await self._from_csms(entry)
        if event == "Ended":
            outcome = hub.book.stop(
                tx_id,
                timestamp=_valid_time(p.get("timestamp")),
                meter_stop_wh=None,
                reason=info.get("stoppedReason"),
            )
            if outcome.ev != "session_receipt":
                log.warning(
                    "%s: TransactionEvent Ended for transaction %s, which is not "
                    "open: recorded as unmatched (%s)",
                    hub.charger_id,
                    _shown(tx_id),
                    ", ".join(outcome.fields.get("flags", [])),
                )
            hub.record_outcome(outcome)
        hub.save_state()
        if answer is None:
            answer = {}
            if id_token:
                answer["idTokenInfo"] = hub.offline_auth(id_token)
        return answer

    # --- local answers ----------------------------------------------------------------

    def _local_answer(self, call: Call) -> dict[str, Any]:
        """The agent's own answer to a call the CSMS cannot answer now."""
        now = _iso(_utcnow())
        action, p = call.action, call.payload
        interval = self.hub.ocpp.heartbeat_interval_s
        if action == "BootNotification":
            return {"status": "Accepted", "currentTime": now, "interval": interval}
        if action == "Heartbeat":
            return {"currentTime": now}
        if action == "Authorize":
            if self.version.is_16:
                return {"idTagInfo": self.hub.offline_auth(p.get("idTag"))}
            token = p.get("idToken")
            id_token = token.get("idToken") if isinstance(token, dict) else None
            return {"idTokenInfo": self.hub.offline_auth(id_token)}
        if action == "DataTransfer":
            return {"status": "UnknownVendorId"}
        if action in (
            "SignCertificate",
            "Get15118EVCertificate",
            "GetCertificateStatus",
        ):
            raise Reject(
                ErrorCode.GENERIC_ERROR, f"{action} needs the CSMS, which is away"
            )
        if action in ("NotifyEVChargingNeeds", "NotifyEVChargingSchedule"):
            return {"status": "Accepted"}
        if action == "NotifyChargingLimit" or action.endswith(
            ("Notification", "Report")
        ):
            return {}
        if action.startswith("Notify") or action in (
            "ReportChargingProfiles",
            "ClearedChargingLimit",
            "ReservationStatusUpdate",
        ):
            return {}
        raise Reject(
            ErrorCode.NOT_IMPLEMENTED,
            f"{action} is not answered by the agent while the CSMS is away",
        )

    def _booted(self, payload: dict[str, Any]) -> None:
        hub = self.hub
        hub.store.state.boots[self.version.value] = dict(payload)
        hub.save_state()
        keys = (
            ("chargePointVendor", "vendor"),
            ("chargePointModel", "model"),
            ("chargePointSerialNumber", "serial"),
            ("chargeBoxSerialNumber", "box_serial"),
            ("firmwareVersion", "firmware"),
            ("meterSerialNumber", "meter_serial"),
        )
        identity: dict[str, str] = {}
        station = payload.get("chargingStation")
        if isinstance(station, dict):
            for key, name in (
                ("vendorName", "vendor"),
                ("model", "model"),
                ("serialNumber", "serial"),
                ("firmwareVersion", "firmware"),
            ):
                if isinstance(station.get(key), str):
                    identity[name] = station[key]
        for key, name in keys:
            if isinstance(payload.get(key), str):
                identity[name] = payload[key]
        hub.status.identity = identity
        hub.record(
            "source",
            {"dev": {"protocol": self.version.subprotocol, **identity}},
            src=hub.charger_id,
        )

    def _status(self, payload: dict[str, Any]) -> None:
        if self.version.is_16:
            key = str(payload.get("connectorId", "?"))
            value = payload.get("status")
        else:
            key = f"{payload.get('evseId', '?')}/{payload.get('connectorId', '?')}"
            value = payload.get("connectorStatus")
        if isinstance(value, str):
            self.hub.status.connectors[key] = value
            self.hub.note_status(self.version, key, payload)

    # --- meter values → evidence ------------------------------------------------------

    def _register(
        self, connector: int, value: Any, timestamp: Any, action: str
    ) -> None:
        """Record a 1.6 meterStart/meterStop (an energy register in Wh).

        A value out of range is recorded as sent and flagged (no good reading).
        """
        if value is None:
            return
        sampled = {"value": value, "measurand": DEFAULT_MEASURAND, "unit": "Wh"}
        field = "meterStart" if action == "StartTransaction" else "meterStop"
        self._sample(connector, sampled, timestamp, None, f"{action}.{field}")

    def _meter_values(
        self, connector: int, meter_values: Any, tx_id: str | None, action: str
    ) -> None:
        if not isinstance(meter_values, list):
            return
        for meter_value in meter_values:
            if not isinstance(meter_value, dict):
                continue
            timestamp = meter_value.get("timestamp")
            for sampled in meter_value.get("sampledValue") or []:
                if isinstance(sampled, dict):
                    self._sample(connector, sampled, timestamp, tx_id, action)

    def _sample(
        self,
        connector: int,
        sampled: dict[str, Any],
        timestamp: Any,
        tx_id: str | None,
        action: str,
    ) -> None:
        hub = self.hub
        value = hub.table.normalise(sampled, self.version)
        src = f"{hub.charger_id}/{connector}"
        self._declare_cadence(src)
        device_time, time_flag = self._device_time(timestamp, action)
        flags = [*value.flags, time_flag] if time_flag else list(value.flags)
        text = dumps(sampled)
        if value.signed is not None or len(text) > RAW_MAX_CHARS:
            raw = (
                f"{self.version.subprotocol}:{action}:sha256:"
                + hashlib.sha256(text.encode()).hexdigest()
            )
        else:
            raw = f"{self.version.subprotocol}:{action}:{text}"
        seq: int | None = None
        if value.value is not None or value.signed is None:
            stamp = hub.clock.now()
            reading = Reading(
                source=src,
                quantity=value.quantity,
                obis=value.obis,
                value=value.value,
                unit=value.unit,
                state=ReadingState.OK
                if value.value is not None
                else ReadingState.ERROR,
                raw=raw,
                t_ms=stamp.t_ms,
                tq=stamp.tq,
                mono_ns=max(stamp.mono_ns, 1),
                device_time=device_time,
                cumulative=value.cumulative,
                note="; ".join(flags) or None,
            )
            seq = hub.record_reading(reading)
        signed = value.signed.as_dict() if value.signed is not None else None
        if signed is not None:
            fields: dict[str, Any] = {
                "charger": hub.charger_id,
                "connector": connector,
                "measurand": value.measurand,
                "signed": signed,
            }
            if value.context:
                fields["context"] = value.context
            if seq is not None:
                fields["reading_seq"] = seq
            if tx_id is not None:
                fields["transaction_id"] = tx_id
            hub.record("signed_meter_value", fields, src=src)
        if value.value is None and value.signed is None:
            # No good reading: say so (each kind of problem once per charger).
            problem = "; ".join(value.flags)
            self._warned(f"{action} {src}: {problem}")
            kind = tuple(flag.split(":", 1)[0] for flag in value.flags)
            if kind not in hub.warned_kinds:
                hub.warned_kinds.add(kind)
                log.warning(
                    "%s: %s %s stored as an error reading: %s (logged once per "
                    "charger and kind)",
                    hub.charger_id,
                    action,
                    src,
                    problem,
                )
        if tx_id is None:
            return
        if (
            value.measurand == DEFAULT_MEASURAND
            and value.phase is None
            and value.cumulative
            and value.value is not None
        ):
            hub.book.note_energy(tx_id, value.value, signed)
        elif signed is not None:
            hub.book.note_signed(tx_id, signed)

    def _declare_cadence(self, src: str) -> None:
        """Say once per agent run, before its first reading, that ``src`` reads when
        the charger reports (during sessions), not per interval slot, so the
        verifier expects no reading in every slot."""
        hub = self.hub
        if src in hub.cadence_declared:
            return
        hub.cadence_declared.add(src)
        hub.record(
            "source",
            {
                "cadence": "event",
                "dev": {
                    "protocol": self.version.subprotocol,
                    "charger": hub.charger_id,
                },
            },
            src=src,
        )

    def _device_time(
        self, timestamp: Any, action: str
    ) -> tuple[str | None, str | None]:
        """Return the charger's time for a reading, or ``None`` and a flag.

        An unparseable time is no device time (the reading keeps gateway time); it
        is flagged on the reading and logged once per charger.
        """
        if timestamp is None:
            return None, None
        if isinstance(timestamp, str) and parse_time(timestamp) is not None:
            return timestamp, None
        flag = f"{FLAG_BAD_TIME}: {_shown(timestamp)}"
        hub = self.hub
        if not hub.bad_time_warned:
            hub.bad_time_warned = True
            log.warning(
                "%s: %s carries %s; readings keep gateway time (logged once per "
                "charger)",
                hub.charger_id,
                action,
                flag,
            )
        self._warned(f"{action}: {flag}")
        return None, flag


def dispatch_profile(
    version: OcppVersion, limit: DispatchLimit, stack_level: int, now: datetime
) -> tuple[str, dict[str, Any]]:
    """Return the SetChargingProfile call that puts ``limit`` on a whole charger.

    The profile is the station-wide maximum (1.6 ``ChargePointMaxProfile`` on
    connector 0, 2.x ``ChargingStationMaxProfile`` on EVSE 0), absolute from ``now``
    to ``until``, at ``stack_level`` — above any profile the CSMS sets, whose
    levels the bridge keeps below it.
    """
    period = {"startPeriod": 0, "limit": limit.limit}
    if version.is_16:
        return "SetChargingProfile", {
            "connectorId": 0,
            "csChargingProfiles": {
                "chargingProfileId": DISPATCH_PROFILE_ID,
                "stackLevel": stack_level,
                "chargingProfilePurpose": DISPATCH_PURPOSE[version],
                "chargingProfileKind": "Absolute",
                "validFrom": _iso(now),
                "validTo": _iso(limit.until),
                "chargingSchedule": {
                    "startSchedule": _iso(now),
                    "chargingRateUnit": limit.unit,
                    "chargingSchedulePeriod": [period],
                },
            },
        }
    return "SetChargingProfile", {
        "evseId": 0,
        "chargingProfile": {
            "id": DISPATCH_PROFILE_ID,
            "stackLevel": stack_level,
            "chargingProfilePurpose": DISPATCH_PURPOSE[version],
            "chargingProfileKind": "Absolute",
            "validFrom": _iso(now),
            "validTo": _iso(limit.until),
            "chargingSchedule": [
                {
                    "id": 1,
                    "startSchedule": _iso(now),
                    "chargingRateUnit": limit.unit,
                    "chargingSchedulePeriod": [period],
                }
            ],
        },
    }


def _rewrite_locations(
    action: str, payload: dict[str, Any], rewrite: Callable[[str], str]
) -> None:
    """Apply ``rewrite`` to the file locations of firmware and diagnostics calls."""
    if action in ("UpdateFirmware", "GetDiagnostics") and isinstance(
        payload.get("location"), str
    ):
        payload["location"] = rewrite(payload["location"])
    for key, inner_key in (("firmware", "location"), ("log", "remoteLocation")):
        inner = payload.get(key)
        if isinstance(inner, dict) and isinstance(inner.get(inner_key), str):
            inner = dict(inner)
            inner[inner_key] = rewrite(inner[inner_key])
            payload[key] = inner


def _table(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _tx_key(value: Any) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    return str(value)


def _wh(value: Any) -> str | None:
    """A 1.6 meterStart/meterStop in Wh as plain text; ``None`` when unusable."""
    try:
        return plain_number(value)
    except NumberError:
        return None


def _valid_time(value: Any) -> str | None:
    """A charger's timestamp when it is one, else ``None``."""
    return value if isinstance(value, str) and parse_time(value) is not None else None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime) -> str:
    return (
        moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        + f"{moment.microsecond // 1000:03d}Z"
    )


def _now_ms() -> int:
    return int(time.time() * 1000)
