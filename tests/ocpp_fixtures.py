"""Helpers for the OCPP tests: a running central system, raw clients, certificates.

- :func:`running_central`: the agent's :class:`CentralSystem` on a free loopback port
  with a real evidence log in a temporary directory, stopped on exit.
- :class:`RawCharger`: a WebSocket client that sends exactly the text it is given, to
  play field cases and malformed input byte for byte.
- :func:`make_pki`: a CA, a server certificate for 127.0.0.1 and client certificates,
  made with ``cryptography`` for the TLS security profiles.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from ies_agent.evidence.log import EvidenceLog
from ies_agent.ocpp.config import ChargerConfig, CsmsConfig, OcppConfig
from ies_agent.ocpp.server import CentralSystem
from ies_agent.state import AgentState
from ies_drivers.ocpp.versions import ALL_VERSIONS, OcppVersion


@dataclass
class Running:
    """A running central system, its log and where it is."""

    central: CentralSystem
    evidence: EvidenceLog
    state: AgentState
    data_dir: Path
    stop: asyncio.Event
    scheme: str = "ws"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.central.port}/ocpp"

    def entries(self) -> list[dict[str, Any]]:
        lines = (self.data_dir / "evidence.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    def events(self, ev: str) -> list[dict[str, Any]]:
        return [e for e in self.entries() if e.get("ev") == ev]


def ocpp_config(
    chargers: dict[str, tuple[OcppVersion, ...]] | None = None,
    *,
    csms_url: str | None = None,
    **overrides: Any,
) -> OcppConfig:
    """An ``OcppConfig`` on a free port, security profile 0, short timeouts."""
    known = {
        cid: ChargerConfig(cid, versions=versions)
        for cid, versions in (chargers or {}).items()
    }
    settings: dict[str, Any] = {
        "listen_port": 0,
        "security_profile": 0,
        "call_timeout_s": 5.0,
        "answer_wait_s": 2.0,
        "drain_timeout_s": 10.0,
        "chargers": known,
        "csms": CsmsConfig(url=csms_url) if csms_url else None,
    }
    settings.update(overrides)
    return OcppConfig(**settings)


@asynccontextmanager
async def running_central(
    config: OcppConfig, data_dir: Path, *, reconnect_max_s: float = 1.0
) -> AsyncIterator[Running]:
    """Run the central system until the block ends; the log is closed after."""
    evidence = EvidenceLog.open(data_dir, gateway_id="gw-test", interval_s=900)
    state = AgentState("gw-test")
    central = CentralSystem(
        config,
        data_dir=data_dir,
        evidence=evidence,
        state=state,
        reconnect_max_s=reconnect_max_s,
    )
    stop = asyncio.Event()
    await central.start()
    task = asyncio.create_task(central.serve(stop), name="test:central")
    scheme = "wss" if config.security_profile in (2, 3) else "ws"
    try:
        yield Running(central, evidence, state, data_dir, stop, scheme)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        evidence.close()


class RawCharger:
    """A charger that sends literal text frames and reads the answers."""

    def __init__(self, websocket: ClientConnection) -> None:
        self.websocket = websocket

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        url: str,
        charger_id: str,
        version: OcppVersion | None = OcppVersion.V16,
        *,
        password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> AsyncIterator[RawCharger]:
        headers = {}
        if password is not None:
            token = base64.b64encode(f"{charger_id}:{password}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        protocols = [Subprotocol(version.subprotocol)] if version else None
        async with connect(
            f"{url}/{charger_id}",
            subprotocols=protocols,
            additional_headers=headers,
            ssl=ssl_context,
            open_timeout=5,
            proxy=None,
        ) as websocket:
            yield cls(websocket)

    async def send(self, text: str) -> None:
        await self.websocket.send(text)

    async def answer(self, timeout_s: float = 5.0) -> list[Any]:
        """The next frame from the central system, parsed."""
        text = await asyncio.wait_for(self.websocket.recv(), timeout_s)
        frame: list[Any] = json.loads(text)
        return frame

    async def call(self, text: str, timeout_s: float = 5.0) -> list[Any]:
        """Send a frame and return the central system's answer to it."""
        await self.send(text)
        return await self.answer(timeout_s)

    @property
    def subprotocol(self) -> str | None:
        return self.websocket.subprotocol


BOOT_16 = (
    '[2,"b1","BootNotification",{"chargePointVendor":"Test","chargePointModel":"Raw"}]'
)


@dataclass
class Pki:
    """Certificates for the TLS tests (all PEM files in ``directory``)."""

    directory: Path
    ca: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    def client_context(self, charger_id: str | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        if charger_id is not None:
            cert, key = self.clients[charger_id]
            context.load_cert_chain(cert, key)
        return context


def make_pki(directory: Path, client_ids: tuple[str, ...] = ()) -> Pki:
    """Create a CA, a server certificate for 127.0.0.1 and client certificates."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    def issue(name: str, server: bool) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if server:
            import ipaddress

            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        cert_path = directory / f"{name}.pem"
        key_path = directory / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_path, key_path

    server_cert, server_key = issue("gateway", server=True)
    pki = Pki(directory, ca_path, server_cert, server_key)
    for client in client_ids:
        pki.clients[client] = issue(client, server=False)
    return pki


ALL = ALL_VERSIONS
