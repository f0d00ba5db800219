"""C2SP signed notes and ``tlog-checkpoint`` bodies: how checkpoints are signed.

A signed note is UTF-8 text ending in a newline, a blank line, then one line per
signature ``— <key name> <base64(4-byte key id || signature)>``. A verifier key is the
string ``<name>+<8 hex digits of key id>+<base64(type byte || public key)>``. Two key
types are supported:

* ``0x01`` Ed25519: key id = SHA-256(name || 0x0A || 0x01 || 32-byte key)[:4]; the
  signature is Ed25519 over the text.
* ``0x02`` ECDSA P-256: the key is the DER SubjectPublicKeyInfo, key id =
  SHA-256(SPKI DER)[:4]; the signature is DER ECDSA-SHA256 over the text. We sign
  deterministically (RFC 6979) and normalise to low S, so a checkpoint is byte-for-byte
  reproducible; we accept any valid S when verifying, as other logs do not normalise.

A checkpoint body (C2SP ``tlog-checkpoint``) is ``origin\\nsize\\nbase64(root)\\n``
followed by optional extension lines.

Malformed notes, keys and checkpoint bodies raise
:class:`~ies_agent.evidence.errors.NoteError`; so does a signature line by a key we
know whose signature does not verify (a forged or damaged checkpoint is never "just
unsigned").
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from ies_agent.evidence.errors import NoteError

ALG_ED25519 = 0x01
"""Signed-note key type byte of Ed25519."""
ALG_ECDSA_P256 = 0x02
"""Signed-note key type byte of ECDSA P-256 with SHA-256 (DER signatures)."""

SIGNATURE_PREFIX = "— "
"""Every signature line starts with an em dash (U+2014) and a space."""

MAX_SIGNATURES = 100
"""More signature lines than this make a note malformed (as the Go reference says)."""

P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
"""Order n of the P-256 group; low-S means s <= n // 2."""


class NoteSigner(Protocol):
    """A key that can sign notes: what the log writer holds."""

    @property
    def name(self) -> str:
        """Key name written in the signature line (the log's origin)."""
        ...

    @property
    def key_id(self) -> bytes:
        """The 4-byte key hash that prefixes every signature."""
        ...

    def sign(self, msg: bytes) -> bytes:
        """Return the raw signature of ``msg`` (without the key id)."""
        ...

    def vkey(self) -> str:
        """Return the verifier key string that checks this signer's signatures."""
        ...


def _check_key_name(name: str) -> None:
    if not name or "+" in name or any(c.isspace() for c in name):
        raise NoteError(
            f"key name {name!r} is not allowed: it must be non-empty without "
            "spaces or '+'"
        )
    if not name.isprintable():
        raise NoteError(f"key name {name!r} holds control characters")


def _ed25519_key_id(name: str, raw_public: bytes) -> bytes:
    return hashlib.sha256(
        name.encode("utf-8") + b"\n" + bytes([ALG_ED25519]) + raw_public
    ).digest()[:4]


def _ecdsa_key_id(spki_der: bytes) -> bytes:
    return hashlib.sha256(spki_der).digest()[:4]


def _vkey_string(name: str, key_id: bytes, body: bytes) -> str:
    return f"{name}+{key_id.hex()}+{base64.b64encode(body).decode('ascii')}"


class Ed25519NoteSigner:
    """Signs notes with an Ed25519 key (signed-note type 0x01)."""

    def __init__(self, name: str, private_key: ed25519.Ed25519PrivateKey) -> None:
        _check_key_name(name)
        self._name = name
        self._private_key = private_key
        self._raw_public = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self._key_id = _ed25519_key_id(name, self._raw_public)

    @property
    def name(self) -> str:
        """Key name written in the signature line."""
        return self._name

    @property
    def key_id(self) -> bytes:
        """SHA-256(name || 0x0A || 0x01 || public key)[:4]."""
        return self._key_id

    def sign(self, msg: bytes) -> bytes:
        """Return the 64-byte Ed25519 signature of ``msg``."""
        return self._private_key.sign(msg)

    def vkey(self) -> str:
        """Return ``name+keyid+base64(0x01 || public key)``."""
        return _vkey_string(
            self._name, self._key_id, bytes([ALG_ED25519]) + self._raw_public
        )


class EcdsaP256NoteSigner:
    """Signs notes with an ECDSA P-256 key (signed-note type 0x02).

    Signatures are deterministic (RFC 6979) and normalised to low S, DER-encoded.
    Raises ``NoteError`` if the key is not on P-256.
    """

    def __init__(self, name: str, private_key: ec.EllipticCurvePrivateKey) -> None:
        _check_key_name(name)
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise NoteError(
                f"an ECDSA note key must be on P-256, not {private_key.curve.name}"
            )
        self._name = name
        self._private_key = private_key
        self._spki = private_key.public_key().public_bytes(
            serialization.Encoding.DER,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
        self._key_id = _ecdsa_key_id(self._spki)

    @property
    def name(self) -> str:
        """Key name written in the signature line."""
        return self._name

    @property
    def key_id(self) -> bytes:
        """SHA-256(SubjectPublicKeyInfo DER)[:4]."""
        return self._key_id

    def sign(self, msg: bytes) -> bytes:
        """Return the DER ECDSA-SHA256 signature of ``msg`` (RFC 6979, low S)."""
        return sign_p256_low_s(self._private_key, msg)

    def vkey(self) -> str:
        """Return ``name+keyid+base64(0x02 || SPKI DER)``."""
        return _vkey_string(
            self._name, self._key_id, bytes([ALG_ECDSA_P256]) + self._spki
        )


def sign_p256_low_s(private_key: ec.EllipticCurvePrivateKey, msg: bytes) -> bytes:
    """Sign ``msg`` with ECDSA P-256/SHA-256, deterministically (RFC 6979), low S, DER.

    Shared by checkpoint notes and OCMF export, which both promise reproducible bytes.
    """
    der = private_key.sign(msg, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    r, s = decode_dss_signature(der)
    if s > P256_ORDER // 2:
        return encode_dss_signature(r, P256_ORDER - s)
    return der


class NoteVerifier:
    """Checks one key's signatures on notes; built by :func:`parse_vkey`."""

    __slots__ = ("_public_key", "alg", "key_id", "name", "vkey")

    def __init__(
        self,
        name: str,
        key_id: bytes,
        alg: int,
        public_key: ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey,
        vkey: str,
    ) -> None:
        self.name = name
        """Key name, as written in signature lines."""
        self.key_id = key_id
        """4-byte key hash."""
        self.alg = alg
        """Key type byte: ``ALG_ED25519`` or ``ALG_ECDSA_P256``."""
        self.vkey = vkey
        """The verifier key string this was parsed from."""
        self._public_key = public_key

    @property
    def label(self) -> str:
        """``name+keyid`` (hex): tells apart keys that share a name."""
        return f"{self.name}+{self.key_id.hex()}"

    def verify(self, msg: bytes, sig: bytes) -> bool:
        """Tell whether ``sig`` (without the key id) signs ``msg`` under this key."""
        try:
            if isinstance(self._public_key, ed25519.Ed25519PublicKey):
                self._public_key.verify(sig, msg)
            else:
                self._public_key.verify(sig, msg, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return False
        return True

    def __repr__(self) -> str:
        return f"NoteVerifier({self.label!r})"


def parse_vkey(text: str) -> NoteVerifier:
    """Parse a verifier key string ``name+hexid+base64(type || key)``.

    Surrounding whitespace is ignored. Raises ``NoteError`` when the string is
    malformed, the key type is not 0x01 or 0x02, the key bytes do not decode, or the
    key id does not match the key.
    """
    text = text.strip()
    parts = text.split("+", 2)
    if len(parts) != 3:
        raise NoteError(
            "a verifier key has the form name+keyid+base64key; "
            f"got {len(parts)} '+'-separated parts in {text[:60]!r}"
        )
    name, id_hex, key_b64 = parts
    _check_key_name(name)
    if len(id_hex) != 8:
        raise NoteError(f"verifier key id must be 8 hex digits, got {id_hex!r}")
    try:
        key_id = bytes.fromhex(id_hex)
        body = base64.b64decode(key_b64, validate=True)
    except (ValueError, binascii.Error):
        raise NoteError(f"verifier key {name!r} holds bad hex or base64") from None
    if not body:
        raise NoteError(f"verifier key {name!r} is empty")
    alg, key = body[0], body[1:]
    public_key: ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey
    if alg == ALG_ED25519:
        if len(key) != 32:
            raise NoteError(f"Ed25519 key {name!r} must be 32 bytes, got {len(key)}")
        public_key = ed25519.Ed25519PublicKey.from_public_bytes(key)
        expected_id = _ed25519_key_id(name, key)
    elif alg == ALG_ECDSA_P256:
        try:
            loaded = serialization.load_der_public_key(key)
        except ValueError:
            raise NoteError(
                f"ECDSA key {name!r} is not a DER SubjectPublicKeyInfo"
            ) from None
        if not isinstance(loaded, ec.EllipticCurvePublicKey) or not isinstance(
            loaded.curve, ec.SECP256R1
        ):
            raise NoteError(f"key {name!r} of type 0x02 must be an ECDSA P-256 key")
        public_key = loaded
        expected_id = _ecdsa_key_id(key)
    else:
        raise NoteError(
            f"verifier key {name!r} has type 0x{alg:02x}; supported: 0x01 Ed25519, "
            "0x02 ECDSA P-256"
        )
    if key_id != expected_id:
        raise NoteError(
            f"verifier key {name!r} says key id {id_hex} but the key hashes to "
            f"{expected_id.hex()}"
        )
    return NoteVerifier(name, key_id, alg, public_key, text)


def _check_text(text: str) -> None:
    if not text.endswith("\n"):
        raise NoteError("note text must end with a newline")
    for char in text:
        if char < " " and char != "\n":
            raise NoteError(f"note text holds control character {char!r}")


def sign_note(text: str, signers: Sequence[NoteSigner]) -> str:
    """Return ``text`` signed by each of ``signers`` in order, as a signed note.

    Raises ``NoteError`` if the text does not end in a newline, holds control
    characters, or no signer is given.
    """
    _check_text(text)
    if not signers:
        raise NoteError("a signed note needs at least one signer")
    msg = text.encode("utf-8")
    lines = []
    for signer in signers:
        blob = base64.b64encode(signer.key_id + signer.sign(msg)).decode("ascii")
        lines.append(f"{SIGNATURE_PREFIX}{signer.name} {blob}\n")
    return text + "\n" + "".join(lines)


@dataclass(frozen=True, slots=True)
class NoteSignature:
    """One signature line of a note: key name, key id and raw signature."""

    name: str
    key_id: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class OpenedNote:
    """A note whose signatures were checked.

    ``verified_by`` holds the ``name+keyid`` labels of the known keys that signed it,
    in signature order; ``unknown_sigs`` counts signature lines by keys not given.
    """

    text: str
    verified_by: list[str]
    unknown_sigs: int


def split_note(note: str) -> tuple[str, list[NoteSignature]]:
    """Split a signed note into its text and signature lines without verifying.

    Raises ``NoteError`` for a note without the blank line before the signatures, a
    malformed signature line, or more than ``MAX_SIGNATURES`` signatures.
    """
    split = note.rfind("\n\n")
    if split < 0:
        raise NoteError("a signed note needs a blank line before its signatures")
    text, sig_block = note[: split + 1], note[split + 2 :]
    _check_text(text)
    if not sig_block.endswith("\n"):
        raise NoteError("the signature block of a note must end with a newline")
    signatures = []
    for line in sig_block[:-1].split("\n"):
        if not line.startswith(SIGNATURE_PREFIX):
            raise NoteError(f"malformed signature line {line[:60]!r}")
        fields = line[len(SIGNATURE_PREFIX) :].split(" ")
        if len(fields) != 2 or not fields[0]:
            raise NoteError(f"malformed signature line {line[:60]!r}")
        name, blob_b64 = fields
        try:
            blob = base64.b64decode(blob_b64, validate=True)
        except (ValueError, binascii.Error):
            raise NoteError(f"signature by {name!r} is not valid base64") from None
        if len(blob) < 5:
            raise NoteError(f"signature by {name!r} is too short")
        signatures.append(NoteSignature(name, blob[:4], blob[4:]))
    if len(signatures) > MAX_SIGNATURES:
        raise NoteError(f"a note has at most {MAX_SIGNATURES} signatures")
    return text, signatures


def open_note(note: str, verifiers: Sequence[NoteVerifier]) -> OpenedNote:
    """Check the signatures of ``note`` against ``verifiers``.

    A signature whose name and key id match a verifier must verify, or ``NoteError``
    is raised naming the key; other signatures are counted in ``unknown_sigs``.
    Deciding whether enough trusted keys signed is the caller's business (an
    ``OpenedNote`` with empty ``verified_by`` is possible). Raises ``NoteError`` for
    malformed notes as well.
    """
    text, signatures = split_note(note)
    known = {(v.name, v.key_id): v for v in verifiers}
    msg = text.encode("utf-8")
    verified_by: list[str] = []
    unknown = 0
    for signature in signatures:
        verifier = known.get((signature.name, signature.key_id))
        if verifier is None:
            unknown += 1
            continue
        if not verifier.verify(msg, signature.signature):
            raise NoteError(
                f"signature by {verifier.label} does not verify: the note was "
                "altered or signed with another key"
            )
        if verifier.label not in verified_by:
            verified_by.append(verifier.label)
    return OpenedNote(text, verified_by, unknown)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The body of a ``tlog-checkpoint`` note: log origin, tree size, root hash."""

    origin: str
    size: int
    root: bytes
    extension_lines: tuple[str, ...] = ()


def checkpoint_text(origin: str, size: int, root: bytes) -> str:
    """Return the checkpoint body ``origin\\nsize\\nbase64(root)\\n``.

    Raises ``NoteError`` for an empty origin or one with a newline, a negative size, or
    a root that is not 32 bytes.
    """
    if not origin or "\n" in origin:
        raise NoteError(f"checkpoint origin {origin!r} must be one non-empty line")
    if size < 0:
        raise NoteError(f"checkpoint size must be >= 0, got {size}")
    if len(root) != 32:
        raise NoteError(f"checkpoint root must be 32 bytes, got {len(root)}")
    return f"{origin}\n{size}\n{base64.b64encode(root).decode('ascii')}\n"


def parse_checkpoint(text: str) -> Checkpoint:
    """Parse a checkpoint body (the text of a note, without signatures).

    Raises ``NoteError`` unless it has an origin line, a decimal size without leading
    zeros, a base64 32-byte root, and ends with a newline.
    """
    if not text.endswith("\n"):
        raise NoteError("checkpoint text must end with a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 3:
        raise NoteError(
            f"checkpoint needs origin, size and root lines, got {len(lines)} lines"
        )
    origin, size_text, root_text, *extensions = lines
    if not origin:
        raise NoteError("checkpoint origin line is empty")
    if (
        not size_text.isascii()
        or not size_text.isdigit()
        or (size_text.startswith("0") and size_text != "0")
    ):
        raise NoteError(f"checkpoint size {size_text!r} is not a decimal number")
    try:
        root = base64.b64decode(root_text, validate=True)
    except (ValueError, binascii.Error):
        raise NoteError(f"checkpoint root {root_text!r} is not base64") from None
    if len(root) != 32:
        raise NoteError(f"checkpoint root has {len(root)} bytes, expected 32")
    if any(not line for line in extensions):
        raise NoteError("checkpoint extension lines must not be empty")
    return Checkpoint(origin, int(size_text), root, tuple(extensions))
