"""Signed manifests: what a publisher says a file is, checked against trusted keys.

A manifest names one file (a Debian package of the agent, later a charger's firmware
image) by name, version, size and SHA-256, and carries the publisher's signatures over
those facts. The gateway's self-update (``ies_agent.selfupdate``) and the firmware
bridge (DESIGN.md section 8) both check files this way; this module needs only the
standard library and ``cryptography``, so the bridge can use it without the agent.

A manifest file is UTF-8 JSON (at most 64 KiB)::

    {
      "manifest": {
        "format": "ies-signed-manifest/1",
        "name": "ies-agent",
        "version": "0.2.0-1",
        "architecture": "arm64",
        "file": "ies-agent_0.2.0-1_arm64.deb",
        "size": 31457280,
        "sha256": "<64 lowercase hex digits>",
        "published": "2025-06-01T10:00:00Z"
      },
      "signatures": [
        {"key_id": "<SHA-256 hex of the key's SubjectPublicKeyInfo DER>",
         "alg": "ed25519", "sig": "<base64>"}
      ]
    }

``format``, ``name``, ``version``, ``file`` (a bare file name, no directories),
``size`` (bytes) and ``sha256`` are required; any other field is signed and kept in
:attr:`Manifest.extra`. The signed bytes are the line ``ies-signed-manifest/1`` and a
newline, followed by the ``manifest`` object as canonical JSON (keys sorted, no
insignificant whitespace, UTF-8, integers only: no floats). A signature is Ed25519, or
ECDSA P-256 with SHA-256 in DER form. The manifest is trusted when at least one
signature is by a trusted key and every signature by a trusted key verifies; signatures
by unknown keys are ignored, so a publisher can sign with an old and a new key while
gateways move over.

Trusted publisher keys are PEM SubjectPublicKeyInfo files (``*.pem``) in trust
directories, for the gateway ``/etc/ies-agent/trust/``. A key's id is the SHA-256 hex of
its DER SubjectPublicKeyInfo, the same fingerprint the gateway's key card uses.

Errors::

    ManifestError                base; the message says what to do
    ├── ManifestFormatError      not a manifest: bad JSON, a missing or mistyped field
    ├── TrustStoreError          a trusted key file is unreadable or not a usable key,
    │                            or there are no trusted keys at all
    ├── UntrustedManifestError   no trusted signature, or a trusted key's signature
    │                            does not verify (altered manifest, wrong key)
    └── PayloadMismatchError     the file's size or SHA-256 is not what was signed
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

FORMAT = "ies-signed-manifest/1"
"""Value of the ``format`` field, and the first line of the signed bytes."""
ALG_ED25519 = "ed25519"
ALG_ECDSA_P256 = "ecdsa-p256"
MAX_MANIFEST_BYTES = 64 * 1024
"""Largest manifest file accepted (a manifest is a few hundred bytes)."""

_REQUIRED = ("format", "name", "version", "file", "size", "sha256")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]{0,254}")
_MAX_SAFE_INTEGER = 2**53 - 1
_CHUNK = 1 << 20

PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey
PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey


class ManifestError(Exception):
    """Base of every error of this module."""


class ManifestFormatError(ManifestError):
    """Raised when a manifest is not valid JSON or lacks or mistypes a field."""


class TrustStoreError(ManifestError):
    """Raised when a trusted key file cannot be used, or no trusted key exists."""


class UntrustedManifestError(ManifestError):
    """Raised when no trusted key signed the manifest, or a trusted signature fails."""


class PayloadMismatchError(ManifestError):
    """Raised when a file's size or SHA-256 differs from what the manifest signed."""


@dataclass(frozen=True)
class TrustedKey:
    """A publisher's public key, its id (SHA-256 hex of SPKI DER) and its file."""

    key_id: str
    alg: str
    public_key: PublicKey
    path: Path


@dataclass(frozen=True)
class Manifest:
    """The signed facts about one file, after the signature was checked.

    ``size`` is in bytes; ``sha256`` is 64 lowercase hex digits; ``signed_by`` is the
    id of the trusted key whose signature verified (empty before verification).
    """

    name: str
    version: str
    file: str
    size: int
    sha256: str
    architecture: str | None = None
    published: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    signed_by: str = ""


# --- keys -----------------------------------------------------------------------------


def key_id(public_key: PublicKey) -> str:
    """Return the id of ``public_key``: SHA-256 hex of its SubjectPublicKeyInfo DER."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def key_alg(key: PublicKey | PrivateKey) -> str:
    """Return ``ed25519`` or ``ecdsa-p256`` for ``key``.

    Raises :class:`TrustStoreError` for any other kind of key.
    """
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return ALG_ED25519
    if isinstance(
        key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey
    ) and isinstance(key.curve, ec.SECP256R1):
        return ALG_ECDSA_P256
    raise TrustStoreError(
        f"a {type(key).__name__} cannot sign manifests: use Ed25519 or ECDSA P-256"
    )


class TrustStore:
    """The publisher keys a gateway trusts, by key id."""

    def __init__(self, keys: Iterable[TrustedKey]) -> None:
        self.keys: dict[str, TrustedKey] = {key.key_id: key for key in keys}

    @classmethod
    def load(cls, directories: Iterable[Path]) -> TrustStore:
        """Load every ``*.pem`` public key in ``directories`` (missing ones skipped).

        Raises :class:`TrustStoreError` naming the file when a key file cannot be read
        or holds something other than an Ed25519 or P-256 public key, and when no key
        was found at all (nothing could ever be verified).
        """
        searched = [Path(d) for d in directories]
        keys: list[TrustedKey] = []
        for directory in searched:
            if not directory.is_dir():
                continue
            for path in sorted(directory.glob("*.pem")):
                keys.append(load_trusted_key(path))
        if not keys:
            where = ", ".join(str(d) for d in searched) or "(no directory given)"
            raise TrustStoreError(
                f"no trusted publisher keys in {where}: copy the publisher's public "
                f"key (PEM) there before applying signed manifests"
            )
        return cls(keys)


def load_trusted_key(path: Path) -> TrustedKey:
    """Load one PEM SubjectPublicKeyInfo publisher key from ``path``.

    Raises :class:`TrustStoreError` when the file cannot be read or is not an Ed25519
    or ECDSA P-256 public key.
    """
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise TrustStoreError(
            f"cannot read trusted key {path}: {exc.strerror}"
        ) from None
    try:
        public_key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise TrustStoreError(
            f"{path} is not a PEM public key (expected '-----BEGIN PUBLIC KEY-----')"
        ) from None
    if not isinstance(public_key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
        raise TrustStoreError(
            f"{path} holds a {type(public_key).__name__}; trusted keys must be "
            f"Ed25519 or ECDSA P-256"
        )
    try:
        alg = key_alg(public_key)
    except TrustStoreError as exc:
        raise TrustStoreError(f"{path}: {exc}") from None
    return TrustedKey(key_id(public_key), alg, public_key, Path(path))


# --- the signed bytes -----------------------------------------------------------------


def canonical_json(value: Mapping[str, Any]) -> bytes:
    """Return ``value`` as canonical JSON: sorted keys, no whitespace, UTF-8.

    Raises :class:`ManifestFormatError` for floats, integers beyond 2**53 - 1 and
    anything else JSON cannot hold exactly.
    """
    _check_exact(value, "manifest")
    try:
        text = json.dumps(
            value,
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
        )
    except (TypeError, ValueError) as exc:
        raise ManifestFormatError(f"manifest cannot be encoded: {exc}") from None
    return text.encode("utf-8")


def signed_bytes(body: Mapping[str, Any]) -> bytes:
    """Return the bytes a publisher signs for manifest ``body``."""
    return FORMAT.encode("ascii") + b"\n" + canonical_json(body)


def _check_exact(value: object, where: str) -> None:
    """Refuse values canonical JSON cannot carry exactly (floats, huge integers)."""
    if isinstance(value, float):
        raise ManifestFormatError(f"{where}: floats are not allowed ({value!r})")
    if isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > _MAX_SAFE_INTEGER:
            raise ManifestFormatError(f"{where}: integer {value} is beyond 2**53 - 1")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ManifestFormatError(f"{where}: key {key!r} is not a string")
            _check_exact(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_exact(item, f"{where}[{index}]")


# --- signing (publishers, tests) ------------------------------------------------------


def sign_manifest(body: Mapping[str, Any], private_keys: Iterable[PrivateKey]) -> bytes:
    """Return a manifest file (JSON bytes) for ``body`` signed by ``private_keys``.

    ``body`` gets ``format`` filled in when absent and is checked as
    :func:`parse_manifest` checks it. Raises :class:`ManifestFormatError` for a body
    that is not a valid manifest, :class:`TrustStoreError` for an unusable key.
    """
    fields = {"format": FORMAT, **body}
    _read_body(fields, "manifest to sign")
    message = signed_bytes(fields)
    signatures = []
    for private_key in private_keys:
        alg = key_alg(private_key)
        if isinstance(private_key, ed25519.Ed25519PrivateKey):
            signature = private_key.sign(message)
        else:
            signature = private_key.sign(message, ec.ECDSA(hashes.SHA256()))
        signatures.append(
            {
                "key_id": key_id(private_key.public_key()),
                "alg": alg,
                "sig": base64.b64encode(signature).decode("ascii"),
            }
        )
    document = {"manifest": fields, "signatures": signatures}
    return (
        json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False).encode(
            "utf-8"
        )
        + b"\n"
    )


# --- reading and verifying ------------------------------------------------------------


@dataclass(frozen=True)
class _Signature:
    key_id: str
    alg: str
    sig: bytes


def verify_manifest(data: bytes, trust: TrustStore, *, source: str) -> Manifest:
    """Parse the manifest file ``data`` and check its signatures against ``trust``.

    ``source`` names where the bytes came from, for messages. Returns the manifest
    with :attr:`Manifest.signed_by` set. Raises :class:`ManifestFormatError` when
    ``data`` is not a manifest and :class:`UntrustedManifestError` when no trusted key
    signed it or a trusted key's signature does not verify.
    """
    body, signatures = _parse_document(data, source)
    manifest = _read_body(body, source)
    message = signed_bytes(body)
    verified_by = ""
    for signature in signatures:
        trusted = trust.keys.get(signature.key_id)
        if trusted is None:
            continue
        if signature.alg != trusted.alg:
            raise UntrustedManifestError(
                f"{source}: signature by key {signature.key_id[:16]} says "
                f"{signature.alg}, but that trusted key is {trusted.alg}"
            )
        if not _signature_valid(trusted.public_key, signature.sig, message):
            raise UntrustedManifestError(
                f"{source}: the signature by trusted key {signature.key_id[:16]} "
                f"({trusted.path.name}) does not verify: the manifest was altered "
                f"after signing, or signed with a different key"
            )
        verified_by = verified_by or trusted.key_id
    if not verified_by:
        named = ", ".join(s.key_id[:16] for s in signatures) or "none"
        raise UntrustedManifestError(
            f"{source}: not signed by a trusted publisher key (signed by: {named}; "
            f"trusted: {', '.join(k[:16] for k in trust.keys)})"
        )
    return Manifest(
        name=manifest.name,
        version=manifest.version,
        file=manifest.file,
        size=manifest.size,
        sha256=manifest.sha256,
        architecture=manifest.architecture,
        published=manifest.published,
        extra=manifest.extra,
        signed_by=verified_by,
    )


def parse_manifest(data: bytes, *, source: str) -> Manifest:
    """Parse the manifest file ``data`` WITHOUT checking signatures.

    For showing what a manifest claims; never install what only this returned.
    Raises :class:`ManifestFormatError`.
    """
    body, _ = _parse_document(data, source)
    return _read_body(body, source)


def verify_payload(manifest: Manifest, path: Path) -> None:
    """Check that the file at ``path`` has the size and SHA-256 ``manifest`` signed.

    Reads the file in 1 MiB chunks. Raises :class:`PayloadMismatchError` when the
    size or the hash differs, or the file cannot be read.
    """
    digest = hashlib.sha256()
    size = 0
    try:
        with Path(path).open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                size += len(chunk)
                if size > manifest.size:
                    break
                digest.update(chunk)
    except OSError as exc:
        raise PayloadMismatchError(f"cannot read {path}: {exc.strerror}") from None
    if size != manifest.size:
        raise PayloadMismatchError(
            f"{path} is {'larger than' if size > manifest.size else f'{size} bytes,'} "
            f"not the {manifest.size} bytes the manifest signed: incomplete or "
            f"replaced download"
        )
    actual = digest.hexdigest()
    if actual != manifest.sha256:
        raise PayloadMismatchError(
            f"{path} has SHA-256 {actual}, the manifest signed {manifest.sha256}: "
            f"the file was altered or is not the one the manifest names"
        )


def _parse_document(
    data: bytes, source: str
) -> tuple[dict[str, Any], list[_Signature]]:
    """Split a manifest file into its body and its signatures."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestFormatError(
            f"{source}: {len(data)} bytes is too large for a manifest "
            f"(at most {MAX_MANIFEST_BYTES})"
        )
    try:
        document = json.loads(data.decode("utf-8"), parse_float=_no_float)
    except UnicodeDecodeError:
        raise ManifestFormatError(f"{source}: not UTF-8 text") from None
    except ValueError as exc:
        raise ManifestFormatError(f"{source}: not a JSON manifest: {exc}") from None
    if not isinstance(document, dict):
        raise ManifestFormatError(f"{source}: expected a JSON object")
    body = document.get("manifest")
    if not isinstance(body, dict):
        raise ManifestFormatError(f"{source}: 'manifest' must be an object")
    raw_signatures = document.get("signatures")
    if not isinstance(raw_signatures, list) or not raw_signatures:
        raise ManifestFormatError(f"{source}: 'signatures' must be a non-empty list")
    signatures = [
        _read_signature(item, f"{source}: signatures[{index}]")
        for index, item in enumerate(raw_signatures)
    ]
    return body, signatures


def _no_float(text: str) -> Any:
    raise ValueError(f"floats are not allowed in a manifest ({text})")


def _read_signature(item: object, where: str) -> _Signature:
    if not isinstance(item, dict):
        raise ManifestFormatError(f"{where}: expected an object")
    kid, alg, sig = item.get("key_id"), item.get("alg"), item.get("sig")
    if not isinstance(kid, str) or not _SHA256_HEX.fullmatch(kid):
        raise ManifestFormatError(f"{where}.key_id: expected 64 lowercase hex digits")
    if alg not in (ALG_ED25519, ALG_ECDSA_P256):
        raise ManifestFormatError(
            f"{where}.alg: expected '{ALG_ED25519}' or '{ALG_ECDSA_P256}', got {alg!r}"
        )
    if not isinstance(sig, str):
        raise ManifestFormatError(f"{where}.sig: expected base64 text")
    try:
        raw = base64.b64decode(sig, validate=True)
    except binascii.Error:
        raise ManifestFormatError(f"{where}.sig: not valid base64") from None
    return _Signature(kid, str(alg), raw)


def _read_body(body: Mapping[str, Any], source: str) -> Manifest:
    """Check the fields of a manifest body; return them as a :class:`Manifest`."""
    missing = [name for name in _REQUIRED if name not in body]
    if missing:
        raise ManifestFormatError(
            f"{source}: manifest lacks {', '.join(repr(m) for m in missing)}"
        )
    if body["format"] != FORMAT:
        raise ManifestFormatError(
            f"{source}: format {body['format']!r} is not {FORMAT!r}: this gateway "
            f"cannot read that manifest"
        )
    for name in ("name", "version", "file"):
        if not isinstance(body[name], str) or not body[name].strip():
            raise ManifestFormatError(f"{source}: '{name}' must be non-empty text")
    if not _FILE_NAME.fullmatch(body["file"]):
        raise ManifestFormatError(
            f"{source}: 'file' must be a bare file name (letters, digits, '.', '_', "
            f"'+', '~', '-'), got {body['file']!r}"
        )
    size = body["size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ManifestFormatError(f"{source}: 'size' must be a whole number of bytes")
    if not isinstance(body["sha256"], str) or not _SHA256_HEX.fullmatch(body["sha256"]):
        raise ManifestFormatError(f"{source}: 'sha256' must be 64 lowercase hex digits")
    optional: dict[str, str | None] = {}
    for name in ("architecture", "published"):
        value = body.get(name)
        if value is not None and not isinstance(value, str):
            raise ManifestFormatError(f"{source}: '{name}' must be text")
        optional[name] = value
    _check_exact(dict(body), "manifest")
    extra = {
        k: v
        for k, v in body.items()
        if k not in _REQUIRED and k not in ("architecture", "published")
    }
    return Manifest(
        name=body["name"],
        version=body["version"],
        file=body["file"],
        size=size,
        sha256=body["sha256"],
        architecture=optional["architecture"],
        published=optional["published"],
        extra=extra,
    )


def _signature_valid(public_key: PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, message)
        else:
            public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True
