"""Beckn HTTP signatures: signing and verifying, in this one module.

A direct participant signs each request (BECKN-006)::

    Authorization: Signature keyId="{subscriber_id}|{unique_key_id}|ed25519",
        algorithm="ed25519",created="1641287875",expires="1641291475",
        headers="(created) (expires) digest",signature="<base64 Ed25519>"

over the signing string of three lines (no trailing newline)::

    (created): 1641287875
    (expires): 1641291475
    digest: BLAKE-512=<base64 BLAKE2b-512 of the exact body bytes>

Verification (for requests that come in) checks the header's form, that ``headers``
names exactly those three, that the time window holds — ``created`` not later than
now plus the allowed skew, ``expires`` not earlier than now minus it, ``expires`` after
``created`` — and the Ed25519 signature with the key the registry gives for
``subscriber_id`` and ``unique_key_id``. Every failure is a
:class:`~.errors.SignatureError` saying which check failed.

Pure functions of bytes and numbers (the clock is passed in), so the worked example in
``shared/ies-specs/beckn-006-signature-vector.json`` is a byte-for-byte test.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from ies_agent.upstream.errors import AuthError, SignatureError

ALGORITHM = "ed25519"
SIGNED_HEADERS = "(created) (expires) digest"
DIGEST_PREFIX = "BLAKE-512="
DEFAULT_SKEW_S = 30

_PARAM = re.compile(r'\s*([A-Za-z]+)\s*=\s*(?:"([^"]*)"|([^,\s"]*))\s*(?:,|$)')

KeyLookup = Callable[[str, str], Ed25519PublicKey | None]
"""``lookup(subscriber_id, unique_key_id)``: the registry's public key, or None."""


@dataclass(frozen=True)
class SignatureParams:
    """The parts of a Beckn ``Authorization: Signature ...`` header."""

    subscriber_id: str
    unique_key_id: str
    algorithm: str
    created: int
    expires: int
    headers: str
    signature: bytes

    @property
    def key_id(self) -> str:
        """``subscriber_id|unique_key_id|algorithm`` as sent."""
        return f"{self.subscriber_id}|{self.unique_key_id}|{self.algorithm}"


def body_digest(body: bytes) -> str:
    """Return ``BLAKE-512=<base64>`` of the BLAKE2b-512 hash of ``body``."""
    digest = hashlib.blake2b(body, digest_size=64).digest()
    return DIGEST_PREFIX + base64.b64encode(digest).decode("ascii")


def signing_string(created: int, expires: int, digest: str) -> bytes:
    """Return the three-line signing string for ``created``/``expires``/``digest``."""
    return f"(created): {created}\n(expires): {expires}\ndigest: {digest}".encode()


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load an Ed25519 signing key: PKCS#8 PEM, or base64 of a 32-byte seed or of a
    64-byte NaCl secret key (seed followed by the public key).

    Raises :class:`AuthError` naming the file when it cannot be read or used.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AuthError(
            f"cannot read Beckn signing key {path}: {exc.strerror}"
        ) from None
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise AuthError(f"Beckn signing key {path} does not load: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise AuthError(f"Beckn signing key {path} is not an Ed25519 key")
        return key
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except binascii.Error:
        raise AuthError(
            f"Beckn signing key {path} is neither PEM nor base64 of a 32/64-byte key"
        ) from None
    if len(raw) == 64:
        key = Ed25519PrivateKey.from_private_bytes(raw[:32])
        public = key.public_key().public_bytes_raw()
        if public != raw[32:]:
            raise AuthError(
                f"Beckn signing key {path}: the public half does not match the seed"
            )
        return key
    if len(raw) == 32:
        return Ed25519PrivateKey.from_private_bytes(raw)
    raise AuthError(
        f"Beckn signing key {path} holds {len(raw)} bytes; expected 32 or 64"
    )


class BecknSigner:
    """Signs request bodies as ``subscriber_id`` with key ``unique_key_id``."""

    def __init__(
        self, subscriber_id: str, unique_key_id: str, key: Ed25519PrivateKey
    ) -> None:
        self.subscriber_id = subscriber_id
        self.unique_key_id = unique_key_id
        self._key = key

    def authorization(self, body: bytes, *, created: int, expires: int) -> str:
        """Return the ``Authorization`` header value for ``body``.

        ``created`` and ``expires`` are Unix seconds (``expires > created``).
        """
        message = signing_string(created, expires, body_digest(body))
        signature = base64.b64encode(self._key.sign(message)).decode("ascii")
        key_id = f"{self.subscriber_id}|{self.unique_key_id}|{ALGORITHM}"
        return (
            f'Signature keyId="{key_id}",algorithm="{ALGORITHM}",'
            f'created="{created}",expires="{expires}",'
            f'headers="{SIGNED_HEADERS}",signature="{signature}"'
        )


def parse_authorization(header: str) -> SignatureParams:
    """Parse a ``Signature ...`` header value; raise :class:`SignatureError`."""
    text = header.strip()
    if not text.startswith("Signature "):
        raise SignatureError('Authorization is not a "Signature ..." header')
    params: dict[str, str] = {}
    rest = text[len("Signature ") :]
    pos = 0
    while pos < len(rest):
        match = _PARAM.match(rest, pos)
        if match is None or match.end() == pos:
            raise SignatureError(f"cannot parse Authorization near {rest[pos:][:30]!r}")
        name = match.group(1)
        if name in params:
            raise SignatureError(f"Authorization repeats {name}")
        params[name] = match.group(2) if match.group(2) is not None else match.group(3)
        pos = match.end()
    missing = [
        k
        for k in ("keyId", "algorithm", "created", "expires", "headers", "signature")
        if k not in params
    ]
    if missing:
        raise SignatureError(f"Authorization lacks {', '.join(missing)}")
    parts = params["keyId"].split("|")
    if len(parts) != 3 or not all(parts):
        raise SignatureError(
            'keyId must be "subscriber_id|unique_key_id|algorithm", got '
            f"{params['keyId']!r}"
        )
    try:
        created, expires = int(params["created"]), int(params["expires"])
    except ValueError:
        raise SignatureError("created and expires must be Unix seconds") from None
    try:
        signature = base64.b64decode(params["signature"], validate=True)
    except binascii.Error:
        raise SignatureError("signature is not base64") from None
    return SignatureParams(
        subscriber_id=parts[0],
        unique_key_id=parts[1],
        algorithm=params["algorithm"],
        created=created,
        expires=expires,
        headers=params["headers"],
        signature=signature,
    )


def verify_authorization(
    header: str,
    body: bytes,
    lookup: KeyLookup,
    *,
    now: float,
    max_skew_s: float = DEFAULT_SKEW_S,
) -> SignatureParams:
    """Check a request's ``Authorization`` against its exact ``body``; return it.

    ``now`` is Unix time (seconds); ``max_skew_s`` the clock difference tolerated
    either way. Raises :class:`SignatureError` naming the failed check.
    """
    params = parse_authorization(header)
    if params.algorithm != ALGORITHM or params.key_id.split("|")[2] != ALGORITHM:
        raise SignatureError(f"algorithm {params.algorithm!r} is not ed25519")
    if params.headers.split() != SIGNED_HEADERS.split():
        raise SignatureError(
            f'headers must be "{SIGNED_HEADERS}", got {params.headers!r}'
        )
    if params.expires <= params.created:
        raise SignatureError("expires is not after created")
    if params.created > now + max_skew_s:
        raise SignatureError(
            f"created is {params.created - now:.0f} s in the future "
            f"(more than the {max_skew_s:g} s clock skew allowed)"
        )
    if params.expires < now - max_skew_s:
        raise SignatureError(f"the signature expired {now - params.expires:.0f} s ago")
    key = lookup(params.subscriber_id, params.unique_key_id)
    if key is None:
        raise SignatureError(
            f"no key registered for {params.subscriber_id}|{params.unique_key_id}"
        )
    message = signing_string(params.created, params.expires, body_digest(body))
    try:
        key.verify(params.signature, message)
    except InvalidSignature:
        raise SignatureError(
            "the signature does not verify (body altered, or another key signed it)"
        ) from None
    return params
