"""Signed documents: dispatch messages and policy packs, checked against pinned keys.

Both are UTF-8 JSON of the same shape::

    {"<kind>": {...the body...},
     "signatures": [{"key_id": "<SHA-256 hex of SPKI DER>", "alg": "ed25519",
                     "sig": "<base64>"}]}

``kind`` is ``event`` for a dispatch message and ``pack`` for a policy pack. The
signed bytes are the domain line (``ies-dispatch/1`` or ``ies-policy-pack/1``), a
newline and the body as canonical JSON (sorted keys, no whitespace, no floats), so a
signature over an event can never pass as one over a pack. Keys are Ed25519 or ECDSA
P-256 (SHA-256, DER), pinned as PEM files in the trust directory (``configs/trust/``
by default) and loaded with :class:`ies_agent.signing.manifest.TrustStore`. A document
is authentic when at least one signature is by a pinned key and every signature by a
pinned key verifies; signatures by unknown keys are ignored (key roll-over).

Errors: :class:`~ies_agent.dispatch.errors.EventFormatError` (not a signed document)
and :class:`~ies_agent.dispatch.errors.AuthenticationError` (not authentic).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from ies_agent.dispatch.errors import AuthenticationError, EventFormatError
from ies_agent.signing.manifest import (
    ManifestError,
    PrivateKey,
    TrustStore,
    TrustStoreError,
    canonical_json,
    key_alg,
    key_id,
)

DOMAIN_EVENT = "ies-dispatch/1"
DOMAIN_PACK = "ies-policy-pack/1"
MAX_DOCUMENT_BYTES = 64 * 1024
DEFAULT_TRUST_DIR = Path("configs/trust")
"""The site's trusted dispatch issuers and policy signers, relative to the site."""


def signed_bytes(domain: str, body: Mapping[str, Any]) -> bytes:
    """The bytes a signer signs for ``body`` in ``domain``.

    Raises :class:`EventFormatError` for bodies canonical JSON cannot hold (floats).
    """
    try:
        return domain.encode("ascii") + b"\n" + canonical_json(body)
    except ManifestError as exc:
        raise EventFormatError(str(exc).replace("manifest", "document")) from None


def sign_document(
    kind: str, domain: str, body: Mapping[str, Any], keys: Iterable[PrivateKey]
) -> bytes:
    """Return the signed document (JSON bytes) of ``body`` under ``kind``.

    Used by issuers, the demo and tests. Raises :class:`EventFormatError` for a body
    with floats and ``TrustStoreError`` for a key that is not Ed25519 or P-256.
    """
    message = signed_bytes(domain, body)
    signatures = []
    for key in keys:
        if isinstance(key, ed25519.Ed25519PrivateKey):
            raw = key.sign(message)
        else:
            raw = key.sign(message, ec.ECDSA(hashes.SHA256()))
        signatures.append(
            {
                "key_id": key_id(key.public_key()),
                "alg": key_alg(key),
                "sig": base64.b64encode(raw).decode("ascii"),
            }
        )
    document = {kind: dict(body), "signatures": signatures}
    return json.dumps(document, sort_keys=True, indent=1).encode("utf-8") + b"\n"


def verify_document(
    data: bytes, kind: str, domain: str, trust: TrustStore, *, source: str
) -> tuple[dict[str, Any], str]:
    """Check a signed document; return its body and the pinned key id that signed it.

    ``source`` names where the bytes came from, for messages. Raises
    :class:`EventFormatError` when ``data`` is not a signed document of ``kind`` and
    :class:`AuthenticationError` when no pinned key signed it or a pinned key's
    signature does not verify.
    """
    body, signatures = _parse(data, kind, source)
    message = signed_bytes(domain, body)
    trusted = [s for s in signatures if s[0] in trust.keys]
    if not trusted:
        ids = ", ".join(s[0][:16] for s in signatures)
        raise AuthenticationError(
            f"{source}: signed by {ids}, none of them pinned in the trust store; pin "
            "the issuer's public key (PEM) in the trust directory to accept it"
        )
    for kid, sig in trusted:
        public = trust.keys[kid].public_key
        try:
            if isinstance(public, ed25519.Ed25519PublicKey):
                public.verify(sig, message)
            else:
                public.verify(sig, message, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise AuthenticationError(
                f"{source}: the signature of pinned key {kid[:16]} does not verify "
                "(the document was altered, or signed by another key)"
            ) from None
    return body, trusted[0][0]


def load_trust(directories: Iterable[Path]) -> TrustStore:
    """Load the pinned keys; raise :class:`AuthenticationError` when none are usable."""
    try:
        return TrustStore.load(directories)
    except TrustStoreError as exc:
        text = str(exc).replace("publisher", "issuer")
        raise AuthenticationError(
            text.replace("before applying signed manifests", "to accept their events")
        ) from None


def _parse(
    data: bytes, kind: str, source: str
) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    if len(data) > MAX_DOCUMENT_BYTES:
        raise EventFormatError(
            f"{source}: {len(data)} bytes, more than {MAX_DOCUMENT_BYTES} allowed"
        )
    try:
        document = json.loads(data.decode("utf-8"), parse_float=_no_float)
    except UnicodeDecodeError:
        raise EventFormatError(f"{source}: not UTF-8 text") from None
    except ValueError as exc:
        raise EventFormatError(f"{source}: not JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get(kind), dict):
        raise EventFormatError(f"{source}: expected an object with '{kind}' inside")
    raw = document.get("signatures")
    if not isinstance(raw, list) or not raw:
        raise EventFormatError(
            f"{source}: unsigned ('signatures' missing or empty): sign it first"
        )
    signatures = []
    for index, item in enumerate(raw):
        where = f"{source}: signatures[{index}]"
        if not isinstance(item, dict):
            raise EventFormatError(f"{where}: expected an object")
        kid, sig = item.get("key_id"), item.get("sig")
        if not isinstance(kid, str) or len(kid) != 64:
            raise EventFormatError(f"{where}.key_id: expected 64 hex digits")
        if not isinstance(sig, str):
            raise EventFormatError(f"{where}.sig: expected base64 text")
        try:
            signatures.append((kid, base64.b64decode(sig, validate=True)))
        except binascii.Error:
            raise EventFormatError(f"{where}.sig: not valid base64") from None
    return document[kind], signatures


def _no_float(text: str) -> Any:
    raise ValueError(f"floats are not allowed, write decimals as strings ({text})")
