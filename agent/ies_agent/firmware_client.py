"""The agent's side of the firmware bridge: a client of its unix socket.

The bridge (``ies-firmware-bridge``, DESIGN.md section 8) runs as its own user with no
access to the agent's keys. This client connects to its socket (JSON lines, see
``ies_firmware_bridge.service``) and

- plugs into the OCPP central system (:meth:`FirmwareClient.attach`): every
  ``UpdateFirmware`` / ``SignedUpdateFirmware`` / ``GetDiagnostics`` / ``GetLog`` from
  the CSMS is registered with the bridge before it is forwarded, and the charger is
  given the gateway's URL instead of the upstream one. A call the bridge refuses is
  answered to the CSMS with the reason (``InvalidCertificate``, ``Rejected`` with
  ``statusInfo``, or a CALLERROR where OCPP 1.6 has no status to say it); with no
  bridge running the call is refused rather than passed on unchecked;
- appends the bridge's events to the evidence log (at least once; ``bseq`` is the
  bridge's sequence number) and acknowledges them;
- tells the CSMS, under the charger's identity, when a file was refused or could not
  be fetched or forwarded: 2.x ``FirmwareStatusNotification`` / ``LogStatusNotifi-
  cation`` with the status and the reason in ``customData``; 1.6 the status
  notification plus a ``DataTransfer`` (vendor :data:`VENDOR_ID`) carrying the reason;
- records what chargers report (``firmware_status``; ``firmware_installed``;
  ``firmware_rolled_back`` for ``InstallationFailed`` / ``InstallVerificationFailed``,
  after which a charger keeps running its previous image).

Errors::

    FirmwareBridgeError           base
    ├── BridgeUnavailable         the socket is missing or the bridge went away
    └── BridgeRefused             the bridge refused a request; ``status`` is the
                                  OCPP status word for it
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ies_drivers.ocpp.versions import OcppVersion
from ies_drivers.tomlsource import KeyPath, ProblemCollector

if TYPE_CHECKING:
    from ies_agent.ocpp.server import CentralSystem
    from ies_agent.ocpp.session import FileCall

log = logging.getLogger(__name__)

VENDOR_ID = "org.indiaenergystack.firmware-bridge"
DEFAULT_SOCKET = Path("/run/ies-firmware-bridge/bridge.sock")
LINE_LIMIT = 256 * 1024
_FAILURE_EVENTS = frozenset(
    {"firmware_rejected", "firmware_download_failed", "diagnostics_upload_failed"}
)
_ROLLED_BACK = frozenset({"InstallationFailed", "InstallVerificationFailed"})


FIRMWARE_KEYS = {"enabled", "socket"}


@dataclass(frozen=True)
class FirmwareConfig:
    """The ``[firmware]`` table of a site file::

    [firmware]
    enabled = true                                  # default when the table exists
    socket = "/run/ies-firmware-bridge/bridge.sock" # where the bridge listens
    """

    enabled: bool = True
    socket: Path = DEFAULT_SOCKET


def read_firmware(
    check: ProblemCollector, data: dict[str, Any], resolve: Any
) -> FirmwareConfig | None:
    """Return the ``[firmware]`` table (``None`` when absent); record problems.

    ``resolve`` turns a relative path into one relative to the site file.
    """
    table = check.table(data, ("firmware",))
    if table is None:
        return None
    at: KeyPath = ("firmware",)
    check.unknown_keys(table, FIRMWARE_KEYS, at)
    enabled = check.boolean(table, (*at, "enabled"), default=True)
    socket = check.string(table, (*at, "socket"))
    return FirmwareConfig(
        enabled=bool(enabled),
        socket=Path(resolve(socket)) if socket else DEFAULT_SOCKET,
    )


class FirmwareBridgeError(Exception):
    """Base of the firmware client's errors."""


class BridgeUnavailable(FirmwareBridgeError):
    """Raised when the bridge's socket cannot be reached."""


class BridgeRefused(FirmwareBridgeError):
    """Raised when the bridge refuses a request; ``status`` says how, in OCPP words."""

    def __init__(self, message: str, status: str) -> None:
        super().__init__(message)
        self.status = status


class EventSink(Protocol):
    """What the client needs of the evidence log."""

    def append_event(
        self, ev: str, fields: dict[str, Any] | None = None, *, src: str | None = None
    ) -> int:
        """Append one event; return its ``seq``."""
        ...


class FirmwareClient:
    """A long-lived connection to the bridge; run it with :meth:`run`."""

    def __init__(
        self,
        socket_path: Path,
        evidence: EventSink,
        *,
        call_timeout_s: float = 10.0,
        reconnect_max_s: float = 10.0,
        notify_attempts: int = 5,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.evidence = evidence
        self.call_timeout_s = call_timeout_s
        self.reconnect_max_s = reconnect_max_s
        self.notify_attempts = notify_attempts
        self.base_url: str | None = None
        self.connected = asyncio.Event()
        self._central: CentralSystem | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._outage_logged = False

    # --- wiring -----------------------------------------------------------------------

    def attach(self, central: CentralSystem) -> None:
        """Have ``central`` hand its firmware and diagnostics calls to this client."""
        self._central = central
        central.set_file_bridge(self)

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected to the bridge until ``stop``, reconnecting with capped,
        jittered back-off (an outage is logged once, its end once)."""
        delay = 0.2
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_unix_connection(
                    str(self.socket_path), limit=LINE_LIMIT
                )
            except OSError as exc:
                if not self._outage_logged:
                    log.warning(
                        "firmware bridge not reachable at %s: %s", self.socket_path, exc
                    )
                    self._outage_logged = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(self.reconnect_max_s, delay * 2) * (
                    0.8 + random.random() / 5
                )
                continue
            delay = 0.2
            try:
                await self._session(reader, writer, stop)
            finally:
                self.connected.clear()
                self._writer = None
                for future in self._pending.values():
                    if not future.done():
                        future.set_exception(BridgeUnavailable("the bridge went away"))
                self._pending.clear()
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
        for task in list(self._tasks):
            task.cancel()

    async def _session(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        stop: asyncio.Event,
    ) -> None:
        self._writer = writer
        reading = asyncio.create_task(self._read(reader), name="firmware-client:read")
        try:
            hello = await self.request("hello", client="ies-agent")
            self.base_url = str(hello.get("base_url"))
            self.connected.set()
            if self._outage_logged:
                log.info("firmware bridge reachable again")
                self._outage_logged = False
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait([reading, stopping], return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
        except BridgeUnavailable:
            pass
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reading

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await reader.readline()
            except (ValueError, ConnectionError):
                return
            if not line:
                return
            try:
                message = json.loads(line)
            except ValueError:
                log.warning("firmware bridge sent a line that is not JSON")
                continue
            if not isinstance(message, dict):
                continue
            event = message.get("event")
            if isinstance(event, dict):
                self._on_event(event)
                continue
            future = self._pending.pop(message.get("id", -1), None)
            if future is not None and not future.done():
                future.set_result(message)

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request; return the bridge's answer.

        Raises :class:`BridgeUnavailable` (not connected, no answer within
        ``call_timeout_s``) and :class:`BridgeRefused`.
        """
        writer = self._writer
        if writer is None:
            raise BridgeUnavailable(
                f"the firmware bridge is not connected ({self.socket_path})"
            )
        rid = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending[rid] = future
        writer.write(json.dumps({"id": rid, "op": op, **fields}).encode() + b"\n")
        try:
            await writer.drain()
            answer = await asyncio.wait_for(future, self.call_timeout_s)
        except (ConnectionError, TimeoutError) as exc:
            raise BridgeUnavailable(
                f"the firmware bridge did not answer: {exc}"
            ) from None
        finally:
            self._pending.pop(rid, None)
        if not answer.get("ok"):
            raise BridgeRefused(
                str(answer.get("error", "refused")),
                str(answer.get("status", "Rejected")),
            )
        return answer

    # --- the OCPP side (FileBridge) ---------------------------------------------------

    async def for_charger(
        self,
        charger_id: str,
        version: OcppVersion,
        action: str,
        payload: dict[str, Any],
    ) -> FileCall:
        """Register the file with the bridge; give the charger the gateway's URL.

        Raises ``Reject`` (a CALLERROR to the CSMS) when the bridge is not running, or
        refuses a call whose OCPP answer has no status to say so.
        """
        from ies_agent.ocpp.connection import Reject
        from ies_agent.ocpp.session import FileCall
        from ies_drivers.ocpp.rpc import ErrorCode

        payload = dict(payload)
        upload = action in ("GetDiagnostics", "GetLog")
        inner_key = "log" if action == "GetLog" else "firmware"
        inner = payload.get(inner_key)
        inner = dict(inner) if isinstance(inner, dict) else None
        location_key = "remoteLocation" if action == "GetLog" else "location"
        holder = inner if inner is not None else payload
        location = holder.get(location_key)
        if not isinstance(location, str):
            raise Reject(ErrorCode.FORMAT_VIOLATION, f"{action} names no location")
        request: dict[str, Any] = {
            "charger": charger_id,
            "ocpp": version.value,
            "action": action,
            "location": location,
            "request_id": payload.get("requestId"),
        }
        if inner is not None and not upload:
            request["signing_certificate"] = inner.get("signingCertificate")
            request["signature"] = inner.get("signature")
        try:
            answer = await self.request("upload" if upload else "firmware", **request)
        except BridgeUnavailable as exc:
            raise Reject(
                ErrorCode.GENERIC_ERROR,
                f"the gateway's firmware bridge is not available ({exc}); the file "
                "was not passed on unchecked",
            ) from None
        except BridgeRefused as exc:
            return self._refused(version, action, payload, exc)
        holder[location_key] = str(answer["url"])
        if inner is not None:
            payload[inner_key] = inner
        return FileCall(payload)

    def _refused(
        self,
        version: OcppVersion,
        action: str,
        payload: dict[str, Any],
        exc: BridgeRefused,
    ) -> FileCall:
        from ies_agent.ocpp.connection import Reject
        from ies_agent.ocpp.session import FileCall
        from ies_drivers.ocpp.rpc import ErrorCode

        if version.is_16 and action in ("UpdateFirmware", "GetDiagnostics"):
            raise Reject(ErrorCode.GENERIC_ERROR, str(exc)[:255])
        status = exc.status
        if status not in ("InvalidCertificate", "RevokedCertificate"):
            status = "Rejected"
        if version.is_16:
            return FileCall(payload, {"status": status})
        return FileCall(
            payload,
            {
                "status": status,
                "statusInfo": {
                    "reasonCode": "FirmwareBridge"[:20],
                    "additionalInfo": str(exc)[:512],
                },
            },
        )

    def charger_reported(
        self,
        charger_id: str,
        version: OcppVersion,
        action: str,
        payload: dict[str, Any],
    ) -> None:
        """Record a charger's firmware or log status; tell the bridge about it."""
        status = payload.get("status")
        if not isinstance(status, str):
            return
        kind = (
            "upload"
            if action in ("DiagnosticsStatusNotification", "LogStatusNotification")
            else "firmware"
        )
        fields: dict[str, Any] = {
            "charger": charger_id,
            "ocpp": version.value,
            "action": action,
            "status": status,
        }
        if isinstance(payload.get("requestId"), int):
            fields["request_id"] = payload["requestId"]
        self._record(
            "firmware_status" if kind == "firmware" else "diagnostics_status",
            fields,
            charger_id,
        )
        if kind == "firmware" and status == "Installed":
            self._record("firmware_installed", fields, charger_id)
        elif kind == "firmware" and status in _ROLLED_BACK:
            self._record("firmware_rolled_back", fields, charger_id)
        if self._writer is not None:
            self._spawn(self._report(charger_id, kind, status), "report")

    async def _report(self, charger_id: str, kind: str, status: str) -> None:
        with contextlib.suppress(FirmwareBridgeError):
            await self.request("report", charger=charger_id, kind=kind, status=status)

    # --- events from the bridge -------------------------------------------------------

    def _on_event(self, event: dict[str, Any]) -> None:
        ev = event.get("ev")
        fields = event.get("fields")
        seq = event.get("seq")
        if (
            not isinstance(ev, str)
            or not isinstance(fields, dict)
            or not isinstance(seq, int)
        ):
            log.warning("firmware bridge sent a malformed event")
            return
        charger = fields.get("charger")
        if self._record(
            ev, {**fields, "bseq": seq}, charger if isinstance(charger, str) else None
        ):
            writer = self._writer
            if writer is not None:
                writer.write(json.dumps({"op": "ack", "seq": seq}).encode() + b"\n")
        if ev in _FAILURE_EVENTS:
            self._spawn(self._tell_csms(ev, fields), "tell-csms")

    def _record(self, ev: str, fields: dict[str, Any], src: str | None) -> bool:
        try:
            self.evidence.append_event(ev, fields, src=src)
        except Exception as exc:
            log.error("cannot record firmware event %s: %s", ev, exc)
            return False
        return True

    async def _tell_csms(self, ev: str, fields: dict[str, Any]) -> None:
        """Send the CSMS the failure status (and reason) under the charger's name."""
        from ies_agent.ocpp.connection import OcppLinkError

        central = self._central
        charger = fields.get("charger")
        if central is None or not isinstance(charger, str):
            return
        try:
            version = OcppVersion.parse(str(fields.get("ocpp")))
        except ValueError:
            return
        for action, payload in failure_messages(ev, version, fields):
            for attempt in range(self.notify_attempts):
                hub = central.hubs.get(charger)
                link = hub.link if hub is not None else None
                if link is None:
                    return
                try:
                    await link.forward(version, action, payload, self.call_timeout_s)
                    break
                except OcppLinkError as exc:
                    if attempt + 1 == self.notify_attempts:
                        log.warning("%s: CSMS not told %s: %s", charger, action, exc)
                    else:
                        await asyncio.sleep(min(5.0, 0.5 * 2**attempt))

    def _spawn(self, work: Any, label: str) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        task.set_name(f"firmware-client:{label}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def failure_messages(
    ev: str, version: OcppVersion, fields: dict[str, Any]
) -> list[tuple[str, dict[str, Any]]]:
    """The calls that tell a CSMS about a failed transfer (event ``ev``), in order."""
    reason = str(fields.get("reason", ""))[:500]
    status = str(fields.get("status", "DownloadFailed"))
    action = fields.get("action")
    request_id = fields.get("request_id")
    detail = {
        "vendorId": VENDOR_ID,
        "messageId": "FileRefused" if ev == "firmware_rejected" else "TransferFailed",
        "data": json.dumps(
            {
                "event": ev,
                "status": status,
                "reason": reason,
                "transfer": fields.get("transfer"),
            }
        ),
    }
    upload = ev == "diagnostics_upload_failed"
    if version.is_16:
        if upload:
            return [
                ("DiagnosticsStatusNotification", {"status": "UploadFailed"}),
                ("DataTransfer", detail),
            ]
        if action == "SignedUpdateFirmware":
            word = "InvalidSignature" if ev == "firmware_rejected" else "DownloadFailed"
            return [
                (
                    "SignedFirmwareStatusNotification",
                    {"status": word, "requestId": request_id},
                ),
                ("DataTransfer", detail),
            ]
        return [
            ("FirmwareStatusNotification", {"status": "DownloadFailed"}),
            ("DataTransfer", detail),
        ]
    custom = {"vendorId": VENDOR_ID, "reason": reason}
    if upload:
        payload: dict[str, Any] = {"status": "UploadFailure", "customData": custom}
        if isinstance(request_id, int):
            payload["requestId"] = request_id
        return [("LogStatusNotification", payload)]
    word = "InvalidSignature" if ev == "firmware_rejected" else "DownloadFailed"
    payload = {"status": word, "customData": custom}
    if isinstance(request_id, int):
        payload["requestId"] = request_id
    return [("FirmwareStatusNotification", payload)]


async def query(socket_path: Path, op: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """One request on a short connection (for the command line); return the answer.

    Raises :class:`BridgeUnavailable` and :class:`BridgeRefused`.
    """
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(socket_path), limit=16 * LINE_LIMIT),
            timeout_s,
        )
    except (OSError, TimeoutError) as exc:
        raise BridgeUnavailable(
            f"cannot reach the firmware bridge at {socket_path}: {exc} (is "
            "ies-firmware-bridge running?)"
        ) from None
    try:
        writer.write(json.dumps({"id": 1, "op": op}).encode() + b"\n")
        await writer.drain()
        while True:
            line = await asyncio.wait_for(reader.readline(), timeout_s)
            if not line:
                raise BridgeUnavailable("the firmware bridge closed the connection")
            answer = json.loads(line)
            if isinstance(answer, dict) and answer.get("id") == 1:
                break
    except (OSError, TimeoutError, ValueError) as exc:
        raise BridgeUnavailable(f"the firmware bridge did not answer: {exc}") from None
    finally:
        writer.close()
    if not answer.get("ok"):
        raise BridgeRefused(str(answer.get("error")), str(answer.get("status")))
    return answer
