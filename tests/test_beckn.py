"""Beckn request signatures: the BECKN-006 worked example byte for byte, then the
checks a receiver makes (time window, skew, digest, key, header form).

Pure functions over bytes; the clock is passed in. The worked example is
``tests/data/ies/beckn-006-signature-vector.json`` (source in its README).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from conftest import DATA
from ies_agent.upstream.beckn import (
    BecknSigner,
    body_digest,
    load_signing_key,
    parse_authorization,
    signing_string,
    verify_authorization,
)
from ies_agent.upstream.errors import AuthError, SignatureError

VECTOR = json.loads((DATA / "ies" / "beckn-006-signature-vector.json").read_text())
BODY = VECTOR["body"].encode()
SUBSCRIBER, KEY_ID, _ = VECTOR["key_id"].split("|")


def vector_key() -> Ed25519PrivateKey:
    raw = base64.b64decode(VECTOR["signing_private_key_nacl64"])
    return Ed25519PrivateKey.from_private_bytes(raw[:32])


def lookup(subscriber: str, key_id: str) -> Ed25519PublicKey | None:
    if (subscriber, key_id) != (SUBSCRIBER, KEY_ID):
        return None
    raw = base64.b64decode(VECTOR["signing_public_key"])
    return Ed25519PublicKey.from_public_bytes(raw)


def vector_header() -> str:
    signer = BecknSigner(SUBSCRIBER, KEY_ID, vector_key())
    return signer.authorization(
        BODY, created=VECTOR["created"], expires=VECTOR["expires"]
    )


def test_worked_example_digest_and_signature_byte_for_byte() -> None:
    assert body_digest(BODY) == VECTOR["expected_digest"]
    header = vector_header()
    params = parse_authorization(header)
    assert base64.b64encode(params.signature).decode() == VECTOR["expected_signature"]
    assert params.key_id == VECTOR["key_id"]
    assert signing_string(
        VECTOR["created"], VECTOR["expires"], VECTOR["expected_digest"]
    ) == (
        b"(created): 1641287875\n(expires): 1641291475\ndigest: "
        + VECTOR["expected_digest"].encode()
    )


def test_worked_example_verifies_inside_its_window() -> None:
    params = verify_authorization(
        vector_header(), BODY, lookup, now=VECTOR["created"] + 60
    )
    assert params.subscriber_id == SUBSCRIBER


def test_header_as_another_implementation_writes_it_verifies() -> None:
    # Unquoted numbers and spaces after commas are accepted.
    header = (
        f'Signature keyId="{VECTOR["key_id"]}", algorithm="ed25519", '
        f"created={VECTOR['created']}, expires={VECTOR['expires']}, "
        f'headers="(created) (expires) digest", '
        f'signature="{VECTOR["expected_signature"]}"'
    )
    verify_authorization(header, BODY, lookup, now=VECTOR["created"])


@pytest.mark.parametrize(
    ("now_offset", "message"),
    [
        (-31, "in the future"),
        (3600 + 31, "expired"),
    ],
)
def test_time_window_and_skew_are_enforced(now_offset: int, message: str) -> None:
    now = VECTOR["created"] + now_offset
    with pytest.raises(SignatureError, match=message):
        verify_authorization(vector_header(), BODY, lookup, now=now, max_skew_s=30)
    # Within the skew it passes.
    verify_authorization(
        vector_header(),
        BODY,
        lookup,
        now=now - (1 if now_offset > 0 else -1) * 2,
        max_skew_s=33,
    )


def test_altered_body_unknown_key_and_bad_headers_fail() -> None:
    now = VECTOR["created"] + 1
    with pytest.raises(SignatureError, match="does not verify"):
        verify_authorization(vector_header(), BODY + b" ", lookup, now=now)
    other = BecknSigner("someone.else", KEY_ID, vector_key()).authorization(
        BODY, created=VECTOR["created"], expires=VECTOR["expires"]
    )
    with pytest.raises(SignatureError, match="no key registered"):
        verify_authorization(other, BODY, lookup, now=now)
    bad = [
        ("Bearer abc", "Signature"),
        (
            vector_header().replace(
                'headers="(created) (expires) digest"', 'headers="digest"'
            ),
            "headers",
        ),
        (
            vector_header().replace('algorithm="ed25519"', 'algorithm="rsa"'),
            "algorithm",
        ),
        (
            vector_header().replace(f'keyId="{VECTOR["key_id"]}"', 'keyId="x|y"'),
            "keyId",
        ),
        ('Signature keyId="a|b|ed25519"', "lacks"),
        (vector_header().replace('created="1641287875"', 'created="soon"'), "Unix"),
    ]
    for header, message in bad:
        with pytest.raises(SignatureError, match=message):
            verify_authorization(header, BODY, lookup, now=now)
    swapped = vector_header().replace(
        f'created="{VECTOR["created"]}",expires="{VECTOR["expires"]}"',
        f'created="{VECTOR["expires"]}",expires="{VECTOR["created"]}"',
    )
    with pytest.raises(SignatureError, match="not after created"):
        verify_authorization(swapped, BODY, lookup, now=now)


def test_signing_keys_load_from_pem_seed_or_nacl(tmp_path: Path) -> None:
    key = vector_key()
    nacl = tmp_path / "nacl.key"
    nacl.write_text(VECTOR["signing_private_key_nacl64"] + "\n")
    seed = tmp_path / "seed.key"
    seed.write_bytes(base64.b64encode(key.private_bytes_raw()))
    pem = tmp_path / "key.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    for path in (nacl, seed, pem):
        loaded = load_signing_key(path)
        assert loaded.private_bytes_raw() == key.private_bytes_raw()
    broken = tmp_path / "broken.key"
    broken.write_text("not a key")
    with pytest.raises(AuthError, match="neither PEM nor base64"):
        load_signing_key(broken)
    with pytest.raises(AuthError, match="cannot read"):
        load_signing_key(tmp_path / "absent.key")
    mismatched = tmp_path / "mismatch.key"
    raw = base64.b64decode(VECTOR["signing_private_key_nacl64"])
    mismatched.write_bytes(base64.b64encode(raw[:32] + bytes(32)))
    with pytest.raises(AuthError, match="does not match"):
        load_signing_key(mismatched)
