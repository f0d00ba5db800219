"""IES over HTTPS: Beckn v2.0.0 envelopes carrying MeterData and the evidence itself.

Each batch of the log becomes one request, ``POST {url}/{action}`` (default action
``on_status``: the gateway, as the provider of meter data, pushes the state of the
data-sharing contract)::

    {"context": {"action": "on_status", "version": "2.0.0", "domain": ...,
                 "bppId": <subscriber_id or gateway id>, "bapId": <counterparty_id>,
                 "networkId": ..., "transactionId": <uuid of this run>,
                 "messageId": <uuid>, "timestamp": <RFC 3339>, "ttl": "PT30S"},
     "message": {"contract": {
         "commitments": [{"status": {"descriptor": {"code": "ACTIVE"}}, ...}],
         "performance": [{"id": "<gateway>:<first>-<last>",
                          "performanceAttributes": {
                              "@context": <MeterData v0.6 context>,
                              "@type": "MeterData",
                              "meterData": [<MeterData v0.6 profiles>],
                              "evidence": <the evidence batch, payload.py>}}]}}}

The MeterData profiles are built from the entries (``ies_agent.upstream.meterdata``);
the ``evidence`` part carries the entries (the log lines spliced in as JSON objects;
see ``ies_agent.upstream.payload``) with their checkpoints, so the receiver can verify
every value against the gateway's key.

Two modes (DESIGN section 6): ``adapter`` posts to an operator's Beckn adapter over
mutual TLS (client certificate), which signs for the network; ``direct`` signs every
request itself (``ies_agent.upstream.beckn``). An ``ACK`` (``{"status": "ACK"}`` or
v1's ``{"message": {"ack": {"status": "ACK"}}}``) advances the cursor; a ``NACK`` is
retried with back-off and its reason reported; 401/403 are credential problems, 5xx,
429 and timeouts link problems.

aiohttp is imported only when an IES upstream connects.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ies_agent.upstream.beckn import BecknSigner, load_signing_key
from ies_agent.upstream.delivery import Batch, Connector
from ies_agent.upstream.errors import (
    AuthError,
    LinkError,
    RejectedError,
    TlsError,
)
from ies_agent.upstream.meterdata import MeterDataBuilder, dumps
from ies_agent.upstream.payload import encode_batch
from ies_agent.upstream.settings import UpstreamConfig
from ies_agent.upstream.tlsconfig import (
    client_context,
    explain_tls_failure,
    plain_server_hint,
)

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger(__name__)

BECKN_VERSION = "2.0.0"
METERDATA_CONTEXT = (
    "https://india-energy-stack.github.io/ies-accelerator/schemas/MeterData/v0.6/"
    "context.jsonld"
)
PRIME_ENTRIES = 4096
"""Entries first read back before a batch that does not follow the last one, so the
MeterData builder knows the opening register values of its first rows."""
PRIME_MAX_ENTRIES = 65536
"""At most this many are read back (the window grows fourfold while a register's
chain starts inside the batch, i.e. its opening reading lies further back)."""


class IesHttpsTransport:
    """Opens HTTPS sessions to one IES endpoint for a :class:`Connector`."""

    kind = "ies-https"

    def __init__(self, config: UpstreamConfig, *, gateway_id: str) -> None:
        self.config = config
        self.gateway_id = gateway_id
        self.endpoint = config.url.rstrip("/")
        self.tls = self.endpoint.startswith("https://")
        parts = urlsplit(self.endpoint)
        self.target = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
        self.connector: Connector | None = None
        self.transaction_id = str(uuid.uuid4())
        self._signer: BecknSigner | None = None
        self._builders: dict[int, MeterDataBuilder] = {}

    def bind(self, connector: Connector) -> None:
        """Remember the connector (gateway id, origin, log history)."""
        self.connector = connector

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[IesHttpsSession]:
        """Prepare TLS, the signing key and an HTTP client session.

        Raises :class:`TlsError` / :class:`AuthError` for unusable certificate or
        key files. No request is made until the first batch.
        """
        import aiohttp

        config = self.config
        ssl_context: Any = None
        if self.tls:
            ssl_context = client_context(
                ca_file=config.tls_ca_file,
                cert_file=config.tls_cert_file,
                key_file=config.tls_key_file,
                upstream=config.name,
            )
        if config.mode == "direct" and self._signer is None:
            assert config.signing_key_file and config.subscriber_id and config.key_id
            self._signer = BecknSigner(
                config.subscriber_id,
                config.key_id,
                load_signing_key(config.signing_key_file),
            )
        timeout = aiohttp.ClientTimeout(total=config.timeout_s)
        connector = aiohttp.TCPConnector(ssl=ssl_context if ssl_context else False)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            yield IesHttpsSession(self, http)

    # --- building requests ------------------------------------------------------------

    def body(self, batch: Batch) -> bytes:
        """Return the Beckn request body for ``batch`` (MeterData + evidence)."""
        connector = self.connector
        assert connector is not None
        builder = self._builder_for(batch)
        self._builders[batch.last + 1] = builder
        for key in [k for k in self._builders if k < batch.first - PRIME_ENTRIES]:
            del self._builders[key]
        evidence = json.loads(
            encode_batch(
                gw=connector.gateway_id,
                origin=connector.origin,
                first=batch.first,
                lines=batch.lines,
                checkpoints=batch.checkpoints,
            )
        )
        now = datetime.now(UTC)
        context: dict[str, Any] = {
            "domain": self.config.domain,
            "action": self.config.action,
            "version": BECKN_VERSION,
            "bppId": self.config.subscriber_id or self.gateway_id,
            "transactionId": self.transaction_id,
            "messageId": str(uuid.uuid4()),
            "timestamp": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "ttl": "PT30S",
        }
        if self.config.counterparty_id:
            context["bapId"] = self.config.counterparty_id
        if self.config.network_id:
            context["networkId"] = self.config.network_id
        meter_refs = sorted(set(self.config.meter_refs.values())) or [self.gateway_id]
        contract = {
            "commitments": [
                {
                    "id": f"{self.gateway_id}:meter-data",
                    "status": {"descriptor": {"code": "ACTIVE"}},
                    "resources": [{"id": ref, "quantity": {}} for ref in meter_refs],
                    "offer": {
                        "id": f"{self.gateway_id}:offer",
                        "resourceIds": meter_refs,
                    },
                }
            ],
            "performance": [
                {
                    "id": f"{self.gateway_id}:{batch.first}-{batch.last}",
                    "performanceAttributes": {
                        "@context": METERDATA_CONTEXT,
                        "@type": "MeterData",
                        "meterData": builder.profiles(),
                        "evidence": evidence,
                    },
                }
            ],
        }
        envelope = {"context": context, "message": {"contract": contract}}
        return dumps(envelope).encode("utf-8")

    def headers(self, body: bytes) -> dict[str, str]:
        """Return the request headers, with the Beckn signature in direct mode."""
        headers = {"Content-Type": "application/json"}
        if self._signer is not None:
            created = int(time.time())
            headers["Authorization"] = self._signer.authorization(
                body, created=created, expires=created + self.config.signature_ttl_s
            )
        return headers

    def _builder_for(self, batch: Batch) -> MeterDataBuilder:
        """A builder fed with ``batch``, holding the rows and snapshots it completes.

        After the previous batch it continues that batch's builder. Otherwise (the
        first batch of a run, a resend) it starts from the ``boot`` settings in force
        at ``batch.first`` and primes itself from the entries just before it,
        reading further back while a register's chain would start inside the batch
        with its opening reading out of reach.
        """
        import copy

        entries = [json.loads(line) for line in batch.lines]
        known = self._builders.get(batch.first)
        if known is not None:
            builder = copy.deepcopy(known)
            builder.forget_output()
            builder.feed(entries)
            return builder
        assert self.connector is not None
        settings: dict[str, Any] = {}
        boot = self.connector.last_event(batch.first, "boot") if batch.first else None
        if boot is not None:
            if isinstance(boot.get("interval_s"), int) and boot["interval_s"] > 0:
                settings["interval_s"] = boot["interval_s"]
            if isinstance(boot.get("tz"), str):
                settings["tz"] = boot["tz"]
        window = PRIME_ENTRIES
        while True:
            builder = MeterDataBuilder(
                gateway_id=self.gateway_id,
                meter_refs=self.config.meter_refs,
                **settings,
            )
            history = self.connector.history(batch.first, window) if batch.first else []
            builder.feed(json.loads(line) for line in history)
            primed = set(builder.chains_started)
            builder.forget_output()
            builder.feed(entries)
            whole = len(history) >= batch.first  # the history reaches seq 0
            if whole or builder.chains_started <= primed or window >= PRIME_MAX_ENTRIES:
                return builder
            window *= 4


class IesHttpsSession:
    """Posts one request per batch; one at a time (``window = 1``)."""

    window = 1

    def __init__(
        self, transport: IesHttpsTransport, http: aiohttp.ClientSession
    ) -> None:
        self.transport = transport
        self.http = http
        self.lost = asyncio.Event()
        self.lost_reason = ""

    async def send(self, batch: Batch) -> None:
        """POST ``batch``; return on ACK.

        Raises :class:`RejectedError` (NACK, 4xx), :class:`AuthError` (401, 403),
        :class:`TlsError` (certificate problems) or :class:`LinkError` (5xx, 429,
        timeouts, connection failures).
        """
        import aiohttp

        transport = self.transport
        body = transport.body(batch)
        url = f"{transport.endpoint}/{transport.config.action}"
        shown = f"{transport.target}/{transport.config.action}"
        what = f"entries {batch.first}..{batch.last} to {shown}"
        try:
            async with self.http.post(
                url, data=body, headers=transport.headers(body)
            ) as response:
                status = response.status
                text = await response.text()
        except aiohttp.ClientConnectorCertificateError as exc:
            raise TlsError(
                f"TLS to {transport.target} failed: the server's certificate is "
                f"not trusted ({exc.certificate_error}); the agent never sends "
                "without TLS"
            ) from None
        except aiohttp.ClientSSLError as exc:
            hint = plain_server_hint(str(exc), "HTTP") or explain_tls_failure(str(exc))
            raise TlsError(
                f"TLS to {transport.target} failed: {hint} ({exc}); the agent "
                "never sends without TLS"
            ) from None
        except TimeoutError:
            raise LinkError(
                f"no answer within {transport.config.timeout_s:g} s for {what}"
            ) from None
        except aiohttp.ClientConnectorError as exc:
            # A reset during the TLS handshake: most likely a plain HTTP port.
            plain = plain_server_hint(str(exc), "HTTP") if transport.tls else None
            if plain is not None:
                raise TlsError(
                    f"TLS to {transport.target} failed: {plain} ({exc}); the agent "
                    "never sends without TLS"
                ) from None
            raise LinkError(f"cannot post {what}: {exc}") from None
        except aiohttp.ClientError as exc:
            raise LinkError(f"cannot post {what}: {exc}") from None
        verdict, reason = _ack_status(text)
        if status in (401, 403):
            raise AuthError(
                f"{shown} answered {status} for {what}: {reason or text[:200]}"
            )
        if status == 429 or status >= 500:
            raise LinkError(
                f"{shown} answered {status} for {what}: {reason or text[:200]}"
            )
        if verdict == "ACK" and 200 <= status < 300:
            return
        raise RejectedError(
            f"{shown} answered {status} {verdict or 'without ACK'} for {what}"
            + (f": {reason}" if reason else ""),
            reason=reason or f"HTTP {status}",
        )


def _ack_status(text: str) -> tuple[str, str]:
    """Return (``ACK``/``NACK``/"", reason) from a Beckn response body."""
    try:
        data = json.loads(text)
    except ValueError:
        return "", ""
    if not isinstance(data, dict):
        return "", ""
    status = data.get("status")
    if status is None:
        message = data.get("message")
        ack = message.get("ack") if isinstance(message, dict) else None
        status = ack.get("status") if isinstance(ack, dict) else None
    error = data.get("error")
    reason = ""
    if isinstance(error, dict):
        parts = [str(error.get(k)) for k in ("errorCode", "code") if error.get(k)]
        parts += [
            str(error.get(k)) for k in ("errorMessage", "message") if error.get(k)
        ]
        reason = ": ".join(parts)
    return (status if status in ("ACK", "NACK") else ""), reason
