"""Secrets at rest, logins, sessions, CSRF tokens and login rate limiting.

No aiohttp here: the server asks these objects yes-or-no questions, so the rules can
be tested without sockets.

A secret file holds one line ``scrypt$<log2 n>$<r>$<p>$<salt b64>$<hash b64>``
(scrypt, RFC 7914), written by :func:`write_secret_hash`; a file holding anything
else is refused, so a plain password never sits on the disk unnoticed.

Errors::

    WebAuthError           base class
     └── SecretFileError   a password or token file is missing, loose or not a hash
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import stat
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

SCRYPT_LOG2_N = 14
"""Cost of one check: 16 MiB of memory and about 50 ms on a Raspberry Pi 4."""
SCRYPT_R = 8
SCRYPT_P = 1
SESSION_LIMIT = 64
"""Most sessions kept at once; the oldest is dropped beyond it."""


class WebAuthError(Exception):
    """Base class of the web page's access errors."""


class SecretFileError(WebAuthError):
    """Raised when a password or token file cannot be used (missing, readable by
    others, or holding something other than a hash)."""


def hash_secret(secret: str) -> str:
    """Return the one-line scrypt hash of ``secret`` with a fresh 16-byte salt."""
    salt = os.urandom(16)
    digest = _scrypt(secret, salt, SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P)
    return "$".join(
        [
            "scrypt",
            str(SCRYPT_LOG2_N),
            str(SCRYPT_R),
            str(SCRYPT_P),
            base64.b64encode(salt).decode("ascii"),
            base64.b64encode(digest).decode("ascii"),
        ]
    )


def check_secret(secret: str, hashed: str) -> bool:
    """Whether ``secret`` matches ``hashed`` (compared in constant time).

    Raises :class:`SecretFileError` when ``hashed`` is not a hash this module wrote.
    """
    parts = hashed.strip().split("$")
    try:
        if len(parts) != 6 or parts[0] != "scrypt":
            raise ValueError("not a scrypt line")
        log2_n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt = base64.b64decode(parts[4], validate=True)
        expected = base64.b64decode(parts[5], validate=True)
        if not (10 <= log2_n <= 20 and 1 <= r <= 16 and 1 <= p <= 4 and expected):
            raise ValueError("cost out of range")
    except ValueError:
        raise SecretFileError(
            "not a password hash: write the file with `ies-agent web-password FILE`"
        ) from None
    actual = _scrypt(secret, salt, log2_n, r, p, len(expected))
    return hmac.compare_digest(actual, expected)


def _scrypt(
    secret: str, salt: bytes, log2_n: int, r: int, p: int, length: int = 32
) -> bytes:
    return hashlib.scrypt(
        secret.encode("utf-8"),
        salt=salt,
        n=1 << log2_n,
        r=r,
        p=p,
        maxmem=1 << 26,
        dklen=length,
    )


def write_secret_hash(path: Path, secret: str) -> None:
    """Write the hash of ``secret`` to ``path`` (mode 0600), replacing any old file."""
    line = hash_secret(secret) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(line)
    os.replace(tmp, path)


def read_secret_hash(path: Path) -> str:
    """Return the hash line of ``path``.

    Raises :class:`SecretFileError` when the file is missing, readable or writable
    by others than its owner and group, or does not hold a hash.
    """
    try:
        info = path.stat()
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SecretFileError(f"cannot read {path}: {exc.strerror}") from None
    if info.st_mode & (stat.S_IROTH | stat.S_IWOTH):
        raise SecretFileError(
            f"{path} is readable by every user; run: chmod 600 {path}"
        )
    if not text.startswith("scrypt$") or text.count("$") != 5:
        raise SecretFileError(
            f"{path} does not hold a password hash (a plain password must never be "
            f"stored): replace it with `ies-agent web-password {path}`"
        )
    return text


@dataclass
class Session:
    """One login: its id (the cookie), its CSRF token and when it ends (monotonic s)."""

    id: str
    csrf: str
    expires: float


@dataclass
class Gatekeeper:
    """Decides who may act: checks secrets, keeps sessions, limits login attempts.

    ``hashes`` are the accepted secret hashes (password and token); ``session_s`` is
    a login's absolute lifetime; at most ``max_failures`` failed logins per client
    address are allowed in any ``window_s`` seconds.
    """

    hashes: list[str]
    session_s: float
    max_failures: int = 5
    window_s: float = 60.0
    sessions: dict[str, Session] = field(default_factory=dict)
    _failures: dict[str, deque[float]] = field(default_factory=dict)
    _good_tokens: set[str] = field(default_factory=set)

    @property
    def has_secret(self) -> bool:
        """Whether any password or token is configured."""
        return bool(self.hashes)

    def retry_after(self, client: str) -> float:
        """Seconds ``client`` must wait before trying again (0: may try now)."""
        now = time.monotonic()
        failures = self._failures.get(client)
        if failures is None:
            return 0.0
        while failures and failures[0] <= now - self.window_s:
            failures.popleft()
        if len(failures) < self.max_failures:
            return 0.0
        return max(0.0, failures[0] + self.window_s - now)

    def check(self, secret: str) -> bool:
        """Whether ``secret`` is the password or token (costs one scrypt per hash).

        Matches are remembered by their SHA-256, so a script sending the token with
        every request pays the scrypt cost once.
        """
        if not secret:
            return False
        fingerprint = hashlib.sha256(secret.encode("utf-8")).hexdigest()
        if fingerprint in self._good_tokens:
            return True
        for hashed in self.hashes:
            if check_secret(secret, hashed):
                if len(self._good_tokens) < 16:
                    self._good_tokens.add(fingerprint)
                return True
        return False

    def login(self, client: str, secret: str) -> Session | None:
        """Return a new session when ``secret`` is right, else count a failure.

        The caller checks :meth:`retry_after` first; a wrong secret returns None.
        """
        if not self.check(secret):
            self._failures.setdefault(client, deque()).append(time.monotonic())
            if len(self._failures) > 1024:  # bounded: forget the oldest client
                self._failures.pop(next(iter(self._failures)))
            return None
        self._failures.pop(client, None)
        session = Session(
            id=secrets.token_urlsafe(32),
            csrf=secrets.token_urlsafe(32),
            expires=time.monotonic() + self.session_s,
        )
        self.sessions[session.id] = session
        while len(self.sessions) > SESSION_LIMIT:
            self.sessions.pop(next(iter(self.sessions)))
        return session

    def session(self, session_id: str | None) -> Session | None:
        """Return the live session ``session_id``; expired ones are forgotten."""
        if not session_id:
            return None
        session = self.sessions.get(session_id)
        if session is None:
            return None
        if time.monotonic() >= session.expires:
            del self.sessions[session_id]
            return None
        return session

    def logout(self, session_id: str | None) -> None:
        """End session ``session_id`` (unknown ids are ignored)."""
        if session_id:
            self.sessions.pop(session_id, None)


def csrf_matches(expected: str, given: str | None) -> bool:
    """Whether the CSRF token ``given`` equals ``expected`` (constant time)."""
    return bool(given) and hmac.compare_digest(expected, given or "")
