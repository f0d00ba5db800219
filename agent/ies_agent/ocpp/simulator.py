"""Simulated chargers for ``ies-agent demo`` (and as peers in tests).

Built on the ``ocpp`` package's charge point classes — not on the agent's own RPC
code — so what they send and how they read the agent's answers is checked by an
independent implementation, schemas included.

A :class:`SimulatedCharger` behaves like a real one where it matters to the bridge:
it boots, reports its connector, and runs charging sessions one after the other (a
start, meter values every few seconds, a stop). Transaction messages go through an
outbox that survives lost connections: when the central system is gone they wait and
are sent again, in order, after reconnecting — as OCPP asks of chargers. An OCPP 1.6
charger fills in the transaction id given by StartTransaction when it sends the later
messages of that transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ocpp.routing import on
from ocpp.v16 import ChargePoint as ChargePoint16
from ocpp.v16 import call as call16
from ocpp.v16 import call_result as result16
from ocpp.v201 import ChargePoint as ChargePoint201
from ocpp.v201 import call as call201
from ocpp.v201 import call_result as result201
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.typing import Subprotocol

from ies_drivers.ocpp.versions import OcppVersion

log = logging.getLogger(__name__)
_wire = logging.getLogger(__name__ + ".wire")
"""Every frame the ``ocpp`` package sends or receives, logged at INFO by the package:
shown only when this logger is set to INFO (the demo would drown in it otherwise)."""
_wire.setLevel(logging.WARNING)


@dataclass(frozen=True)
class SessionPlan:
    """How a simulated charger charges: durations in seconds, power in W."""

    session_s: float = 12.0
    pause_s: float = 6.0
    meter_interval_s: float = 3.0
    power_w: int = 7400
    id_tag: str = "DEMO-TAG-0001"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class _Station16(ChargePoint16):
    """The 1.6 charge point: answers the central system's calls."""

    owner: SimulatedCharger

    @on("RemoteStartTransaction")
    def remote_start(self, id_tag: str, **_: Any) -> Any:
        self.owner.note("RemoteStartTransaction", {"idTag": id_tag})
        self.owner.request_session()
        return result16.RemoteStartTransaction(status="Accepted")

    @on("RemoteStopTransaction")
    def remote_stop(self, transaction_id: int, **_: Any) -> Any:
        self.owner.note("RemoteStopTransaction", {"transactionId": transaction_id})
        accepted = self.owner.tx_id == transaction_id
        if accepted:
            self.owner.request_stop()
        return result16.RemoteStopTransaction(
            status="Accepted" if accepted else "Rejected"
        )

    @on("SetChargingProfile")
    def set_profile(
        self, connector_id: int, cs_charging_profiles: Any, **_: Any
    ) -> Any:
        self.owner.note(
            "SetChargingProfile",
            {"connectorId": connector_id, "profile": cs_charging_profiles},
        )
        return result16.SetChargingProfile(status="Accepted")

    @on("ClearChargingProfile")
    def clear_profile(self, **kwargs: Any) -> Any:
        self.owner.note("ClearChargingProfile", kwargs)
        return result16.ClearChargingProfile(status="Accepted")

    @on("GetConfiguration")
    def get_configuration(self, **kwargs: Any) -> Any:
        self.owner.note("GetConfiguration", kwargs)
        return result16.GetConfiguration(
            configuration_key=[
                {"key": "MeterValueSampleInterval", "readonly": False, "value": "3"}
            ]
        )

    @on("ChangeConfiguration")
    def change_configuration(self, key: str, value: str, **_: Any) -> Any:
        self.owner.note("ChangeConfiguration", {"key": key, "value": value})
        return result16.ChangeConfiguration(status="Accepted")

    @on("Reset")
    def reset(self, type: str, **_: Any) -> Any:
        self.owner.note("Reset", {"type": type})
        return result16.Reset(status="Accepted")

    @on("UpdateFirmware")
    def update_firmware(self, location: str, retrieve_date: str, **_: Any) -> Any:
        self.owner.note("UpdateFirmware", {"location": location})
        return result16.UpdateFirmware()

    @on("GetDiagnostics")
    def get_diagnostics(self, location: str, **_: Any) -> Any:
        self.owner.note("GetDiagnostics", {"location": location})
        return result16.GetDiagnostics(file_name="diagnostics.log")

    @on("TriggerMessage")
    def trigger(self, requested_message: str, **_: Any) -> Any:
        self.owner.note("TriggerMessage", {"requestedMessage": requested_message})
        return result16.TriggerMessage(status="Accepted")


class _Station201(ChargePoint201):
    """The 2.0.1 charging station: answers the CSMS's calls."""

    owner: SimulatedCharger

    @on("RequestStartTransaction")
    def request_start(self, id_token: Any, remote_start_id: int, **_: Any) -> Any:
        self.owner.note("RequestStartTransaction", {"idToken": id_token})
        self.owner.request_session()
        return result201.RequestStartTransaction(status="Accepted")

    @on("RequestStopTransaction")
    def request_stop(self, transaction_id: str, **_: Any) -> Any:
        self.owner.note("RequestStopTransaction", {"transactionId": transaction_id})
        accepted = self.owner.tx_id == transaction_id
        if accepted:
            self.owner.request_stop()
        return result201.RequestStopTransaction(
            status="Accepted" if accepted else "Rejected"
        )

    @on("SetChargingProfile")
    def set_profile(self, evse_id: int, charging_profile: Any, **_: Any) -> Any:
        self.owner.note(
            "SetChargingProfile", {"evseId": evse_id, "profile": charging_profile}
        )
        return result201.SetChargingProfile(status="Accepted")

    @on("ClearChargingProfile")
    def clear_profile(self, **kwargs: Any) -> Any:
        self.owner.note("ClearChargingProfile", kwargs)
        return result201.ClearChargingProfile(status="Accepted")

    @on("GetVariables")
    def get_variables(self, get_variable_data: list[Any], **_: Any) -> Any:
        self.owner.note("GetVariables", {"getVariableData": get_variable_data})
        return result201.GetVariables(
            get_variable_result=[
                {
                    "attributeStatus": "Accepted",
                    "attributeValue": "3",
                    "component": item["component"],
                    "variable": item["variable"],
                }
                for item in get_variable_data
            ]
        )

    @on("SetVariables")
    def set_variables(self, set_variable_data: list[Any], **_: Any) -> Any:
        self.owner.note("SetVariables", {"setVariableData": set_variable_data})
        return result201.SetVariables(
            set_variable_result=[
                {
                    "attributeStatus": "Accepted",
                    "component": item["component"],
                    "variable": item["variable"],
                }
                for item in set_variable_data
            ]
        )

    @on("Reset")
    def reset(self, type: str, **_: Any) -> Any:
        self.owner.note("Reset", {"type": type})
        return result201.Reset(status="Accepted")

    @on("UpdateFirmware")
    def update_firmware(self, request_id: int, firmware: Any, **_: Any) -> Any:
        self.owner.note("UpdateFirmware", {"firmware": firmware})
        return result201.UpdateFirmware(status="Accepted")

    @on("GetLog")
    def get_log(self, log: Any, log_type: str, request_id: int, **_: Any) -> Any:
        self.owner.note("GetLog", {"log": log})
        return result201.GetLog(status="Accepted", filename="station.log")


@dataclass
class _Outgoing:
    """A message waiting in the outbox; ``build`` makes the payload when sent."""

    action: str
    build: Callable[[], Any]
    done: Callable[[Any], None] | None = None


class SimulatedCharger:
    """One simulated charger with one connector, in one OCPP version.

    ``base_url`` is the central system's address; the charger id is appended as the
    last path segment. ``sessions`` counts completed sessions; ``received`` keeps the
    last calls the central system sent it.
    """

    def __init__(
        self,
        charger_id: str,
        version: OcppVersion,
        base_url: str,
        *,
        plan: SessionPlan | None = None,
        password: str | None = None,
        ssl: Any = None,
        call_timeout_s: float = 10.0,
        auto_sessions: bool = True,
    ) -> None:
        self.charger_id = charger_id
        self.version = version
        self.url = base_url.rstrip("/") + "/" + charger_id
        self.plan = plan or SessionPlan()
        self.password = password
        self.ssl = ssl
        self.call_timeout_s = call_timeout_s
        self.auto_sessions = auto_sessions
        self.energy_wh = 1_000_000
        self.tx_id: Any = None
        self.sessions = 0
        self.started = 0
        self.received: deque[tuple[str, dict[str, Any]]] = deque(maxlen=500)
        self.answers: deque[tuple[str, Any]] = deque(maxlen=500)
        self.connected = asyncio.Event()
        self._outbox: deque[_Outgoing] = deque()
        self._outbox_ready = asyncio.Event()
        self._outbox_empty = asyncio.Event()
        self._start_now = asyncio.Event()
        self._stop_now = asyncio.Event()
        self._in_session = False
        self._seq_no = 0
        self._cp: Any = None
        self._meter_task: asyncio.Task[None] | None = None

    # --- control ----------------------------------------------------------------------

    def note(self, action: str, payload: dict[str, Any]) -> None:
        """Remember a call received from the central system."""
        self.received.append((action, payload))

    def request_session(self) -> None:
        """Begin a session now (a remote start, or a test)."""
        self._start_now.set()

    def request_stop(self) -> None:
        """End the current session now."""
        self._stop_now.set()

    @property
    def in_session(self) -> bool:
        return self._in_session

    @property
    def pending(self) -> int:
        """Messages in the outbox not yet answered."""
        return len(self._outbox)

    async def run(self, stop: asyncio.Event) -> None:
        """Connect (again and again), charge, until ``stop``; then end the session
        in progress and deliver it (bounded by a few call timeouts)."""
        sessions = asyncio.create_task(
            self._drive(stop), name=f"sim:{self.charger_id}:sessions"
        )
        link = asyncio.create_task(self._link(stop), name=f"sim:{self.charger_id}:link")
        try:
            await sessions
            await asyncio.wait_for(self.flush(), self.call_timeout_s * 3)
        except TimeoutError:
            log.warning(
                "%s: %d message(s) not delivered at exit", self.charger_id, self.pending
            )
        finally:
            link.cancel()
            sessions.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await link

    async def flush(self) -> None:
        """Wait until the outbox is empty."""
        while self._outbox:
            self._outbox_empty.clear()
            await self._outbox_empty.wait()

    # --- sessions ---------------------------------------------------------------------

    async def _drive(self, stop: asyncio.Event) -> None:
        await self.connected.wait()
        while not stop.is_set():
            if self.auto_sessions:
                await _wait_any(stop, self._start_now, limit_s=self.plan.pause_s)
            else:
                await _wait_any(stop, self._start_now)
            if stop.is_set():
                break
            self._start_now.clear()
            self._stop_now.clear()
            self._begin()
            limit = self.plan.session_s if self.auto_sessions else None
            deadline = asyncio.get_running_loop().time() + (limit or 1e9)
            while not stop.is_set() and not self._stop_now.is_set():
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                await _wait_any(
                    stop, self._stop_now, limit_s=min(left, self.plan.meter_interval_s)
                )
                self._tick(
                    self.plan.meter_interval_s
                    if left > self.plan.meter_interval_s
                    else left
                )
                if left > self.plan.meter_interval_s and not self._stop_now.is_set():
                    self._meter()
            self._end("Local" if not stop.is_set() else "Other")

    def _tick(self, seconds: float) -> None:
        self.energy_wh += int(self.plan.power_w * seconds / 3600)

    def _begin(self) -> None:
        self._in_session = True
        self.started += 1
        meter_start = self.energy_wh
        stamp = _now()
        if self.version.is_16:

            def started(result: Any) -> None:
                self.tx_id = result.transaction_id if result is not None else None

            self._queue(
                "StartTransaction",
                lambda: call16.StartTransaction(
                    connector_id=1,
                    id_tag=self.plan.id_tag,
                    meter_start=meter_start,
                    timestamp=stamp,
                ),
                started,
            )
            return
        self.tx_id = str(uuid.uuid4())
        tx_id = self.tx_id
        self._queue(
            "TransactionEvent",
            lambda: self._event("Started", "Authorized", tx_id, stamp, meter_start),
        )

    def _meter(self) -> None:
        energy, stamp = self.energy_wh, _now()
        if self.version.is_16:
            self._queue(
                "MeterValues",
                lambda: call16.MeterValues(
                    connector_id=1,
                    transaction_id=self.tx_id,
                    meter_value=[
                        {
                            "timestamp": stamp,
                            "sampledValue": [
                                {
                                    "value": str(energy),
                                    "context": "Sample.Periodic",
                                    "measurand": "Energy.Active.Import.Register",
                                    "unit": "Wh",
                                },
                                {
                                    "value": f"{self.plan.power_w / 1000:.1f}",
                                    "context": "Sample.Periodic",
                                    "measurand": "Power.Active.Import",
                                    "unit": "kW",
                                },
                            ],
                        }
                    ],
                ),
            )
            return
        tx_id = self.tx_id
        self._queue(
            "TransactionEvent",
            lambda: self._event("Updated", "MeterValuePeriodic", tx_id, stamp, energy),
        )

    def _end(self, reason: str) -> None:
        energy, stamp = self.energy_wh, _now()
        if self.version.is_16:
            self._queue(
                "StopTransaction",
                lambda: call16.StopTransaction(
                    meter_stop=energy,
                    timestamp=stamp,
                    transaction_id=self.tx_id if self.tx_id is not None else -1,
                    reason=reason,
                    id_tag=self.plan.id_tag,
                ),
                lambda _result: self._ended(),
            )
            return
        tx_id = self.tx_id
        self._queue(
            "TransactionEvent",
            lambda: self._event(
                "Ended", "StopAuthorized", tx_id, stamp, energy, reason=reason
            ),
            lambda _result: self._ended(),
        )

    def _ended(self) -> None:
        self.sessions += 1
        self._in_session = False

    def _event(
        self,
        kind: str,
        trigger: str,
        tx_id: str,
        stamp: str,
        energy: int,
        reason: str | None = None,
    ) -> Any:
        self._seq_no += 1
        info: dict[str, Any] = {"transactionId": tx_id, "chargingState": "Charging"}
        if kind == "Ended":
            info = {"transactionId": tx_id, "stoppedReason": reason or "Local"}
        sampled = [
            {
                "value": energy,
                "context": "Transaction.Begin"
                if kind == "Started"
                else "Sample.Periodic",
                "measurand": "Energy.Active.Import.Register",
                "unitOfMeasure": {"unit": "Wh"},
            }
        ]
        return call201.TransactionEvent(
            event_type=kind,
            timestamp=stamp,
            trigger_reason=trigger,
            seq_no=self._seq_no,
            transaction_info=info,
            evse={"id": 1, "connectorId": 1},
            id_token={"idToken": self.plan.id_tag, "type": "ISO14443"},
            meter_value=[{"timestamp": stamp, "sampledValue": sampled}],
        )

    def _queue(
        self,
        action: str,
        build: Callable[[], Any],
        done: Callable[[Any], None] | None = None,
    ) -> None:
        self._outbox.append(_Outgoing(action, build, done))
        self._outbox_ready.set()

    # --- connection -------------------------------------------------------------------

    async def _link(self, stop: asyncio.Event) -> None:
        headers = {}
        if self.password is not None:
            import base64

            token = base64.b64encode(
                f"{self.charger_id}:{self.password}".encode()
            ).decode()
            headers["Authorization"] = f"Basic {token}"
        booted = False
        while True:
            try:
                async with connect(
                    self.url,
                    subprotocols=[Subprotocol(self.version.subprotocol)],
                    additional_headers=headers,
                    ssl=self.ssl,
                    open_timeout=5,
                    proxy=None,
                ) as websocket:
                    await self._serve(websocket, booted)
                    booted = True
            except (OSError, InvalidHandshake, ConnectionClosed, TimeoutError) as exc:
                log.debug("%s: connection lost or refused: %s", self.charger_id, exc)
            self.connected.clear()
            await asyncio.sleep(0.5)

    async def _serve(self, websocket: ClientConnection, booted: bool) -> None:
        station: Any = (_Station16 if self.version.is_16 else _Station201)(
            self.charger_id,
            websocket,
            response_timeout=self.call_timeout_s,
            logger=_wire,
        )
        station.owner = self
        self._cp = station
        reader = asyncio.create_task(
            station.start(), name=f"sim:{self.charger_id}:reader"
        )
        try:
            if not booted:
                await self._boot(station)
            self.connected.set()
            await self._pump(station, reader)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await reader

    async def _boot(self, station: Any) -> None:
        if self.version.is_16:
            await station.call(
                call16.BootNotification(
                    charge_point_vendor="IES Demo",
                    charge_point_model="SimCharger-16",
                    charge_point_serial_number=f"SIM-{self.charger_id}",
                    firmware_version="1.0.0",
                ),
                suppress=False,
            )
            await station.call(
                call16.StatusNotification(
                    connector_id=1, error_code="NoError", status="Available"
                ),
                suppress=False,
            )
            return
        await station.call(
            call201.BootNotification(
                charging_station={
                    "vendorName": "IES Demo",
                    "model": "SimCharger-201",
                    "serialNumber": f"SIM-{self.charger_id}",
                    "firmwareVersion": "1.0.0",
                },
                reason="PowerUp",
            ),
            suppress=False,
        )
        await station.call(
            call201.StatusNotification(
                timestamp=_now(),
                connector_status="Available",
                evse_id=1,
                connector_id=1,
            ),
            suppress=False,
        )

    async def _pump(self, station: Any, reader: asyncio.Task[None]) -> None:
        """Send the outbox in order; keep an item until it is answered."""
        from ocpp.exceptions import OCPPError

        while not reader.done():
            if not self._outbox:
                self._outbox_ready.clear()
                waiter = asyncio.ensure_future(self._outbox_ready.wait())
                await asyncio.wait(
                    [waiter, reader], return_when=asyncio.FIRST_COMPLETED
                )
                waiter.cancel()
                continue
            item = self._outbox[0]
            try:
                result = await station.call(item.build(), suppress=False)
            except OCPPError as exc:
                log.warning("%s: %s refused: %s", self.charger_id, item.action, exc)
                result = None
            except TimeoutError:
                log.info(
                    "%s: %s unanswered; will send again", self.charger_id, item.action
                )
                return
            self.answers.append((item.action, result))
            self._outbox.popleft()
            if not self._outbox:
                self._outbox_empty.set()
            if item.done is not None:
                item.done(result)


async def _wait_any(*events: asyncio.Event, limit_s: float | None = None) -> None:
    tasks = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(tasks, timeout=limit_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


DEMO_CHARGERS: tuple[tuple[str, OcppVersion], ...] = (
    ("demo-cp-16", OcppVersion.V16),
    ("demo-cp-201", OcppVersion.V201),
)
"""The demo's chargers: identity and the OCPP version each offers."""
DEMO_PLAN = SessionPlan(session_s=12.0, pause_s=6.0, meter_interval_s=3.0)
"""A session begins and ends at least every 30 s."""


def demo_ocpp_table(port: int, csms_url: str | None) -> str:
    """The ``[ocpp]`` tables of the demo's site file (loopback, no auth: a lab)."""
    text = (
        "\n# The agent as OCPP central system for the simulated chargers"
        + (f", bridged to {csms_url}" if csms_url else "")
        + ".\n[ocpp]\n"
        'listen_host = "127.0.0.1"\n'
        f"listen_port = {port}\n"
        "security_profile = 0\n"
        'offline_unknown_id_tag = "Accepted"\n'
        "answer_wait_s = 3\n"
        "drain_timeout_s = 30\n"
    )
    for charger_id, version in DEMO_CHARGERS:
        text += f'\n[[ocpp.chargers]]\nid = "{charger_id}"\n'
        text += f'versions = ["{version.value}"]\n'
    if csms_url:
        text += f'\n[ocpp.csms]\nurl = "{csms_url}"\n'
    return text


class DemoChargers:
    """The demo's simulated chargers, connected to the agent on ``port``."""

    def __init__(self, port: int, plan: SessionPlan = DEMO_PLAN) -> None:
        base = f"ws://127.0.0.1:{port}/ocpp"
        self.chargers = [
            SimulatedCharger(charger_id, version, base, plan=plan)
            for charger_id, version in DEMO_CHARGERS
        ]
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start charging (each charger connects as soon as the agent listens)."""
        for charger in self.chargers:
            self._tasks.append(
                asyncio.create_task(
                    charger.run(self._stop), name=f"demo:charger:{charger.charger_id}"
                )
            )

    async def finish(self) -> None:
        """End the sessions in progress and wait (bounded) until the agent has them."""
        self._stop.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def summary(self) -> str:
        """One line per charger: sessions completed, messages not delivered."""
        lines = []
        for charger in self.chargers:
            line = (
                f"  {charger.charger_id:<12} {charger.version.subprotocol:<10} "
                f"{charger.sessions} session(s)"
            )
            if charger.pending:
                line += f", {charger.pending} message(s) not delivered"
            lines.append(line)
        return "\n".join(lines)
