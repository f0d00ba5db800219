"""Typed errors of upstream delivery: who broke what, and whether a retry can help.

Each transport (MQTT, IES over HTTPS, a directory) maps the errors of the library below
it (aiomqtt, aiohttp, ``OSError``) to these classes at its boundary, so the delivery
loop decides on retries without knowing any library. Messages name the upstream, the
address and what the operator can do.

Error tree::

    UpstreamError                 base of everything below
    ├── LinkError                 transient: connection refused or lost, timeout, 5xx;
    │                             retried with back-off, the cursor stays where it was
    ├── RejectedError             the peer answered and refused (NACK, 4xx other than
    │                             401/403); retried with back-off, reason reported
    ├── AuthError                 credentials refused (CONNACK not authorised, 401, 403)
    ├── TlsError                  certificate wrong, expired or untrusted, or a key
    │                             that does not load; never falls back to plaintext
    ├── SignatureError            a Beckn ``Authorization`` header that is malformed,
    │                             expired, outside the allowed clock skew, or does not
    │                             verify against the body
    └── MeterDataError            evidence that cannot be expressed as IES MeterData
"""

from __future__ import annotations


class UpstreamError(Exception):
    """Base of every error raised by ``ies_agent.upstream``."""


class LinkError(UpstreamError):
    """The link to the upstream failed in a way a later retry may fix."""


class RejectedError(UpstreamError):
    """The upstream answered and refused the message; ``reason`` says why."""

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class AuthError(UpstreamError):
    """The upstream refused our credentials (user name, password, client identity)."""


class TlsError(UpstreamError):
    """TLS could not be set up or the peer's certificate is not trusted.

    Raised for a missing or unreadable CA, client certificate or key file, an expired
    or wrong server certificate, or a host name mismatch. The connection is never
    retried without TLS.
    """


class SignatureError(UpstreamError):
    """A Beckn request signature is malformed, stale, or does not verify."""


class MeterDataError(UpstreamError):
    """Evidence entries cannot be turned into IES MeterData profiles."""
