"""DLMS security suite 0 (AES-GCM-128) and HLS authentication with GMAC (mechanism 5).

Suite 0 protects an APDU with AES-GCM-128 under the block cipher key; the
initialisation vector is the sender's 8-byte system title and its 4-byte invocation
counter; the additional authenticated data starts with the security control byte and
the authentication key. The security control byte says what is applied:

* ``0x10`` authentication only: the APDU travels in clear with a 12-byte GMAC tag;
* ``0x20`` encryption only: ciphertext, no tag;
* ``0x30`` both: ciphertext and a 12-byte tag.

HLS mechanism 5: after the AARE, each side proves it holds the keys by returning
``SC | IC | GMAC(SC | AK | challenge)`` over the challenge the other side sent,
computed with its own system title and invocation counter.

The Green Book's worked example (as reproduced in public DLMS test suites) is a test
vector in ``tests/data/dlms``. ``cryptography`` is imported on first use, so an agent
without ciphered meters does not pay for it. Errors: :class:`SecurityError` for a tag
that does not verify, keys of the wrong size or a missing system title.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from ies_drivers.dlms.errors import SecurityError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers import AEADEncryptionContext

AUTHENTICATED: Final = 0x10
ENCRYPTED: Final = 0x20
AUTHENTICATED_ENCRYPTED: Final = 0x30
TAG_SIZE: Final = 12
SUITE_0: Final = 0


@dataclass(frozen=True, slots=True)
class SecurityKeys:
    """The keys and system title one side uses: global unicast encryption key
    (block cipher key) and authentication key, 16 bytes each, and this side's
    8-byte system title."""

    block_cipher_key: bytes
    authentication_key: bytes
    system_title: bytes

    def __post_init__(self) -> None:
        for name, value, size in (
            ("block cipher key", self.block_cipher_key, 16),
            ("authentication key", self.authentication_key, 16),
            ("system title", self.system_title, 8),
        ):
            if len(value) != size:
                raise SecurityError(
                    f"the {name} has {len(value)} bytes; suite 0 needs {size}"
                )

    def __repr__(self) -> str:  # never print key material
        return f"SecurityKeys(system_title={self.system_title.hex()}, keys=<hidden>)"


def _iv(system_title: bytes, invocation_counter: int) -> bytes:
    if len(system_title) != 8:
        raise SecurityError(
            f"system title of {len(system_title)} bytes: suite 0 needs 8 "
            "(the meter sends it in the AARE)"
        )
    if not 0 <= invocation_counter <= 0xFFFFFFFF:
        raise SecurityError(f"invocation counter {invocation_counter} out of range")
    return system_title + invocation_counter.to_bytes(4, "big")


def _encryptor(key: bytes, iv: bytes) -> AEADEncryptionContext:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    try:
        return Cipher(algorithms.AES(key), modes.GCM(iv)).encryptor()
    except ValueError as exc:
        raise SecurityError(f"AES-GCM cannot use this key: {exc}") from None


def encrypt(
    security_control: int,
    system_title: bytes,
    invocation_counter: int,
    block_cipher_key: bytes,
    authentication_key: bytes,
    plaintext: bytes,
) -> bytes:
    """Protect ``plaintext`` as ``security_control`` says; return what follows the
    invocation counter in a ciphered APDU (ciphertext and/or tag).

    Raises :class:`SecurityError` for a control byte of another suite or without
    protection, or for keys/system title of the wrong size.
    """
    iv = _iv(system_title, invocation_counter)
    if security_control & 0x0F != SUITE_0:
        raise SecurityError(f"security suite {security_control & 0x0F} is not suite 0")
    sc = bytes((security_control,))
    encryptor = _encryptor(block_cipher_key, iv)
    if security_control & 0x30 == AUTHENTICATED:
        encryptor.authenticate_additional_data(sc + authentication_key + plaintext)
        encryptor.finalize()
        return plaintext + encryptor.tag[:TAG_SIZE]
    if security_control & 0x30 == AUTHENTICATED_ENCRYPTED:
        encryptor.authenticate_additional_data(sc + authentication_key)
        ciphertext = encryptor.update(plaintext) + encryptor.finalize()
        return ciphertext + encryptor.tag[:TAG_SIZE]
    if security_control & 0x30 == ENCRYPTED:
        return encryptor.update(plaintext) + encryptor.finalize()
    raise SecurityError(f"security control 0x{security_control:02X} protects nothing")


def decrypt(
    security_control: int,
    system_title: bytes,
    invocation_counter: int,
    block_cipher_key: bytes,
    authentication_key: bytes,
    payload: bytes,
) -> bytes:
    """Check and remove the protection of ``payload``; return the plain APDU.

    Raises :class:`SecurityError` when the tag does not verify (wrong keys, wrong
    system title, or altered bytes) or the payload is shorter than a tag.
    """
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    iv = _iv(system_title, invocation_counter)
    if security_control & 0x0F != SUITE_0:
        raise SecurityError(f"security suite {security_control & 0x0F} is not suite 0")
    sc = bytes((security_control,))
    mode = security_control & 0x30
    if mode == ENCRYPTED:
        return _encryptor(block_cipher_key, iv).update(payload)
    if mode not in (AUTHENTICATED, AUTHENTICATED_ENCRYPTED):
        raise SecurityError(f"security control 0x{security_control:02X} is not suite 0")
    if len(payload) < TAG_SIZE:
        raise SecurityError(f"ciphered payload of {len(payload)} bytes has no tag")
    body, tag = payload[:-TAG_SIZE], payload[-TAG_SIZE:]
    try:
        decryptor = Cipher(
            algorithms.AES(block_cipher_key),
            modes.GCM(iv, tag, min_tag_length=TAG_SIZE),
        ).decryptor()
        if mode == AUTHENTICATED:
            decryptor.authenticate_additional_data(sc + authentication_key + body)
            decryptor.finalize()
            return body
        decryptor.authenticate_additional_data(sc + authentication_key)
        return decryptor.update(body) + decryptor.finalize()
    except InvalidTag:
        raise SecurityError(
            "authentication tag does not verify: wrong block cipher or "
            "authentication key, wrong system title, or the APDU was altered"
        ) from None
    except ValueError as exc:
        raise SecurityError(f"AES-GCM cannot use this key: {exc}") from None


def gmac(
    system_title: bytes,
    invocation_counter: int,
    block_cipher_key: bytes,
    authentication_key: bytes,
    challenge: bytes,
    security_control: int = AUTHENTICATED,
) -> bytes:
    """Return the 12-byte GMAC of ``challenge`` (HLS mechanism 5)."""
    tagged = encrypt(
        security_control,
        system_title,
        invocation_counter,
        block_cipher_key,
        authentication_key,
        challenge,
    )
    return tagged[-TAG_SIZE:]


def hls_reply(keys: SecurityKeys, invocation_counter: int, challenge: bytes) -> bytes:
    """Return ``SC | IC | GMAC`` proving ``keys`` over the peer's ``challenge``."""
    tag = gmac(
        keys.system_title,
        invocation_counter,
        keys.block_cipher_key,
        keys.authentication_key,
        challenge,
    )
    return bytes((AUTHENTICATED,)) + invocation_counter.to_bytes(4, "big") + tag


def check_hls_reply(
    reply: bytes,
    peer_title: bytes,
    block_cipher_key: bytes,
    authentication_key: bytes,
    challenge: bytes,
) -> int:
    """Check the peer's HLS ``reply`` to our ``challenge``; return its invocation
    counter. Raises :class:`SecurityError` when it does not verify."""
    if len(reply) != 5 + TAG_SIZE or reply[0] != AUTHENTICATED:
        raise SecurityError(
            f"HLS reply of {len(reply)} bytes is not SC 0x10 | IC | 12-byte GMAC"
        )
    counter = int.from_bytes(reply[1:5], "big")
    expected = gmac(
        peer_title, counter, block_cipher_key, authentication_key, challenge
    )
    if expected != reply[5:]:
        raise SecurityError(
            "the peer's HLS reply does not verify: it does not hold the same "
            "keys (or answered with another system title)"
        )
    return counter


def new_challenge(size: int = 16) -> bytes:
    """Return a random challenge of ``size`` bytes (8..64 per the Green Book)."""
    if not 8 <= size <= 64:
        raise SecurityError(f"an HLS challenge has 8..64 bytes, not {size}")
    return os.urandom(size)
