"""A real Mosquitto broker and a real MQTT collector for upstream tests.

``Mosquitto`` runs Debian's ``/usr/sbin/mosquitto`` on a free loopback port with its
own config file, log and persistence directory under a temporary directory; it is
started, paused (SIGSTOP), killed and restarted by its process id only. ``TestPki``
makes a throw-away CA, server and client certificates (also an expired and a foreign
one) with ``cryptography``. ``Collector`` is the utility's side: a paho-mqtt client
(its own thread, independent of the agent's aiomqtt code) with a persistent session
that subscribes to a gateway's evidence topic, keeps one copy of every entry by
``seq`` and of every checkpoint, optionally confirms end to end, and writes what it
holds as ``evidence.jsonl`` + ``checkpoints.jsonl`` for ``ies-agent verify``.
``BlackHole`` is a port where a connect hangs, as to an unroutable host.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

MOSQUITTO = "/usr/sbin/mosquitto"


def mosquitto_available() -> bool:
    """Whether Debian's Mosquitto is installed here."""
    return os.access(MOSQUITTO, os.X_OK) or shutil.which("mosquitto") is not None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class BrokerTls:
    """Files of a TLS listener; ``require_certificate`` asks clients for one."""

    ca: Path
    cert: Path
    key: Path
    require_certificate: bool = True


class Mosquitto:
    """One Mosquitto process on 127.0.0.1:``port``, config and data in ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        *,
        persistence: bool = True,
        tls: BrokerTls | None = None,
        port: int | None = None,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or _free_port()
        self.persistence = persistence
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "mosquitto.log"

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT`` (``mqtts://`` with TLS)."""
        scheme = "mqtts" if self.tls else "mqtt"
        return f"{scheme}://127.0.0.1:{self.port}"

    def _config(self) -> Path:
        lines = [
            f"listener {self.port} 127.0.0.1",
            # Started as root, Mosquitto would switch to user "mosquitto" and could
            # not write its log and store here; as another user this has no effect.
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            "allow_anonymous true",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "max_queued_messages 0",
            "max_inflight_messages 0",
            "set_tcp_nodelay true",
        ]
        if self.persistence:
            data = self.workdir / "data"
            data.mkdir(exist_ok=True)
            lines += [
                "persistence true",
                f"persistence_location {data}/",
                "autosave_interval 1",
            ]
        else:
            lines.append("persistence false")
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.ca}",
                f"certfile {self.tls.cert}",
                f"keyfile {self.tls.key}",
                f"require_certificate {str(self.tls.require_certificate).lower()}",
            ]
        path = self.workdir / "mosquitto.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the broker and wait until it accepts TCP connections."""
        assert self.proc is None, "already running"
        config = self._config()
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited ({self.proc.returncode}): "
                    + self.log_path.read_text(errors="replace")[-2000:]
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on port {self.port}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        """Send ``sig`` to the broker's pid and wait for it to exit."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        """SIGKILL the broker (no chance to save its persistence file)."""
        self.stop(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: the TCP connections stay up but nothing is answered."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self, *, persistence: bool | None = None) -> None:
        """Start again on the same port (with or without the old persistence)."""
        if persistence is not None:
            self.persistence = persistence
        if not self.persistence:
            shutil.rmtree(self.workdir / "data", ignore_errors=True)
        self.start()


# --- a test PKI -----------------------------------------------------------------------


class TestPki:
    """A CA with server and client certificates for 127.0.0.1, written as PEM files.

    Also an expired server certificate, and a server certificate from another CA.
    """

    __test__ = False

    def __init__(self, directory: Path) -> None:
        from cryptography.hazmat.primitives.asymmetric import ec

        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = self._cert("IES test CA", ca_key, ca_key, None, now, ca=True)
        self.ca = self._write("ca.pem", ca_cert)
        self.server_cert, self.server_key = self._leaf(
            "server", ca_key, ca_cert, now, now + dt.timedelta(days=2), server=True
        )
        self.client_cert, self.client_key = self._leaf(
            "client", ca_key, ca_cert, now, now + dt.timedelta(days=2), server=False
        )
        self.expired_cert, self.expired_key = self._leaf(
            "expired",
            ca_key,
            ca_cert,
            now - dt.timedelta(days=10),
            now - dt.timedelta(days=1),
            server=True,
        )
        other_key = ec.generate_private_key(ec.SECP256R1())
        other_ca = self._cert("Other CA", other_key, other_key, None, now, ca=True)
        self.other_ca = self._write("other-ca.pem", other_ca)
        self.foreign_cert, self.foreign_key = self._leaf(
            "foreign", other_key, other_ca, now, now + dt.timedelta(days=2), server=True
        )

    def _cert(
        self, name, key, signer_key, issuer, start, *, ca, end=None, server=False
    ):  # type: ignore[no-untyped-def]
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer.subject if issuer is not None else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start - dt.timedelta(minutes=5))
            .not_valid_after(end or start + dt.timedelta(days=30))
            .add_extension(
                x509.BasicConstraints(ca=ca, path_length=None), critical=True
            )
        )
        if ca:
            builder = builder.add_extension(
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
        else:
            usage = (
                ExtendedKeyUsageOID.SERVER_AUTH
                if server
                else ExtendedKeyUsageOID.CLIENT_AUTH
            )
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([usage]), critical=False
            )
            if server:
                builder = builder.add_extension(
                    x509.SubjectAlternativeName(
                        [
                            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                            x509.DNSName("localhost"),
                        ]
                    ),
                    critical=False,
                )
        return builder.sign(signer_key, hashes.SHA256())

    def _leaf(self, name, ca_key, ca_cert, start, end, *, server):  # type: ignore[no-untyped-def]
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._cert(
            name, key, ca_key, ca_cert, start, ca=False, end=end, server=server
        )
        cert_path = self._write(f"{name}.pem", cert)
        key_path = self.directory / f"{name}.key"
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)
        return cert_path, key_path

    def _write(self, name, cert):  # type: ignore[no-untyped-def]
        from cryptography.hazmat.primitives import serialization

        path = self.directory / name
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path


# --- a host that does not answer ------------------------------------------------------


class BlackHole:
    """A loopback TCP port where an MQTT connect never completes, like a host that is
    unroutable (``silent=False``) or a server that accepts and never answers.

    Unroutable: a listening socket with a backlog of 0 whose queue is filled by our
    own connections, never accepted; the kernel then drops every further SYN, so a
    client's connect waits until its own timeout. Silent: the kernel completes the
    handshake into a roomy queue, and nobody ever reads or writes. :meth:`close`
    closes the sockets.
    """

    def __init__(self, *, silent: bool = False) -> None:
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64 if silent else 0)
        self.port: int = self._server.getsockname()[1]
        self._fillers: list[socket.socket] = []
        if silent:
            return
        for _ in range(8):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.settimeout(0.3)
            self._fillers.append(filler)
            try:
                filler.connect(("127.0.0.1", self.port))
            except TimeoutError:
                return  # the queue is full: SYNs go unanswered from now on
        raise RuntimeError("could not fill the listen queue of the black hole")

    def close(self) -> None:
        """Close the listening socket and the connections that fill it."""
        for filler in self._fillers:
            filler.close()
        self._server.close()


# --- the collector --------------------------------------------------------------------


class Collector:
    """The utility's subscriber: persistent session, one copy of every ``seq``.

    Runs paho-mqtt's network thread. Re-subscribes on every connect (a broker
    restarted without persistence forgot the session). With ``confirm=True`` it
    publishes ``{"upto": N}`` on the gateway's ack topic after every batch, N being
    the highest ``seq`` it holds with none missing below.
    """

    def __init__(
        self,
        port: int,
        *,
        gateway_id: str,
        prefix: str = "ies",
        client_id: str = "collector-1",
        confirm: bool = False,
    ) -> None:
        import paho.mqtt.client as mqtt

        self.topic = f"{prefix}/{gateway_id}/evidence"
        self.ack_topic = f"{prefix}/{gateway_id}/ack"
        self.status_topic = f"{prefix}/{gateway_id}/status"
        self.confirm = confirm
        self.entries: dict[int, bytes] = {}
        self.checkpoints: dict[int, str] = {}
        self.messages = 0
        self.duplicates = 0
        self.status: list[dict[str, object]] = []
        self.contiguous = -1
        self._lock = threading.Lock()
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(0.2, 1)
        self.port = port

    def start(self, timeout_s: float = 10.0) -> None:
        """Connect (retrying until the broker answers) and start the network thread."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._client.connect("127.0.0.1", self.port, keepalive=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self._client.loop_start()

    def stop(self) -> None:
        """Disconnect and stop the network thread."""
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason, props):  # type: ignore[no-untyped-def]
        client.subscribe([(self.topic, 1), (self.status_topic, 1)])

    def _on_message(self, client, userdata, message):  # type: ignore[no-untyped-def]
        if message.topic == self.status_topic:
            with self._lock:
                self.status.append(json.loads(message.payload))
            return
        data = json.loads(message.payload)
        with self._lock:
            self.messages += 1
            for entry in data["entries"]:
                seq = entry["seq"]
                line = json.dumps(
                    entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False
                ).encode()
                if seq in self.entries:
                    self.duplicates += 1
                    assert self.entries[seq] == line, f"seq {seq} differs on resend"
                self.entries[seq] = line
            for item in data["checkpoints"]:
                self.checkpoints[item["size"]] = item["note"]
            while self.contiguous + 1 in self.entries:
                self.contiguous += 1
            upto = self.contiguous
        if self.confirm:
            client.publish(self.ack_topic, json.dumps({"upto": upto}), qos=1)

    def missing(self, upto: int) -> list[int]:
        """``seq`` numbers from 0 to ``upto`` not received."""
        with self._lock:
            return [seq for seq in range(upto + 1) if seq not in self.entries]

    def wait_for(self, count: int, timeout_s: float) -> bool:
        """Wait until entries ``0..count-1`` are all here; say whether they are."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.contiguous >= count - 1:
                return True
            time.sleep(0.05)
        return self.contiguous >= count - 1

    def write_dir(self, directory: Path) -> int:
        """Write what was received as ``evidence.jsonl`` + ``checkpoints.jsonl``."""
        directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            count = self.contiguous + 1
            (directory / "evidence.jsonl").write_bytes(
                b"".join(self.entries[seq] + b"\n" for seq in range(count))
            )
            lines = [
                json.dumps(
                    {"note": note, "size": size}, sort_keys=True, separators=(",", ":")
                )
                for size, note in sorted(self.checkpoints.items())
            ]
        (directory / "checkpoints.jsonl").write_text("".join(x + "\n" for x in lines))
        return count
