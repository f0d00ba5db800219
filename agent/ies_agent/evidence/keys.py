"""The gateway's log signing key: created on first start, kept private, rotated.

Files under ``<data_dir>/keys/`` (a directory of mode 0700):

- ``log-key.pem``: the current private key, PKCS8 PEM, mode 0600. ECDSA P-256 by
  default, Ed25519 as an option. It is created with ``os.open(..., O_CREAT | O_EXCL,
  0o600)``, so no one else can read it even for a moment, and it is never chmod-ed
  after writing. A key file that group or others can read or write is refused
  (:class:`KeyFileError` names the file, its mode and the ``chmod`` to run): a key
  others could read signs nothing anyone should trust.
- ``key-card.json``: what the utility registers: gateway id, origin, algorithm, the
  signed-note verifier key (``vkey``), the SubjectPublicKeyInfo (base64 DER), the
  fingerprint (SHA-256 hex of that DER) and when the key was created; earlier keys
  are listed under ``retired``. Public; rewritten when it does not match the key.
- ``log.vkey``: one line, the current signed-note verifier key.
- ``retired/log-key-<fingerprint16>.pem``: keys replaced by a rotation.
- ``log-key.pem.new``: a new key staged by a rotation that has not finished yet.

Rotation (:func:`rotate`, or :meth:`EvidenceLog.rotate_key
<ies_agent.evidence.log.EvidenceLog.rotate_key>`) stages a new key, appends a
``key_rotation`` event naming both verifier keys, checkpoints it under the OLD key,
swaps the files (old key to ``retired/``) and signs the next checkpoint with both keys,
so a verifier that trusts either key can follow the hand-over. Every step leaves files
from which the next start finishes the rotation.

Nothing here ever logs or prints key material. Errors: :class:`KeyFileError` (see
``ies_agent.evidence.errors`` for the tree).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from ies_agent.evidence.errors import KeyFileError

if TYPE_CHECKING:
    from ies_agent.evidence.note import NoteSigner

ALG_ECDSA_P256 = "ecdsa-p256"
"""Configuration name of ECDSA over P-256 with SHA-256 (the default)."""
ALG_ED25519 = "ed25519"
"""Configuration name of Ed25519."""
KEY_ALGS = (ALG_ECDSA_P256, ALG_ED25519)
"""Algorithms a new key may use."""
ALG_NAMES = {ALG_ECDSA_P256: "ECDSA-P256-SHA256", ALG_ED25519: "Ed25519"}
"""Names written into ``boot`` and ``key_rotation`` events (as in the example)."""

KEYS_DIR = "keys"
KEY_FILE = "log-key.pem"
STAGED_KEY_FILE = "log-key.pem.new"
CARD_FILE = "key-card.json"
VKEY_FILE = "log.vkey"
RETIRED_DIR = "retired"

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private log signing key loaded from ``path``, with what is derived from it."""

    alg: str
    """``ecdsa-p256`` or ``ed25519``."""
    private_key: PrivateKey
    path: Path

    @property
    def spki_der(self) -> bytes:
        """The public key as DER SubjectPublicKeyInfo."""
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.DER,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the SubjectPublicKeyInfo DER, 64 lowercase hex digits."""
        return hashlib.sha256(self.spki_der).hexdigest()

    @property
    def alg_name(self) -> str:
        """Algorithm as written in log entries (``ECDSA-P256-SHA256``, ``Ed25519``)."""
        return ALG_NAMES[self.alg]

    def signer(self, name: str) -> NoteSigner:
        """Return the signed-note signer of this key for the log named ``name``."""
        from ies_agent.evidence import note

        if isinstance(self.private_key, ed25519.Ed25519PrivateKey):
            return note.Ed25519NoteSigner(name, self.private_key)
        return note.EcdsaP256NoteSigner(name, self.private_key)


def keys_dir(data_dir: Path) -> Path:
    """Return the key directory of ``data_dir``."""
    return Path(data_dir) / KEYS_DIR


def generate_private_key(alg: str = ALG_ECDSA_P256) -> PrivateKey:
    """Return a fresh private key for ``alg``; ``ValueError`` for an unknown ``alg``."""
    if alg == ALG_ECDSA_P256:
        return ec.generate_private_key(ec.SECP256R1())
    if alg == ALG_ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key algorithm {alg!r}; use one of {', '.join(KEY_ALGS)}")


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) with mode 0700 unless it exists.

    The mode is given to ``mkdir`` itself, so the directory is never open to others.
    An existing directory is left as it is.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not path.is_dir():
            raise KeyFileError(f"{path} exists but is not a directory") from None


def write_private_key(path: Path, private_key: PrivateKey) -> None:
    """Write ``private_key`` as unencrypted PKCS8 PEM to ``path``, mode 0600, durably.

    The PEM goes to ``<path>.tmp`` (created with ``O_EXCL`` and mode 0600), is fsynced
    and then hard-linked to ``path``, so ``path`` appears whole or not at all and an
    existing key is never overwritten. Raises ``KeyFileError`` when ``path`` exists or
    cannot be written.
    """
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = path.with_name(path.name + ".tmp")
    # A .tmp left by a crash never became a key; it is safe to remove.
    tmp.unlink(missing_ok=True)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; not overwriting a key") from None
    except OSError as exc:
        raise KeyFileError(f"cannot write key file {path}: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def load_private_key(path: Path) -> SigningKey:
    """Load the PKCS8 PEM private key at ``path`` after checking its permissions.

    Raises ``KeyFileError`` when the file is missing, is not a regular file, can be
    read or written by group or others (the message gives the mode and the ``chmod``
    that fixes it), cannot be read, or does not hold a P-256 or Ed25519 key.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"cannot open key file {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"key file {path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise KeyFileError(
                f"key file {path} has mode {mode:04o}: group or others can access the "
                f"log's private signing key, so signatures made with it prove nothing. "
                f"Refusing to use it. If no one else can have copied it, run "
                f"`chmod 600 {path}`; otherwise rotate the key."
            )
        with os.fdopen(os.dup(fd), "rb") as handle:
            pem = handle.read()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    try:
        private_key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise KeyFileError(
            f"key file {path} does not hold an unencrypted PKCS8 PEM private key"
        ) from None
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return SigningKey(ALG_ED25519, private_key, Path(path))
    if isinstance(private_key, ec.EllipticCurvePrivateKey) and isinstance(
        private_key.curve, ec.SECP256R1
    ):
        return SigningKey(ALG_ECDSA_P256, private_key, Path(path))
    raise KeyFileError(
        f"key file {path} holds a {type(private_key).__name__}; the log signs with "
        f"ECDSA P-256 or Ed25519 only"
    )


def ensure_key(
    data_dir: Path, *, gateway_id: str, origin: str, alg: str = ALG_ECDSA_P256
) -> SigningKey:
    """Load the current key of ``data_dir``, creating it (of ``alg``) on first start.

    An existing key is used whatever ``alg`` says (changing algorithm is a rotation).
    The key card and ``log.vkey`` are (re)written when missing or not matching the
    key, ``gateway_id`` or ``origin``. Raises ``KeyFileError`` as
    :func:`load_private_key` does, and ``ValueError`` for an unknown ``alg``.
    """
    directory = keys_dir(data_dir)
    make_private_dir(directory)
    path = directory / KEY_FILE
    if not path.exists():
        write_private_key(path, generate_private_key(alg))
    key = load_private_key(path)
    refresh_key_card(data_dir, key, gateway_id=gateway_id, origin=origin)
    return key


def stage_new_key(data_dir: Path, alg: str) -> SigningKey:
    """Create the key a rotation will switch to, as ``keys/log-key.pem.new``.

    A staged key left by an earlier, unfinished attempt that was never logged is
    replaced. Returns the new key; raises ``KeyFileError`` if it cannot be written.
    """
    path = keys_dir(data_dir) / STAGED_KEY_FILE
    path.unlink(missing_ok=True)
    write_private_key(path, generate_private_key(alg))
    return load_private_key(path)


def load_staged_key(data_dir: Path) -> SigningKey | None:
    """Return the key staged by an unfinished rotation, or ``None`` if there is none."""
    path = keys_dir(data_dir) / STAGED_KEY_FILE
    if not path.exists():
        return None
    return load_private_key(path)


def discard_staged_key(data_dir: Path) -> None:
    """Remove a staged key that no ``key_rotation`` event names (never used)."""
    (keys_dir(data_dir) / STAGED_KEY_FILE).unlink(missing_ok=True)


def retired_key_path(data_dir: Path, fingerprint: str) -> Path:
    """Return where the retired key of ``fingerprint`` is kept."""
    return keys_dir(data_dir) / RETIRED_DIR / f"log-key-{fingerprint[:16]}.pem"


def load_retired_key(data_dir: Path, fingerprint: str) -> SigningKey:
    """Load the retired key of ``fingerprint``; ``KeyFileError`` if absent or loose."""
    return load_private_key(retired_key_path(data_dir, fingerprint))


def commit_rotation(
    data_dir: Path,
    old: SigningKey,
    new: SigningKey,
    *,
    gateway_id: str,
    origin: str,
) -> SigningKey:
    """Make the staged ``new`` key current and move ``old`` to ``keys/retired/``.

    Each step can be repeated after a crash: the old key is hard-linked into
    ``retired/`` first, then the staged file atomically replaces ``log-key.pem``, then
    the card is rewritten (listing the old key as retired). Returns the new key as
    loaded from its final path. Raises ``KeyFileError`` when a file cannot be moved.
    """
    directory = keys_dir(data_dir)
    make_private_dir(directory / RETIRED_DIR)
    retired = retired_key_path(data_dir, old.fingerprint)
    current = directory / KEY_FILE
    try:
        if not retired.exists():
            os.link(old.path, retired)
        fsync_dir(retired.parent)
        os.replace(new.path, current)
        fsync_dir(directory)
    except OSError as exc:
        raise KeyFileError(
            f"cannot move keys in {directory} to finish a rotation: {exc.strerror}"
        ) from None
    key = load_private_key(current)
    if key.fingerprint != new.fingerprint:
        raise KeyFileError(f"{current} does not hold the key the rotation staged")
    card = read_key_card(data_dir)
    retired_list = list(card.get("retired", [])) if card else []
    if not any(item.get("fingerprint") == old.fingerprint for item in retired_list):
        entry = public_key_info(old, origin)
        entry["created"] = card.get("created") if card else None
        entry["retired"] = _iso_now()
        retired_list.append(entry)
    write_key_card(
        data_dir,
        make_key_card(key, gateway_id=gateway_id, origin=origin, retired=retired_list),
    )
    return key


def public_key_info(key: SigningKey, origin: str) -> dict[str, Any]:
    """Return the public facts of ``key`` for the log named ``origin``."""
    return {
        "alg": key.alg,
        "vkey": key.signer(origin).vkey(),
        "public_key_spki_b64": base64.b64encode(key.spki_der).decode("ascii"),
        "fingerprint": key.fingerprint,
    }


def make_key_card(
    key: SigningKey,
    *,
    gateway_id: str,
    origin: str,
    created: str | None = None,
    retired: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Return the key card of ``key``: the public facts a utility registers.

    Fields: ``gateway_id``, ``origin``, ``alg`` (``ecdsa-p256`` or ``ed25519``),
    ``vkey`` (signed-note verifier key), ``public_key_spki_b64`` (base64 DER
    SubjectPublicKeyInfo), ``fingerprint`` (SHA-256 hex of that DER), ``created`` (UTC
    ISO 8601, now unless given) and ``retired`` (earlier keys, oldest first, each with
    the same public fields plus ``created`` and ``retired`` times).
    """
    card: dict[str, Any] = {"gateway_id": gateway_id, "origin": origin}
    card.update(public_key_info(key, origin))
    card["created"] = created or _iso_now()
    card["retired"] = list(retired or [])
    return card


def read_key_card(data_dir: Path) -> dict[str, Any] | None:
    """Return the key card of ``data_dir``, or ``None`` when there is none.

    Raises ``KeyFileError`` when the card exists but is not a JSON object.
    """
    path = keys_dir(data_dir) / CARD_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise KeyFileError(f"cannot read key card {path}: {exc.strerror}") from None
    try:
        card = json.loads(text)
    except ValueError:
        raise KeyFileError(f"key card {path} is not valid JSON") from None
    if not isinstance(card, dict):
        raise KeyFileError(f"key card {path} is not a JSON object")
    return card


def write_key_card(data_dir: Path, card: dict[str, Any]) -> None:
    """Write ``card`` as ``key-card.json`` and its vkey as ``log.vkey``, atomically."""
    directory = keys_dir(data_dir)
    text = json.dumps(card, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    _write_public_file(directory / CARD_FILE, text)
    _write_public_file(directory / VKEY_FILE, str(card["vkey"]) + "\n")
    fsync_dir(directory)


def refresh_key_card(
    data_dir: Path, key: SigningKey, *, gateway_id: str, origin: str
) -> dict[str, Any]:
    """Return the key card of ``key``, rewriting it if missing or out of date.

    ``created`` and ``retired`` are kept from the existing card when it describes the
    same key.
    """
    card = read_key_card(data_dir)
    same_key = card is not None and card.get("fingerprint") == key.fingerprint
    wanted = make_key_card(
        key,
        gateway_id=gateway_id,
        origin=origin,
        created=card.get("created") if card and same_key else None,
        retired=card.get("retired") if card else None,
    )
    vkey_path = keys_dir(data_dir) / VKEY_FILE
    vkey_ok = vkey_path.exists() and vkey_path.read_text().strip() == wanted["vkey"]
    if card != wanted or not vkey_ok:
        write_key_card(data_dir, wanted)
    return wanted


def rotate(data_dir: Path, *, alg: str | None = None) -> SigningKey:
    """Rotate the signing key of the log in ``data_dir`` (no agent may be running).

    Opens the log (taking its lock), lets :meth:`EvidenceLog.rotate_key
    <ies_agent.evidence.log.EvidenceLog.rotate_key>` log and checkpoint the rotation
    under the old key, and closes the log, whose closing checkpoint carries both
    signatures. ``alg`` defaults to the current key's algorithm. Returns the new key.
    Raises ``KeyFileError`` when there is no key card (the agent never started here),
    ``LogLockedError`` when an agent holds the data directory, and what
    ``EvidenceLog.open`` raises.
    """
    from ies_agent.evidence.log import EvidenceLog

    card = read_key_card(data_dir)
    if card is None:
        raise KeyFileError(
            f"no key card in {keys_dir(data_dir)}: the agent has not created a key "
            f"here yet, so there is nothing to rotate"
        )
    log = EvidenceLog.open(
        Path(data_dir), gateway_id=str(card["gateway_id"]), origin=card.get("origin")
    )
    try:
        key = log.rotate_key(alg)
    finally:
        log.close()
    return key


def fsync_dir(path: Path) -> None:
    """fsync directory ``path`` so created, linked or renamed names in it persist."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_public_file(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _iso_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
