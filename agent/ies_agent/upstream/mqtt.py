"""MQTT upstream on aiomqtt (MQTT 5 or 3.1.1, TLS, user name and password).

Topics, all under ``{prefix}/{gateway id}/``:

==================  =====  ======  =====================================================
topic               QoS    retain  what
==================  =====  ======  =====================================================
``evidence``        1      no      evidence batches (``ies_agent.upstream.payload``)
``status``          1      yes     ``{"state": "online"|"offline", "t", "acked",
                                   ...}`` (``t`` UTC text as in evidence, ``acked``
                                   the cursor); the last will sets it ``offline``
                                   when the link dies
``telemetry``       0      no      live values every ``telemetry_s``; dropped while a
                                   backlog is replayed or the disk alarm is on
``ack``             1      --      inbound: a collector's ``{"upto": N}``
                                   (subscribed with ``e2e_ack = true``)
``cmd/<name>``      1      --      inbound commands, to the command registry
``dispatch/ack``    1      no      acknowledgements of dispatch events to their issuer
==================  =====  ======  =====================================================

A batch counts as delivered only when the broker's PUBACK for its QoS 1 PUBLISH
arrives with a success reason code. paho-mqtt's ``publish()`` returning rc 0, or
``is_published()``, is no such proof while the broker is down (field case FC-13), so
evidence is published through paho's client inside aiomqtt with our own wait on the
PUBACK of that packet id: a PUBACK carrying an error reason (MQTT 5: quota exceeded,
not authorised) is a refusal, not a delivery. aiomqtt's ``publish`` is used for status
and telemetry, where that distinction does not matter. (This reaches
``aiomqtt.Client._client``, stable across the pinned aiomqtt 2.x line.)

The session is persistent (MQTT 3.1.1 ``clean_session = false``; MQTT 5 ``clean_start
= false`` with ``session_expiry_s``) under a fixed client id, so commands sent while
the gateway was away are delivered when it returns.

aiomqtt and paho are imported only when an MQTT upstream connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ies_agent import __version__
from ies_agent.evidence.log import format_time
from ies_agent.state import AgentState
from ies_agent.upstream.commands import CommandRegistry
from ies_agent.upstream.delivery import Batch, Connector
from ies_agent.upstream.errors import (
    AuthError,
    LinkError,
    RejectedError,
    TlsError,
    UpstreamError,
)
from ies_agent.upstream.payload import PayloadError, decode_confirmation, encode_block
from ies_agent.upstream.settings import UpstreamConfig
from ies_agent.upstream.tlsconfig import (
    client_context,
    explain_tls_failure,
    looks_like_tls_failure,
    plain_server_hint,
)

if TYPE_CHECKING:
    import aiomqtt

log = logging.getLogger(__name__)

_NOT_AUTHORISED = {4, 5, 0x86, 0x87, 0x8C}
"""CONNACK codes for bad credentials / not authorised (MQTT 3.1.1 and 5)."""
TELEMETRY_BACKLOG_LIMIT = 1000
"""Entries of backlog above which telemetry is skipped: evidence goes first."""


class MqttTransport:
    """Opens MQTT sessions to one broker for a :class:`Connector`."""

    kind = "mqtt"

    def __init__(
        self,
        config: UpstreamConfig,
        *,
        gateway_id: str,
        state: AgentState,
        commands: CommandRegistry,
        telemetry_allowed: Callable[[], bool] = lambda: True,
        alarms: Callable[[], list[str]] = list,
    ) -> None:
        parts = urlsplit(config.url)
        self.config = config
        self.gateway_id = gateway_id
        self.host = parts.hostname or ""
        self.tls = parts.scheme == "mqtts"
        self.port = parts.port or (8883 if self.tls else 1883)
        self.target = f"{parts.scheme}://{self.host}:{self.port}"
        base = f"{config.prefix}/{gateway_id}"
        self.topic_evidence = f"{base}/evidence"
        self.topic_status = f"{base}/status"
        self.topic_telemetry = f"{base}/telemetry"
        self.topic_ack = f"{base}/ack"
        self.topic_commands = f"{base}/cmd/"
        self.topic_dispatch_ack = f"{base}/dispatch/ack"
        self.session: MqttSession | None = None
        """The live session, while connected (for :meth:`publish_dispatch_ack`)."""
        self.client_id = config.client_id or f"{gateway_id}-{config.name}"
        self.state = state
        self.commands = commands
        self.telemetry_allowed = telemetry_allowed
        self.alarms = alarms
        self.connector: Connector | None = None
        self._shutdown = False

    def bind(self, connector: Connector) -> None:
        """Remember the connector (for confirmations and backlog)."""
        self.connector = connector

    def shutting_down(self) -> None:
        """Say the agent is stopping: the next disconnect publishes ``offline``."""
        self._shutdown = True

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[MqttSession]:
        """Connect, subscribe, announce ``online``; yield the session; clean up.

        Raises :class:`TlsError` (bad certificate: never retried without TLS),
        :class:`AuthError` (credentials refused) or :class:`LinkError`.
        """
        import aiomqtt

        client = self._client()
        try:
            await client.__aenter__()
        except aiomqtt.MqttCodeError as exc:
            raise self._connect_refused(exc) from None
        except aiomqtt.MqttError as exc:
            raise self._connect_failed(str(exc)) from None
        session = MqttSession(self, client)
        try:
            await session.start()
            self.session = session
            yield session
        finally:
            self.session = None
            await session.close(shutdown=self._shutdown)

    async def publish_dispatch_ack(self, body: Mapping[str, Any]) -> bool:
        """Publish a dispatch acknowledgement (JSON) on ``dispatch/ack`` at QoS 1.

        Returns whether the broker took it (PUBACK within ``timeout_s``); ``False``
        while not connected or when the publish fails: the caller records that.
        """
        session = self.session
        if session is None or session.lost.is_set():
            return False
        payload = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        try:
            await session.client.publish(
                self.topic_dispatch_ack,
                payload,
                qos=1,
                timeout=self.config.timeout_s,
            )
        except Exception as exc:  # aiomqtt.MqttError and timeouts: not delivered
            log.warning(
                "dispatch acknowledgement not published",
                extra={"kv": {"upstream": self.config.name, "error": str(exc)}},
            )
            return False
        return True

    # --- connecting -------------------------------------------------------------------

    def _client(self) -> aiomqtt.Client:
        import aiomqtt
        from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        config = self.config
        context = None
        if self.tls:
            context = client_context(
                ca_file=config.tls_ca_file,
                cert_file=config.tls_cert_file,
                key_file=config.tls_key_file,
                upstream=config.name,
            )
        password = self._password()
        v5 = config.protocol == "5"
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = config.session_expiry_s
        will = aiomqtt.Will(
            self.topic_status,
            self._status("offline", "connection lost"),
            qos=1,
            retain=True,
        )
        client = aiomqtt.Client(
            self.host,
            self.port,
            username=config.username,
            password=password,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            will=will,
            clean_session=None if v5 else False,
            clean_start=False if v5 else MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
            keepalive=config.keepalive_s,
            timeout=config.timeout_s,
            tls_context=context,
            max_inflight_messages=max(config.inflight, 2) + 2,
            max_queued_incoming_messages=1000,
        )
        # aiomqtt bounds the wait for CONNACK by ``timeout``; the TCP connect and
        # TLS handshake before it are paho's, 5 s unless told: bound them alike.
        client._client.connect_timeout = config.timeout_s
        return client

    def _password(self) -> str | None:
        path = self.config.password_file
        if path is None:
            return None
        try:
            return path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise AuthError(
                f"upstream {self.config.name}: cannot read password_file {path}: "
                f"{exc.strerror}"
            ) from None

    def _connect_refused(self, exc: Exception) -> UpstreamError:
        code = getattr(exc, "rc", None)
        value = getattr(code, "value", code)
        text = f"broker {self.target} refused the connection: {exc}"
        if value in _NOT_AUTHORISED:
            return AuthError(
                f"{text}; check username, password_file and the client certificate"
            )
        return LinkError(text)

    def _connect_failed(self, text: str) -> UpstreamError:
        """Map a failed connect (aiomqtt's message) to our error, with a hint."""
        if self.tls:
            hint = plain_server_hint(text, "MQTT")
            if hint is None and looks_like_tls_failure(text):
                hint = explain_tls_failure(text)
            if hint is not None:
                return TlsError(
                    f"TLS to {self.target} failed: {hint} ({text}); the agent will "
                    "not connect without TLS"
                )
        if "timed out" in text.lower():
            return LinkError(
                f"no answer from broker {self.target} within "
                f"{self.config.timeout_s:g} s while connecting ({text}): is the host "
                "reachable from here and the port open?"
            )
        return LinkError(f"cannot reach broker {self.target}: {text}")

    # --- payloads ---------------------------------------------------------------------

    def _status(self, state: str, reason: str = "") -> bytes:
        """The retained status message: ``t`` in UTC ISO 8601 text as in evidence,
        ``acked`` the cursor when it is made (for the last will: at connect)."""
        body: dict[str, Any] = {
            "gw": self.gateway_id,
            "state": state,
            "sw": __version__,
            "t": format_time(int(time.time() * 1000)),
        }
        if reason:
            body["reason"] = reason
        if state == "online":
            body["alarms"] = self.alarms()
        if self.connector is not None:
            body["acked"] = self.connector.cursor.acked
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def telemetry(self) -> bytes:
        """Return the live values of every device as one telemetry message."""
        devices: dict[str, dict[str, Any]] = {}
        for device_id, device in self.state.devices.items():
            values = {
                name: {"v": r.value, "u": r.unit, "obis": r.obis, "st": r.state.value}
                for name, r in device.values.items()
            }
            devices[device_id] = {"online": device.online, "values": values}
        body = {
            "gw": self.gateway_id,
            "t": format_time(int(time.time() * 1000)),
            "devices": devices,
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


class MqttSession:
    """One connection: evidence publishing with PUBACK waits, inbound, telemetry."""

    def __init__(self, transport: MqttTransport, client: aiomqtt.Client) -> None:
        self.transport = transport
        self.client = client
        self.window = transport.config.inflight
        self.lost = asyncio.Event()
        self.lost_reason = ""
        self._paho = client._client
        self._pubacks: dict[int, asyncio.Future[int]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._alarms: list[str] = []
        chained: Any = self._paho.on_publish

        def on_publish(
            c: Any, userdata: Any, mid: int, reason: Any, props: Any
        ) -> None:
            future = self._pubacks.pop(mid, None)
            if future is not None and not future.done():
                future.set_result(int(getattr(reason, "value", reason or 0)))
            if chained is not None:
                chained(c, userdata, mid, reason, props)

        self._paho.on_publish = on_publish

    async def start(self) -> None:
        """Subscribe to commands (and confirmations), announce ``online``."""
        transport = self.transport
        topics = [(f"{transport.topic_commands}#", 1)]
        if transport.config.e2e_ack:
            topics.append((transport.topic_ack, 1))
        name = transport.config.name
        self._tasks.append(
            asyncio.create_task(self._receive(), name=f"upstream:{name}:receive")
        )
        try:
            await self.client.subscribe(topics, timeout=transport.config.timeout_s)
            self._alarms = transport.alarms()
            await self.client.publish(
                transport.topic_status,
                transport._status("online"),
                qos=1,
                retain=True,
                timeout=transport.config.timeout_s,
            )
        except Exception as exc:  # aiomqtt.MqttError and timeouts: the link failed
            raise LinkError(f"broker {transport.target}: {exc}") from None
        if transport.config.telemetry_s > 0:
            self._tasks.append(
                asyncio.create_task(
                    self._telemetry(), name=f"upstream:{name}:telemetry"
                )
            )

    async def send(self, batch: Batch) -> None:
        """Publish ``batch`` at QoS 1 and return once its PUBACK says success.

        Raises :class:`LinkError` when the broker cannot be written to or does not
        acknowledge within ``timeout_s``, :class:`RejectedError` for a PUBACK with a
        failure reason code.
        """
        from paho.mqtt.client import MQTT_ERR_SUCCESS

        transport = self.transport
        connector = transport.connector
        assert connector is not None
        payload = encode_block(
            gw=connector.gateway_id,
            origin=connector.origin,
            first=batch.first,
            block=batch.block,
            count=batch.count,
            checkpoints=batch.checkpoints,
        )
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        info = self._paho.publish(transport.topic_evidence, payload, qos=1)
        if info.rc != MQTT_ERR_SUCCESS:
            raise LinkError(
                f"broker {transport.target}: cannot publish (paho rc {info.rc})"
            )
        self._pubacks[info.mid] = future
        try:
            reason = await asyncio.wait_for(future, timeout=transport.config.timeout_s)
        except TimeoutError:
            raise LinkError(
                f"broker {transport.target}: no PUBACK for entries "
                f"{batch.first}..{batch.last} within {transport.config.timeout_s:g} s"
            ) from None
        finally:
            self._pubacks.pop(info.mid, None)
        if reason >= 0x80:
            raise RejectedError(
                f"broker {transport.target} refused entries {batch.first}..{batch.last}"
                f" (PUBACK reason 0x{reason:02x})",
                reason=f"0x{reason:02x}",
            )

    async def close(self, *, shutdown: bool) -> None:
        """Stop background tasks; say ``offline`` if stopping; disconnect."""
        link_up = not self.lost.is_set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if shutdown and link_up:
            # Queued before DISCONNECT, which then suppresses the will.
            self._paho.publish(
                self.transport.topic_status,
                self.transport._status("offline", "shutdown"),
                qos=1,
                retain=True,
            )
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.__aexit__(None, None, None), timeout=2)

    async def _receive(self) -> None:
        """Take confirmations and commands until the connection drops."""
        import aiomqtt

        transport = self.transport
        prefix = transport.topic_commands
        try:
            async for message in self.client.messages:
                topic = message.topic.value
                payload = message.payload
                data = payload if isinstance(payload, bytes) else str(payload).encode()
                if topic == transport.topic_ack and transport.connector is not None:
                    try:
                        transport.connector.confirm(decode_confirmation(data))
                    except PayloadError as exc:
                        log.warning(
                            "ignoring a bad confirmation",
                            extra={"kv": {"topic": topic, "error": str(exc)}},
                        )
                elif topic.startswith(prefix):
                    await transport.commands.dispatch(
                        topic[len(prefix) :], data, upstream=transport.config.name
                    )
        except aiomqtt.MqttError as exc:
            cause = exc.__cause__
            self.lost_reason = f"connection to {transport.target} lost" + (
                f": {cause}" if cause else ""
            )
        finally:
            if not self.lost_reason:
                self.lost_reason = f"connection to {transport.target} closed"
            self.lost.set()

    async def _telemetry(self) -> None:
        """Publish live values at QoS 0; skip while evidence has a backlog."""
        transport = self.transport
        period = transport.config.telemetry_s
        while True:
            await asyncio.sleep(period)
            alarms = transport.alarms()
            if alarms != self._alarms:
                self._alarms = alarms
                self._paho.publish(
                    transport.topic_status,
                    transport._status("online"),
                    qos=1,
                    retain=True,
                )
            connector = transport.connector
            backlog = connector.state.backlog_entries if connector else 0
            if backlog > TELEMETRY_BACKLOG_LIMIT or not transport.telemetry_allowed():
                continue
            self._paho.publish(transport.topic_telemetry, transport.telemetry(), qos=0)
