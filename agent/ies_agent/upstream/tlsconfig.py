"""TLS client contexts for upstreams: verify the server always, present a client cert.

Both MQTT (``mqtts://``) and IES over HTTPS use :func:`client_context`. The server's
certificate is always verified (chain and host name) against ``tls_ca_file`` or the
system's CAs; there is no switch to turn that off and no fallback to plaintext. A CA,
certificate or key file that cannot be loaded is a :class:`~.errors.TlsError` naming
the file, raised before any connection is tried.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from ies_agent.upstream.errors import TlsError

_TLS_MARKERS = ("ssl", "certificate", "tls", "handshake", "wrong version number")


def client_context(
    *,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
    upstream: str,
) -> ssl.SSLContext:
    """Return a verifying TLS 1.2+ client context, with a client certificate if given.

    Raises :class:`TlsError` when a file is missing, unreadable or not PEM of the
    right kind, or the key does not match the certificate.
    """
    try:
        context = ssl.create_default_context(
            cafile=str(ca_file) if ca_file is not None else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(
            f"upstream {upstream}: cannot load the CA file {ca_file}: {_reason(exc)}"
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    if cert_file is not None:
        try:
            context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise TlsError(
                f"upstream {upstream}: cannot load the client certificate "
                f"{cert_file} with key {key_file}: {_reason(exc)}"
            ) from None
    return context


def looks_like_tls_failure(text: str) -> bool:
    """Tell whether a connection error message is about TLS (certificate, handshake).

    Libraries below us (paho via aiomqtt) turn ``ssl.SSLError`` into plain text, so
    the message is all there is to sort a TLS failure from a refused connection.
    """
    lowered = text.lower()
    return any(marker in lowered for marker in _TLS_MARKERS)


_PLAIN_SERVER_MARKERS = (
    "wrong version number",
    "connection reset",
    "eof occurred in violation",
    "unexpected eof",
    "packet length too long",
)


def plain_server_hint(text: str, protocol: str) -> str | None:
    """Return a hint when a TLS connect failed as if the server spoke no TLS.

    A plain server answers a TLS ClientHello with its own protocol (a TLS library
    reads that as a "wrong version number") or by closing the connection (a reset
    or an EOF during the handshake). ``text`` is the connect error, ``protocol``
    the plain protocol expected on such a port ("MQTT", "HTTP"). Only meaningful
    for errors while connecting.
    """
    lowered = text.lower()
    if any(marker in lowered for marker in _PLAIN_SERVER_MARKERS):
        return f"the server did not speak TLS: is this a plain {protocol} port?"
    return None


def explain_tls_failure(text: str) -> str:
    """Return an operator's reading of a TLS failure message."""
    lowered = text.lower()
    if "expired" in lowered:
        return "the server's certificate has expired"
    if "not yet valid" in lowered:
        return "the server's certificate is not valid yet (check the gateway clock)"
    if "hostname" in lowered or "ip address mismatch" in lowered:
        return "the server's certificate is for another host name"
    if "unknown ca" in lowered or "unable to get local issuer" in lowered:
        return "the server's certificate is not signed by the configured CA"
    if "self-signed" in lowered or "self signed" in lowered:
        return "the server's certificate is self-signed and not trusted"
    if "certificate required" in lowered or "alert bad certificate" in lowered:
        return "the server refused the gateway's client certificate (or wants one)"
    if "wrong version number" in lowered:
        return "the server does not speak TLS on this port"
    return "the TLS handshake failed"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or exc.__class__.__name__
