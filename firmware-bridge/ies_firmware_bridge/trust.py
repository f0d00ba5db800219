"""Whom the bridge trusts, and the checks a file must pass before a charger gets it.

Two ways a firmware file earns trust, one per kind of OCPP request:

- **OCPP 1.6 ``UpdateFirmware``** carries only a URL. The file is trusted when a
  signed manifest beside it (the same URL with ``.manifest.json`` added to the path,
  query kept) is signed by a trusted publisher key and names the file's size and
  SHA-256 — checked by :mod:`ies_agent.signing.manifest`, the one verifier the
  gateway's own updates use too — or when the bridge's config pins the SHA-256 of that
  URL or file name.
- **OCPP 2.0.1 ``UpdateFirmware`` and 1.6 ``SignedUpdateFirmware``** carry a
  ``signingCertificate`` (PEM) and a ``signature`` (base64) over the file. The
  certificate must be issued directly by a trusted publisher CA (or be itself a
  trusted certificate) and be valid now; the signature must verify over the whole
  file with its key: ECDSA with SHA-256 (DER), RSA PKCS#1 v1.5 with SHA-256, or
  Ed25519.

Trust directories hold publisher public keys and CA certificates as PEM files.

Errors::

    TrustError                 base; ``status`` is the OCPP status word to report
    ├── UntrustedCertificate   the signing certificate is unreadable, expired or not
    │                          issued by a trusted publisher CA (``InvalidCertificate``)
    └── BadSignature           the signature over the file does not verify, or
                               the file is not what a manifest or pin says
                               (``InvalidSignature``)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from ies_agent.signing.manifest import (
    ManifestError,
    TrustStore,
    TrustStoreError,
    load_trusted_key,
)

_CHUNK = 1 << 20
MANIFEST_SUFFIX = ".manifest.json"


class TrustError(Exception):
    """Base of the trust errors; ``status`` is what the charger's CSMS is told."""

    status = "InvalidSignature"


class UntrustedCertificate(TrustError):
    """Raised when a signing certificate is not one a trusted publisher issued."""

    status = "InvalidCertificate"


class BadSignature(TrustError):
    """Raised when a file does not match its signature, manifest or pin."""

    status = "InvalidSignature"


@dataclass(frozen=True)
class PublisherTrust:
    """Trusted publisher keys (for manifests) and CA certificates (for 2.0.1)."""

    keys: TrustStore | None
    cas: tuple[x509.Certificate, ...]
    problems: tuple[str, ...] = ()

    @classmethod
    def load(cls, directories: Iterable[Path]) -> PublisherTrust:
        """Read every ``*.pem`` / ``*.crt`` in ``directories`` (missing ones skipped).

        A file that is neither a public key nor a certificate is left out and named in
        :attr:`problems` (the bridge logs them; one bad file must not stop every
        update). Never raises for content; an empty trust refuses every file.
        """
        keys = []
        cas: list[x509.Certificate] = []
        problems: list[str] = []
        for directory in directories:
            if not Path(directory).is_dir():
                continue
            for path in sorted(Path(directory).iterdir()):
                if path.suffix not in (".pem", ".crt"):
                    continue
                try:
                    data = path.read_bytes()
                except OSError as exc:
                    problems.append(f"{path}: {exc.strerror}")
                    continue
                if b"BEGIN CERTIFICATE" in data:
                    try:
                        cas.extend(x509.load_pem_x509_certificates(data))
                    except ValueError:
                        problems.append(f"{path}: not a PEM certificate")
                    continue
                try:
                    keys.append(load_trusted_key(path))
                except TrustStoreError as exc:
                    problems.append(str(exc))
        store = TrustStore(keys) if keys else None
        return cls(store, tuple(cas), tuple(problems))

    def describe(self) -> str:
        """One line for the log: how many keys and CAs are trusted."""
        count = len(self.keys.keys) if self.keys is not None else 0
        return f"{count} publisher key(s), {len(self.cas)} publisher CA(s)"


def manifest_url(location: str) -> str:
    """Return where the manifest of the file at ``location`` is (path + suffix)."""
    head, sep, query = location.partition("?")
    return head + MANIFEST_SUFFIX + (sep + query if sep else "")


def check_certificate(pem: str, trust: PublisherTrust) -> x509.Certificate:
    """Parse the signing certificate ``pem`` and check it against trusted CAs.

    Returns the certificate. Raises :class:`UntrustedCertificate` when it cannot be
    read, is outside its validity period, or neither is a trusted certificate nor was
    issued (and signed) by one.
    """
    try:
        cert = x509.load_pem_x509_certificate(pem.encode("ascii", "replace"))
    except ValueError:
        raise UntrustedCertificate(
            "signingCertificate is not a PEM X.509 certificate"
        ) from None
    now = datetime.now(UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise UntrustedCertificate(
            f"signing certificate {_subject(cert)} is valid from "
            f"{cert.not_valid_before_utc:%Y-%m-%d} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d}, not now"
        )
    for ca in trust.cas:
        if ca == cert:
            return cert
        if ca.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return cert
    raise UntrustedCertificate(
        f"signing certificate {_subject(cert)} (issuer {cert.issuer.rfc4514_string()})"
        f" was not issued by a trusted publisher CA ({len(trust.cas)} trusted)"
    )


def check_file_signature(path: Path, cert: x509.Certificate, signature: str) -> str:
    """Check ``signature`` (base64) over the file at ``path`` with ``cert``'s key.

    Returns the file's SHA-256 hex. Raises :class:`BadSignature` when the signature
    is not base64, the key type is unsupported, or it does not verify.
    """
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise BadSignature("signature is not base64") from None
    digest, content = _digest(
        path, keep=isinstance(cert.public_key(), ed25519.Ed25519PublicKey)
    )
    key = cert.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(raw, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(
                raw, digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256())
            )
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(raw, content)
        else:
            raise BadSignature(
                f"{type(key).__name__} certificates cannot sign firmware here: use "
                "ECDSA, RSA or Ed25519"
            )
    except InvalidSignature:
        raise BadSignature(
            f"the signature does not verify with {_subject(cert)}: the file was "
            "altered, or signed with another key"
        ) from None
    return digest.hex()


def check_digest(path: Path, sha256: str, size: int | None) -> None:
    """Check the file at ``path`` against a pinned SHA-256 (and size when known).

    Raises :class:`BadSignature` on a mismatch.
    """
    digest, _ = _digest(path, keep=False)
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise BadSignature(f"file is {actual_size} bytes, {size} were signed")
    if digest.hex() != sha256:
        raise BadSignature(
            f"file has SHA-256 {digest.hex()[:16]}…, {sha256[:16]}… was "
            "signed or pinned: the file was altered or replaced"
        )


def manifest_problem(exc: ManifestError) -> BadSignature:
    """Map a manifest error to the bridge's trust error (the message kept)."""
    return BadSignature(str(exc))


def file_sha256(path: Path) -> str:
    """SHA-256 hex of the file at ``path`` (read in 1 MiB chunks)."""
    return _digest(path, keep=False)[0].hex()


def _digest(path: Path, *, keep: bool) -> tuple[bytes, bytes]:
    hasher = hashlib.sha256()
    kept = bytearray()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            hasher.update(chunk)
            if keep:
                kept += chunk
    return hasher.digest(), bytes(kept)


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(no subject)"
