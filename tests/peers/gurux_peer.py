"""Gurux DLMS (GPL, tests only) as an independent peer: its client and its server.

gurux-dlms is installed for tests only (the ``test`` extra) and never imported by
product code. It checks our implementation from outside:

- :class:`GuruxClient` drives Gurux's ``GXDLMSSecureClient`` over a blocking socket or
  serial file descriptor, to read **our** meter server (public, LLS, HLS-GMAC with
  suite 0, block transfer, selective access by range);
- :class:`GuruxMeter` is a small meter built on Gurux's ``GXDLMSSecureServer``
  (IS 15959 style objects: serial number, voltage register with scaler, clock with
  the Indian time standard, instantaneous profile), served on a pty or TCP, for
  **our** client to read.

Gurux's server does the public and LLS associations here; HLS and block transfer
are checked the other way round (Gurux's client against our server).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

from gurux_dlms import (
    GXByteBuffer,
    GXDateTime,
    GXHdlcSettings,
    GXReplyData,
    GXServerReply,
)
from gurux_dlms.enums import (
    AccessMode,
    Authentication,
    InterfaceType,
    MethodAccessMode,
    Security,
    SourceDiagnostic,
    Standard,
)
from gurux_dlms.objects import (
    GXDLMSAssociationLogicalName,
    GXDLMSCaptureObject,
    GXDLMSClock,
    GXDLMSData,
    GXDLMSProfileGeneric,
    GXDLMSRegister,
)
from gurux_dlms.secure import GXDLMSSecureClient, GXDLMSSecureServer

IST = timezone(timedelta(minutes=330))


def _patch_server_reply() -> None:
    """gurux-dlms 1.0.203's server calls accessors (``setReply``,
    ``getConnectionInfo``, ``getCount``, ``setCount``) that its own
    ``GXServerReply`` lacks; give it the obvious ones so the server can answer."""
    accessors = {
        "setReply": lambda self, value: setattr(self, "reply", value),
        "getConnectionInfo": lambda self: self.connectionInfo,
        "getCount": lambda self: self.count,
        "setCount": lambda self, value: setattr(self, "count", value),
    }
    for name, accessor in accessors.items():
        if not hasattr(GXServerReply, name):
            setattr(GXServerReply, name, accessor)


_patch_server_reply()

if not hasattr(GXHdlcSettings, "update"):
    # ... and its SNRM handler calls GXHdlcSettings.update(), which is missing too.
    def _update(self: Any, other: Any) -> None:
        for name in ("maxInfoTX", "maxInfoRX", "windowSizeTX", "windowSizeRX"):
            setattr(self, name, getattr(other, name))

    GXHdlcSettings.update = _update


class _Line:
    """Blocking bytes over a socket or a serial file descriptor, with a deadline."""

    def __init__(self, sock: socket.socket | None = None, fd: int = -1) -> None:
        self.sock = sock
        self.fd = fd

    def send(self, data: bytes) -> None:
        if self.sock is not None:
            self.sock.sendall(data)
        else:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]

    def receive(self, timeout_s: float) -> bytes:
        handle: Any = self.sock if self.sock is not None else self.fd
        ready, _, _ = select.select([handle], [], [], timeout_s)
        if not ready:
            raise TimeoutError("peer sent nothing in time")
        data = self.sock.recv(4096) if self.sock is not None else os.read(self.fd, 4096)
        if not data:
            raise ConnectionError("peer closed the line")
        return data


class GuruxClient:
    """Gurux's client reading a meter, blocking (run it in a thread)."""

    def __init__(
        self,
        line: _Line,
        *,
        hdlc: bool,
        client_sap: int = 16,
        authentication: int = Authentication.NONE,
        password: bytes | None = None,
        security: int = Security.NONE,
        server_physical: int = 17,
        timeout_s: float = 3.0,
    ) -> None:
        interface = InterfaceType.HDLC if hdlc else InterfaceType.WRAPPER
        server = (
            GXDLMSSecureClient.getServerAddress(1, server_physical, 4) if hdlc else 1
        )
        self.client = GXDLMSSecureClient(
            True, client_sap, server, authentication, password, interface
        )
        self.client.ciphering.security = security
        self.client.ciphering.systemTitle = b"GURUXCLI"
        self.client.standard = Standard.INDIA
        self.client.useUtc2NormalTime = True  # what Gurux's reader does for India
        self.line = line
        self.timeout_s = timeout_s

    @classmethod
    def tcp(cls, port: int, **kwargs: Any) -> GuruxClient:
        sock = socket.create_connection(("127.0.0.1", port), timeout=3)
        return cls(_Line(sock=sock), **kwargs)

    @classmethod
    def serial(cls, path: str, **kwargs: Any) -> GuruxClient:
        import tty

        fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(fd)
        return cls(_Line(fd=fd), **kwargs)

    def close(self) -> None:
        if self.line.sock is not None:
            self.line.sock.close()
        elif self.line.fd >= 0:
            os.close(self.line.fd)

    def _packet(self, data: bytes | None, reply: GXReplyData) -> None:
        if data:
            self.line.send(bytes(data))
        buffer = GXByteBuffer()
        deadline = time.monotonic() + self.timeout_s
        while not self.client.getData(buffer, reply, None):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no complete answer")
            buffer.set(self.line.receive(remaining))
        if reply.error:
            raise RuntimeError(f"meter answered with error {reply.error}")

    def _block(self, data: Any, reply: GXReplyData) -> None:
        if isinstance(data, list):
            for item in data:
                reply.clear()
                self._block(item, reply)
            return
        self._packet(data, reply)
        while reply.isMoreData():
            self.blocks += 1
            self._packet(self.client.receiverReady(reply), reply)

    blocks = 0

    def connect(self) -> None:
        reply = GXReplyData()
        snrm = self.client.snrmRequest()
        if snrm:
            self._packet(snrm, reply)
            self.client.parseUAResponse(reply.data)
            reply.clear()
        self._block(self.client.aarqRequest(), reply)
        self.client.parseAareResponse(reply.data)
        reply.clear()
        if self.client.authentication > Authentication.LOW:
            for request in self.client.getApplicationAssociationRequest():
                self._packet(request, reply)
            self.client.parseApplicationAssociationResponse(reply.data)

    def read(self, item: Any, attribute: int) -> Any:
        reply = GXReplyData()
        self._block(self.client.read(item, attribute)[0], reply)
        return self.client.updateValue(item, attribute, reply.value)

    def read_range(self, profile: Any, start: datetime, end: datetime) -> Any:
        reply = GXReplyData()
        self._block(self.client.readRowsByRange(profile, start, end), reply)
        return self.client.updateValue(profile, 2, reply.value)

    def release(self) -> None:
        reply = GXReplyData()
        with contextlib.suppress(Exception):
            self._block(self.client.releaseRequest(), reply)
            reply.clear()
            disc = self.client.disconnectRequest()
            if disc:
                self._packet(disc, reply)


# --- a Gurux meter ------------------------------------------------------------------


class _GuruxServer(GXDLMSSecureServer):  # type: ignore[misc]
    """Gurux's server with every callback answered permissively."""

    def __init__(self, interface: int, password: bytes) -> None:
        association = GXDLMSAssociationLogicalName()
        association.authenticationMechanismName.mechanismId = Authentication.NONE
        super().__init__(association, interface)
        self.association = association
        self.password = password
        self.settings.standard = Standard.INDIA
        self.settings.useUtc2NormalTime = True  # what Gurux does for India
        if interface == InterfaceType.HDLC:
            # gurux-dlms 1.0.203 answers SNRM from ``self.hdlc`` and reads both
            # the setup object's and the settings' attribute names from it.
            self.hdlc = SimpleNamespace(
                maxInfoTX=128,
                maxInfoRX=128,
                windowSizeTX=1,
                windowSizeRX=1,
                maximumInfoLengthReceive=128,
                maximumInfoLengthTransmit=128,
                windowSizeReceive=1,
                windowSizeTransmit=1,
                inactivityTimeout=0,
            )

    def isTarget(self, server_address: int, client_address: int) -> bool:
        return True

    def onValidateAuthentication(self, authentication: int, password: bytes) -> int:
        if authentication == Authentication.LOW and bytes(password) != self.password:
            return SourceDiagnostic.AUTHENTICATION_FAILURE
        return SourceDiagnostic.NONE

    def onGetAttributeAccess(self, arg: Any) -> int:
        return AccessMode.READ_WRITE

    def onGetMethodAccess(self, arg: Any) -> int:
        return MethodAccessMode.ACCESS

    def onFindObject(self, object_type: int, sn: int, ln: str) -> None:
        return None

    def _nothing(self, *args: Any) -> None:
        return None

    # gurux-dlms 1.0.203's command handlers call these server methods, which its
    # GXDLMSServer does not define; they only pass state through.
    def notifyRead(self, *args: Any) -> None:
        return None

    def notifyConnected(self, info: Any) -> None:
        self.onConnected(info)

    def getTransaction(self) -> Any:
        return self.transaction

    def setTransaction(self, value: Any) -> None:
        self.transaction = value

    onPreGet = onPostGet = onPreRead = onPostRead = _nothing
    onPreWrite = onPostWrite = onPreAction = onPostAction = _nothing
    onConnected = onInvalidConnection = onDisconnected = _nothing


class GuruxMeter:
    """A meter of Gurux's making, served from a thread on a pty or TCP port."""

    SERIAL = "GX0000042"
    VOLTAGE_RAW = 23012
    VOLTAGE_SCALER = -2

    def __init__(self, *, hdlc: bool, password: bytes = b"ABCDEFGH") -> None:
        interface = InterfaceType.HDLC if hdlc else InterfaceType.WRAPPER
        self.server = _GuruxServer(interface, password)
        self.clock_time = datetime(2025, 7, 23, 8, 30, 24, tzinfo=IST)
        self._build()
        self.server.initialize()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listener: socket.socket | None = None
        self.port = 0

    def _build(self) -> None:
        items = self.server.items
        serial = GXDLMSData("0.0.96.1.0.255")
        serial.value = self.SERIAL.encode()
        from gurux_dlms.enums import DataType

        serial.setDataType(2, DataType.OCTET_STRING)
        voltage = GXDLMSRegister("1.0.12.7.0.255")
        voltage.value = self.VOLTAGE_RAW
        voltage.setDataType(2, DataType.UINT16)
        voltage.scaler = 10**self.VOLTAGE_SCALER
        voltage.unit = 35
        clock = GXDLMSClock()
        clock.time = GXDateTime(self.clock_time)
        clock.timeZone = 330
        profile = GXDLMSProfileGeneric("1.0.94.91.0.255")
        profile.captureObjects.append((clock, GXDLMSCaptureObject(2, 0)))
        profile.captureObjects.append((voltage, GXDLMSCaptureObject(2, 0)))
        profile.buffer.append([GXDateTime(self.clock_time), self.VOLTAGE_RAW])
        profile.capturePeriod = 0
        for obj in (self.server.association, serial, voltage, clock, profile):
            items.append(obj)
        # Gurux fills the association's object list itself only when it is empty,
        # and fails doing so; give it the list.
        for obj in items:
            if isinstance(obj, GXDLMSAssociationLogicalName):
                for member in items:
                    obj.objectList.append(member)

    def _serve(self, line: _Line) -> None:
        while not self._stop.is_set():
            try:
                data = line.receive(0.1)
            except TimeoutError:
                continue
            except (ConnectionError, OSError):
                return
            reply = GXServerReply(bytearray(data))
            self.server.handleRequest(reply)
            if reply.reply:
                line.send(bytes(reply.reply))

    def serve_serial(self, path: str) -> None:
        import tty

        fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(fd)
        self._fd = fd
        self._thread = threading.Thread(
            target=self._serve, args=(_Line(fd=fd),), name="gurux-meter", daemon=True
        )
        self._thread.start()

    def serve_tcp(self) -> int:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.1)
        self._listener = listener
        self.port = int(listener.getsockname()[1])

        def accept_loop() -> None:
            while not self._stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                self.server.reset()
                with conn:
                    self._serve(_Line(sock=conn))

        self._thread = threading.Thread(
            target=accept_loop, name="gurux-meter", daemon=True
        )
        self._thread.start()
        return self.port

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1
