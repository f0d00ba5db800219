"""Helpers for the firmware bridge tests: publisher keys, the bridge as a process,
a charger that really downloads, and a CSMS that answers file status notifications.

- :class:`Publisher`: an Ed25519 manifest key and a P-256 CA with a signing
  certificate, written as a trust directory; signs manifests and firmware files.
- :class:`BridgeProcess`: ``ies-firmware-bridge`` in a child process on a free port,
  started until it prints ready, killed by its own pid (SIGKILL or SIGTERM).
- :class:`DownloadingCharger`: an OCPP 1.6 / 2.0.1 charger built on the ``ocpp``
  package (independent of the agent) that, on ``UpdateFirmware``, fetches the file
  from the location it was given and reports Downloading, Downloaded, Installing,
  Installed (or DownloadFailed), and on ``GetDiagnostics`` / ``GetLog`` uploads a
  file with HTTP PUT. The demo chargers in ``ies_agent.ocpp.simulator`` only note
  these calls, so this one stands in for them here.
- :func:`start_csms`: the test CSMS of ``peers.ocpp_csms`` with handlers for the
  firmware, diagnostics and log status notifications and DataTransfer added.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from ies_agent.signing.manifest import sign_manifest
from ies_drivers.ocpp.versions import OcppVersion

HERE = Path(__file__).resolve().parent


# --- the publisher --------------------------------------------------------------------


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )


@dataclass
class Publisher:
    """A firmware publisher: manifest key, CA, signing certificate; ``trust_dir``
    holds what a gateway trusts (the public key and the CA)."""

    trust_dir: Path
    manifest_key: ed25519.Ed25519PrivateKey = field(
        default_factory=ed25519.Ed25519PrivateKey.generate
    )
    ca_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    signing_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )

    def __post_init__(self) -> None:
        self.trust_dir.mkdir(parents=True, exist_ok=True)
        self.ca = _cert(
            "Test Publisher CA", self.ca_key, "Test Publisher CA", self.ca_key, ca=True
        )
        self.signing_cert = _cert(
            "Test Firmware Signer",
            self.signing_key,
            "Test Publisher CA",
            self.ca_key,
            ca=False,
        )
        (self.trust_dir / "publisher.pem").write_bytes(
            self.manifest_key.public_key().public_bytes(
                serialization.Encoding.PEM,
                serialization.PublicFormat.SubjectPublicKeyInfo,
            )
        )
        (self.trust_dir / "publisher-ca.pem").write_bytes(
            self.ca.public_bytes(serialization.Encoding.PEM)
        )

    def manifest(
        self, name: str, data: bytes, key: ed25519.Ed25519PrivateKey | None = None
    ) -> bytes:
        """A signed manifest naming ``data`` as file ``name``."""
        body = {
            "name": "charger-firmware",
            "version": "2.1.0",
            "file": name,
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        return sign_manifest(body, [key or self.manifest_key])

    def cert_pem(self) -> str:
        return self.signing_cert.public_bytes(serialization.Encoding.PEM).decode()

    def signature(
        self, data: bytes, key: ec.EllipticCurvePrivateKey | None = None
    ) -> str:
        """Base64 ECDSA-SHA256 signature over ``data`` (what 2.0.1 carries)."""
        raw = (key or self.signing_key).sign(data, ec.ECDSA(hashes.SHA256()))
        return base64.b64encode(raw).decode()


# --- the bridge process ---------------------------------------------------------------


class BridgeProcess:
    """``ies-firmware-bridge`` as a child process; state survives restarts."""

    def __init__(self, root: Path, trust_dir: Path, *extra: str) -> None:
        self.root = root
        self.trust_dir = trust_dir
        self.extra = extra
        # A unix socket path must stay short (108 bytes).
        self.socket = Path(tempfile.mkdtemp(prefix="fwb-", dir="/tmp")) / "bridge.sock"
        self.proc: subprocess.Popen[str] | None = None
        self.base_url = ""
        self.log_path = root / "bridge.log"

    def start(self, timeout_s: float = 15.0) -> None:
        args = [
            sys.executable,
            "-m",
            "ies_firmware_bridge.cli",
            "--state-dir",
            str(self.root / "state"),
            "--cache-dir",
            str(self.root / "cache"),
            "--socket",
            str(self.socket),
            "--listen",
            "127.0.0.1",
            "--port",
            "0",
            "--trust-dir",
            str(self.trust_dir),
            "--hold-s",
            "5",
            "--retries",
            "3",
            "--connect-timeout-s",
            "2",
            "--read-timeout-s",
            "2",
            *self.extra,
        ]
        self.root.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("a")
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=log, text=True, env=dict(os.environ)
        )
        log.close()
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("bridge ready"):
            self.kill()
            raise RuntimeError(
                f"bridge did not start: {self.log_path.read_text()[-2000:]}"
            )
        self.base_url = line.split()[-1]

    def remove_socket_dir(self) -> None:
        """Remove the short temporary directory of the socket (after the last run)."""
        shutil.rmtree(self.socket.parent, ignore_errors=True)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(15)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None


# --- a charger that downloads ---------------------------------------------------------


class DownloadingCharger:
    """A charger that really fetches firmware and uploads diagnostics over HTTP."""

    def __init__(self, charger_id: str, version: OcppVersion, base_url: str) -> None:
        self.charger_id = charger_id
        self.version = version
        self.url = base_url.rstrip("/") + "/" + charger_id
        self.images: list[bytes] = []
        self.fetch_statuses: list[int] = []
        self.locations: list[str] = []
        self.reported: list[str] = []
        self.done = asyncio.Event()
        self.booted = asyncio.Event()
        self._station: Any = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._runner = asyncio.create_task(
            self._run(), name=f"charger:{self.charger_id}"
        )

    async def stop(self) -> None:
        for task in [*self._tasks, *([self._runner] if self._runner else [])]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _run(self) -> None:
        async with connect(
            self.url,
            subprotocols=[Subprotocol(self.version.subprotocol)],
            open_timeout=5,
            proxy=None,
        ) as websocket:
            station = _charger_class(self.version)(
                self.charger_id, websocket, response_timeout=10
            )
            station.owner = self
            self._station = station
            reader = asyncio.create_task(station.start())
            await self._boot()
            self.booted.set()
            await reader

    async def _boot(self) -> None:
        if self.version.is_16:
            from ocpp.v16 import call

            await self._station.call(
                call.BootNotification(
                    charge_point_vendor="IES Test", charge_point_model="FW-16"
                ),
                suppress=False,
            )
        else:
            from ocpp.v201 import call as call201

            await self._station.call(
                call201.BootNotification(
                    charging_station={"vendorName": "IES Test", "model": "FW-201"},
                    reason="PowerUp",
                ),
                suppress=False,
            )

    def spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def report(self, status: str, request_id: int | None) -> None:
        self.reported.append(status)
        if self.version.is_16:
            from ocpp.v16 import call

            await self._station.call(call.FirmwareStatusNotification(status=status))
        else:
            from ocpp.v201 import call as call201

            await self._station.call(
                call201.FirmwareStatusNotification(status=status, request_id=request_id)
            )

    async def install(self, location: str, request_id: int | None) -> None:
        """Fetch ``location`` (retrying a 503), then 'install' what arrived."""
        self.locations.append(location)
        await self.report("Downloading", request_id)
        data = None
        async with aiohttp.ClientSession() as session:
            for _ in range(20):
                async with session.get(location) as response:
                    self.fetch_statuses.append(response.status)
                    if response.status == 200:
                        data = await response.read()
                        break
                    if response.status != 503:
                        break
                await asyncio.sleep(0.2)
        if data is None:
            await self.report("DownloadFailed", request_id)
            self.done.set()
            return
        self.images.append(data)
        for status in ("Downloaded", "Installing", "Installed"):
            await self.report(status, request_id)
        self.done.set()

    async def upload_log(self, location: str, request_id: int | None) -> None:
        target = location.rstrip("/") + "/station.log"
        if self.version.is_16:
            from ocpp.v16 import call

            await self._station.call(
                call.DiagnosticsStatusNotification(status="Uploading")
            )
        async with (
            aiohttp.ClientSession() as session,
            session.put(target, data=b"log line 1\nlog line 2\n") as response,
        ):
            ok = response.status < 300
        if self.version.is_16:
            from ocpp.v16 import call

            await self._station.call(
                call.DiagnosticsStatusNotification(
                    status="Uploaded" if ok else "UploadFailed"
                )
            )
        else:
            from ocpp.v201 import call as call201

            await self._station.call(
                call201.LogStatusNotification(
                    status="Uploaded" if ok else "UploadFailure", request_id=request_id
                )
            )
        self.done.set()


def _charger_class(version: OcppVersion) -> type:
    from ocpp.routing import on

    if version.is_16:
        from ocpp.v16 import ChargePoint
        from ocpp.v16 import call_result as r16

        class Charger16(ChargePoint):  # type: ignore[misc]
            owner: DownloadingCharger

            @on("UpdateFirmware")
            def update_firmware(self, location: str, **_: Any) -> Any:
                self.owner.spawn(self.owner.install(location, None))
                return r16.UpdateFirmware()

            @on("GetDiagnostics")
            def get_diagnostics(self, location: str, **_: Any) -> Any:
                self.owner.spawn(self.owner.upload_log(location, None))
                return r16.GetDiagnostics(file_name="station.log")

        return Charger16

    from ocpp.v201 import ChargePoint as Cp201
    from ocpp.v201 import call_result as r201

    class Charger201(Cp201):  # type: ignore[misc]
        owner: DownloadingCharger

        @on("UpdateFirmware")
        def update_firmware(self, request_id: int, firmware: Any, **_: Any) -> Any:
            self.owner.spawn(self.owner.install(firmware["location"], request_id))
            return r201.UpdateFirmware(status="Accepted")

        @on("GetLog")
        def get_log(self, log: Any, log_type: str, request_id: int, **_: Any) -> Any:
            self.owner.spawn(self.owner.upload_log(log["remote_location"], request_id))
            return r201.GetLog(status="Accepted", filename="station.log")

    return Charger201


# --- the CSMS -------------------------------------------------------------------------


async def start_csms(port: int, record: Path) -> Any:
    """Start the test CSMS with file status handlers; return it (``stations``,
    ``frames()``, ``stop()``)."""
    from ocpp.routing import on
    from websockets.asyncio.server import serve

    from peers.ocpp_csms import InProcessCsms, _Recorder, _station_class

    csms = InProcessCsms(port, record)
    recorder = _Recorder(record)

    def extend(proto: str) -> type:
        base = _station_class(proto)
        if proto == "ocpp1.6":
            from ocpp.v16 import call_result as r16

            class Files16(base):  # type: ignore[misc, valid-type]
                @on("FirmwareStatusNotification")
                def fw(self, **_: Any) -> Any:
                    return r16.FirmwareStatusNotification()

                @on("SignedFirmwareStatusNotification")
                def signed_fw(self, **_: Any) -> Any:
                    return r16.SignedFirmwareStatusNotification()

                @on("DiagnosticsStatusNotification")
                def diag(self, **_: Any) -> Any:
                    return r16.DiagnosticsStatusNotification()

            return Files16
        from ocpp.v201 import call_result as r201

        class Files201(base):  # type: ignore[misc, valid-type]
            @on("FirmwareStatusNotification")
            def fw(self, **_: Any) -> Any:
                return r201.FirmwareStatusNotification()

            @on("LogStatusNotification")
            def log_status(self, **_: Any) -> Any:
                return r201.LogStatusNotification()

        return Files201

    async def handler(websocket: Any) -> None:
        charger_id = websocket.request.path.rstrip("/").rsplit("/", 1)[-1]
        proto = websocket.subprotocol or "ocpp1.6"
        station = extend(proto)(charger_id, websocket, response_timeout=10)
        station.recorder = recorder
        station.proto = proto
        station.call_during_start = False
        csms.stations[charger_id] = station
        with contextlib.suppress(Exception):
            await station.start()

    csms._server = await serve(
        handler,
        "127.0.0.1",
        port,
        subprotocols=["ocpp2.0.1", "ocpp1.6"],
        compression=None,
    )
    return csms
