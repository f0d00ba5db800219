"""The agent's OCPP central system: WebSocket server, security profiles, dispatch API.

:class:`CentralSystem` listens where ``[ocpp]`` says (loopback by default) and takes
the charger's identity from the last segment of the URL path
(``ws://gateway:9000/ocpp/CP-0001``). Before the WebSocket handshake completes it

- refuses identities that are not configured (HTTP 404) unless ``accept_unknown``;
- checks security profile 1 and 2 basic auth (user = the identity, password from the
  charger's ``password_file``; HTTP 401 otherwise), profile 2 and 3 TLS, and for
  profile 3 that the client certificate's common name is the identity (HTTP 403);
- negotiates the OCPP version among those configured for the charger, per
  connection (a charger offering none is read as 1.6 when its quirks allow).

Each accepted connection becomes a :class:`~ies_agent.ocpp.session.ChargerSession`
of the charger's :class:`~ies_agent.ocpp.session.ChargerHub`. With ``[ocpp.csms]``
every hub gets an :class:`~ies_agent.ocpp.bridge.UpstreamLink`.

Public API beyond :meth:`CentralSystem.run`: :meth:`~CentralSystem.set_dispatch_limit`
and :meth:`~CentralSystem.clear_dispatch_limit` (dispatch), :meth:`~CentralSystem.
set_location_rewriter` (firmware bridge), :meth:`~CentralSystem.wait_delivered`.

Errors::

    OcppSetupError    the central system cannot start: a secret, certificate or the
                      listening port is unusable; says which and why
    UnknownCharger    a dispatch names a charger the agent does not know
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import logging
import ssl
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlsplit
from weakref import WeakKeyDictionary

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from ies_agent.clock import Clock, SystemClock
from ies_agent.ocpp.bridge import CsmsReachability, UpstreamLink
from ies_agent.ocpp.config import CHARGER_ID, ChargerConfig, OcppConfig
from ies_agent.ocpp.journal import ChargerStore, JournalError
from ies_agent.ocpp.session import (
    ChargerHub,
    ChargerSession,
    DispatchLimit,
    EvidenceWriter,
    FileBridge,
    LocationRewriter,
)
from ies_drivers.ocpp.measurands import MeasurandTableError, load_measurand_table
from ies_drivers.ocpp.versions import OcppVersion, negotiate

if TYPE_CHECKING:
    from ies_agent.state import AgentState

log = logging.getLogger(__name__)

OCPP_DIR = "ocpp"
"""Sub-directory of the data directory holding one directory per charger."""
RECONNECT_MAX_S = 30.0


class OcppSetupError(Exception):
    """The central system cannot start; the message says what to fix."""


class UnknownCharger(KeyError):
    """A call names a charger the central system does not know."""


class CentralSystem:
    """The site's OCPP central system and, with a CSMS configured, the bridge to it."""

    def __init__(
        self,
        config: OcppConfig,
        *,
        data_dir: Path,
        evidence: EvidenceWriter,
        state: AgentState,
        clock: Clock | None = None,
        reconnect_max_s: float = RECONNECT_MAX_S,
    ) -> None:
        """Prepare (nothing listens until :meth:`run`).

        Reads the measurand table, passwords and certificates now, so a bad file
        fails at start: raises :class:`OcppSetupError`.
        """
        self.config = config
        self.data_dir = Path(data_dir)
        self.evidence = evidence
        self.state = state
        self.clock = clock or SystemClock()
        self.reconnect_max_s = reconnect_max_s
        self.hubs: dict[str, ChargerHub] = {}
        self._reachability = CsmsReachability()
        """Shared by every charger's CSMS link: one getting through wakes the rest."""
        self._server: Server | None = None
        self._handshakes: WeakKeyDictionary[
            ServerConnection, tuple[ChargerConfig, list[str]]
        ]
        self._handshakes = WeakKeyDictionary()
        self._refused: set[str] = set()
        self._location_rewriter: LocationRewriter | None = None
        self._file_bridge: FileBridge | None = None
        try:
            self.table = load_measurand_table(config.measurands)
        except MeasurandTableError as exc:
            raise OcppSetupError(f"measurand table unusable:\n{exc}") from None
        self._passwords = {
            cid: _read_secret(c.password_file)
            for cid, c in config.chargers.items()
            if c.password_file is not None
        }
        self._csms_passwords = {
            cid: _read_secret(c.csms_password_file)
            for cid, c in config.chargers.items()
            if c.csms_password_file is not None
        }
        self._csms_default_password = (
            _read_secret(config.csms.password_file)
            if config.csms is not None and config.csms.password_file is not None
            else None
        )
        self._server_ssl = _server_ssl(config)
        self._client_ssl = _client_ssl(config)

    # --- running ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port the server listens on (after :meth:`run` reported ready)."""
        if self._server is None:
            raise RuntimeError("the central system is not running")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def run(
        self,
        stop: asyncio.Event,
        *,
        ready: Callable[[CentralSystem], None] | None = None,
    ) -> None:
        """:meth:`start`, call ``ready(self)``, then :meth:`serve` until ``stop``."""
        await self.start()
        if ready is not None:
            ready(self)
        await self.serve(stop)

    async def start(self) -> None:
        """Open the listening socket and resume journals left by an earlier run.

        Raises :class:`OcppSetupError` when the port cannot be opened.
        """
        config = self.config
        try:
            self._server = await serve(
                self._serve_connection,
                config.listen_host,
                config.listen_port,
                process_request=self._process_request,
                select_subprotocol=self._select_subprotocol,
                subprotocols=[Subprotocol(v.subprotocol) for v in config.versions],
                ssl=self._server_ssl,
                compression=None,
                ping_interval=30,
                ping_timeout=30,
                max_size=1 << 20,
                server_header=None,
            )
        except OSError as exc:
            raise OcppSetupError(
                f"cannot listen on {config.listen_host}:{config.listen_port}: "
                f"{exc.strerror or exc}"
            ) from None
        scheme = "wss" if self._server_ssl is not None else "ws"
        log.info(
            "OCPP central system on %s://%s:%d/<charger id> (security profile %d)%s",
            scheme,
            config.listen_host,
            self.port,
            config.security_profile,
            f", bridged to {config.csms.url}" if config.csms else "",
        )
        self._resume_backlogs()

    async def serve(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then deliver what is queued (bounded by
        ``drain_timeout_s``) and close every connection and file."""
        server = self._server
        if server is None:
            raise RuntimeError("start() the central system first")
        config = self.config
        try:
            await stop.wait()
            if config.csms is not None:
                delivered = await self.wait_delivered(config.drain_timeout_s)
                if not delivered:
                    left = sum(h.store.backlog for h in self.hubs.values())
                    log.warning(
                        "stopping with %d message(s) not yet at the CSMS; they stay "
                        "in the journal and go at the next start",
                        left,
                    )
        finally:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 10)
            for hub in list(self.hubs.values()):
                await hub.close()
            self._server = None

    async def wait_delivered(self, timeout_s: float) -> bool:
        """Wait until every journal is delivered to the CSMS; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            if all(hub.store.backlog == 0 for hub in self.hubs.values()):
                return True
            if time.monotonic() >= deadline:
                return False
            for hub in self.hubs.values():
                if hub.link is not None and hub.store.backlog:
                    hub.link.start()
                    hub.link.wake()
            await asyncio.sleep(0.1)

    def _resume_backlogs(self) -> None:
        """Start delivering journals left by an earlier run."""
        root = self.data_dir / OCPP_DIR
        if self.config.csms is None or not root.is_dir():
            return
        for directory in sorted(root.iterdir()):
            charger = self.config.charger(directory.name)
            if charger is None or not directory.is_dir():
                continue
            hub = self._hub(charger)
            if hub.store.backlog and hub.link is not None:
                log.info(
                    "%s: %d message(s) from an earlier run still to deliver",
                    hub.charger_id,
                    hub.store.backlog,
                )
                hub.link.start()

    def _hub(self, charger: ChargerConfig) -> ChargerHub:
        hub = self.hubs.get(charger.id)
        if hub is not None:
            return hub
        try:
            store = ChargerStore.open(self.data_dir / OCPP_DIR / charger.id)
        except JournalError as exc:
            raise OcppSetupError(str(exc)) from None
        hub = ChargerHub(
            charger,
            self.config,
            store,
            evidence=self.evidence,
            table=self.table,
            clock=self.clock,
            status=self.state.charger(charger.id),
            location_rewriter=lambda: self._location_rewriter,
            file_bridge=lambda: self._file_bridge,
        )
        csms = self.config.csms
        if csms is not None:
            password = self._csms_passwords.get(charger.id, self._csms_default_password)
            hub.link = UpstreamLink(
                hub,
                csms,
                password=password,
                ssl_context=self._client_ssl,
                call_timeout_s=self.config.call_timeout_s,
                reconnect_max_s=self.reconnect_max_s,
                on_event=hub.record_event,
                on_connected=hub.csms_connected,
                reachability=self._reachability,
            )
            hub.status.csms_connected = False
        self.hubs[charger.id] = hub
        return hub

    # --- handshake --------------------------------------------------------------------

    def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        """Identify and authenticate the charger before the WebSocket opens."""
        path = urlsplit(request.path).path
        charger_id = unquote(path.rstrip("/").rsplit("/", 1)[-1])
        if not CHARGER_ID.fullmatch(charger_id):
            return connection.respond(
                HTTPStatus.NOT_FOUND, "no charger identity in the path\n"
            )
        charger = self.config.charger(charger_id)
        if charger is None:
            if charger_id not in self._refused and len(self._refused) < 1000:
                self._refused.add(charger_id)
                log.warning(
                    "refused unknown charger %r (not in [[ocpp.chargers]])", charger_id
                )
            return connection.respond(HTTPStatus.NOT_FOUND, "unknown charger\n")
        profile = self.config.security_profile
        if profile in (1, 2) and not self._basic_auth_ok(charger_id, request):
            log.warning("%s: basic authentication failed", charger_id)
            response = connection.respond(
                HTTPStatus.UNAUTHORIZED, "authentication failed\n"
            )
            response.headers["WWW-Authenticate"] = 'Basic realm="ocpp", charset="UTF-8"'
            return response
        if profile == 3:
            common_name = _peer_common_name(connection)
            if common_name != charger_id:
                log.warning(
                    "%s: client certificate is for %r, not this charger",
                    charger_id,
                    common_name,
                )
                return connection.respond(
                    HTTPStatus.FORBIDDEN, "certificate does not match\n"
                )
        offered = request.headers.get_all("Sec-WebSocket-Protocol")
        names = [n.strip() for value in offered for n in value.split(",") if n.strip()]
        self._handshakes[connection] = (charger, names)
        return None

    def _basic_auth_ok(self, charger_id: str, request: Request) -> bool:
        expected = self._passwords.get(charger_id)
        header = request.headers.get("Authorization", "")
        if expected is None or not header.lower().startswith("basic "):
            return False
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        user, sep, password = decoded.partition(b":")
        if not sep:
            return False
        user_ok = hmac.compare_digest(user, charger_id.encode())
        return hmac.compare_digest(password, expected) and user_ok

    def _select_subprotocol(
        self, connection: ServerConnection, offered: Any
    ) -> Subprotocol | None:
        entry = self._handshakes.get(connection)
        if entry is None:
            return None
        charger, _names = entry
        version = negotiate(offered, charger.versions)
        return Subprotocol(version.subprotocol) if version is not None else None

    async def _serve_connection(self, connection: ServerConnection) -> None:
        entry = self._handshakes.pop(connection, None)
        if entry is None:
            await connection.close(1011, "handshake state lost")
            return
        charger, offered = entry
        if connection.subprotocol is not None:
            version = OcppVersion.parse(connection.subprotocol)
        elif (
            not offered
            and OcppVersion.V16 in charger.versions
            and charger.quirks.allows("no_subprotocol")
        ):
            log.warning("%s: offered no subprotocol; speaking OCPP 1.6", charger.id)
            version = OcppVersion.V16
        else:
            allowed = ", ".join(v.subprotocol for v in charger.versions)
            log.warning(
                "%s: no common OCPP version (offered %s, allowed %s)",
                charger.id,
                ", ".join(offered) or "none",
                allowed,
            )
            await connection.close(1002, f"no common OCPP version; allowed: {allowed}")
            return
        hub = self._hub(charger)
        session = ChargerSession(hub, connection, version)
        await hub.attach(session)
        log.info("%s: connected as %s", charger.id, version.subprotocol)
        try:
            await session.run()
        finally:
            hub.detach(session)
            log.info("%s: disconnected", charger.id)

    # --- dispatch and firmware bridge -------------------------------------------------

    async def set_dispatch_limit(
        self,
        charger_id: str,
        limit: Decimal | int | str,
        *,
        unit: Literal["A", "W"],
        until: datetime,
    ) -> str:
        """Limit ``charger_id`` to ``limit`` A or W (``unit``) until ``until``.

        Sends a station-wide charging profile at ``dispatch_stack_level`` (above any
        profile the CSMS sets; the bridge keeps the CSMS's below it), re-sends it when
        the charger reconnects or the CSMS clears profiles, and removes it at
        ``until``. Returns the charger's answer (``Accepted``, ``Rejected``, ...), or
        ``Pending`` when the charger is not connected (applied when it connects).
        Every step is an evidence event. Raises :class:`UnknownCharger` and
        ``ValueError`` for a limit that is not a non-negative number or a naive
        ``until``.
        """
        hub = self._dispatch_hub(charger_id)
        try:
            amount = Decimal(str(limit))
        except InvalidOperation:
            raise ValueError(f"dispatch limit {limit!r} is not a number") from None
        if not amount.is_finite() or amount < 0:
            raise ValueError(f"dispatch limit {limit!r} must be a number >= 0")
        if until.tzinfo is None:
            raise ValueError("until must carry a time zone (UTC)")
        if unit not in ("A", "W"):
            raise ValueError(f"unit {unit!r} must be 'A' or 'W'")
        return await hub.set_dispatch(
            DispatchLimit(amount, unit, until.astimezone(UTC))
        )

    async def clear_dispatch_limit(self, charger_id: str) -> str:
        """Remove the dispatch limit of ``charger_id`` now; return the charger's answer
        (``NotConnected`` when it is not connected). Raises :class:`UnknownCharger`."""
        return await self._dispatch_hub(charger_id).set_dispatch(None)

    def set_location_rewriter(self, rewriter: LocationRewriter | None) -> None:
        """Have ``rewriter(charger_id, action, location)`` choose the file locations
        chargers see in UpdateFirmware, SignedUpdateFirmware, GetDiagnostics and
        GetLog calls from the CSMS (the firmware bridge serves them); ``None``: pass
        them through unchanged."""
        self._location_rewriter = rewriter

    def set_file_bridge(self, bridge: FileBridge | None) -> None:
        """Hand firmware and diagnostics calls from the CSMS to ``bridge`` (the
        firmware bridge's client), which chooses what the charger sees and hears
        the charger's status reports; ``None``: pass them through unchanged."""
        self._file_bridge = bridge

    def _dispatch_hub(self, charger_id: str) -> ChargerHub:
        hub = self.hubs.get(charger_id)
        if hub is not None:
            return hub
        charger = self.config.chargers.get(charger_id)
        if charger is None:
            raise UnknownCharger(charger_id)
        return self._hub(charger)


def _read_secret(path: Path | None) -> bytes:
    """Read a password file (one line; the trailing newline is not part of it)."""
    if path is None:
        raise OcppSetupError("no password file given")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise OcppSetupError(
            f"cannot read password file {path}: {exc.strerror}"
        ) from None
    secret = data.rstrip(b"\r\n")
    if not secret:
        raise OcppSetupError(f"password file {path} is empty")
    return secret


def _server_ssl(config: OcppConfig) -> ssl.SSLContext | None:
    """TLS context toward chargers for security profiles 2 and 3."""
    if config.security_profile not in (2, 3):
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise OcppSetupError(
            f"security profile {config.security_profile} needs tls_cert and tls_key"
        )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
        if config.security_profile == 3:
            if config.client_ca is None:
                raise OcppSetupError("security profile 3 needs client_ca")
            context.load_verify_locations(config.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise OcppSetupError(f"cannot load the TLS certificate or key: {exc}") from None
    return context


def _client_ssl(config: OcppConfig) -> ssl.SSLContext | None:
    """TLS context toward the CSMS (wss:// addresses)."""
    csms = config.csms
    if csms is None or not csms.url.startswith("wss://"):
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if csms.ca_file is not None:
            context.load_verify_locations(csms.ca_file)
        if csms.security_profile == 3 and csms.client_cert and csms.client_key:
            context.load_cert_chain(csms.client_cert, csms.client_key)
    except (OSError, ssl.SSLError) as exc:
        raise OcppSetupError(f"cannot load the CSMS TLS files: {exc}") from None
    return context


def _peer_common_name(connection: ServerConnection) -> str | None:
    ssl_object = connection.transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
