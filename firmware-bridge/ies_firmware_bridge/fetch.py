"""HTTP(S) transfers to and from the upstream: resumable downloads, uploads.

:func:`download` appends to a ``.part`` file and asks for the rest with ``Range:
bytes=<size of .part>-`` (with ``If-Range`` when the server gave an ETag or
Last-Modified before), so a dropped connection or a restarted bridge continues where
it stopped. A server that answers ``200`` to a range request sends the whole file
again; the ``.part`` is started over. Each attempt has a connect and a read timeout;
attempts that make no progress are retried with capped, jittered back-off, at most
``retries`` times in a row. The file may not grow beyond ``max_bytes``.

Errors::

    FetchError           base; the message says what the server did
    ├── TooLarge         the file is (or announces to be) beyond the size limit
    └── FetchFailed      retries exhausted, or an answer that retrying cannot fix
                         (404, 403, ...)
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from ies_firmware_bridge.store import redact

log = logging.getLogger(__name__)
_CHUNK = 64 * 1024
MAX_MANIFEST_BYTES = 64 * 1024


class FetchError(Exception):
    """Base of the transfer errors."""


class TooLarge(FetchError):
    """Raised when a file is larger than allowed."""


class FetchFailed(FetchError):
    """Raised when a transfer cannot be completed."""


@dataclass(frozen=True)
class FetchPolicy:
    """Timeouts (s), retry count and back-off (s), size limit (bytes), TLS trust."""

    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    retries: int = 5
    backoff_first_s: float = 0.5
    backoff_max_s: float = 30.0
    max_bytes: int = 256 * 1024 * 1024
    ssl_context: ssl.SSLContext | None = None

    def timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=None,
            sock_connect=self.connect_timeout_s,
            sock_read=self.read_timeout_s,
        )

    def backoff(self, attempt: int) -> float:
        """Seconds before retry number ``attempt`` (1-based): doubling, capped, with
        up to a quarter of jitter."""
        base = min(self.backoff_max_s, self.backoff_first_s * 2 ** (attempt - 1))
        return float(base * (0.75 + random.random() / 4))


@dataclass(frozen=True)
class Downloaded:
    """A finished download: total bytes, the offset it resumed from, attempts."""

    size: int
    resumed_from: int
    attempts: int
    validator: str


async def download(
    session: aiohttp.ClientSession,
    url: str,
    part: Path,
    policy: FetchPolicy,
    *,
    expected_size: int | None = None,
    validator: str = "",
    on_validator: Callable[[str], None] | None = None,
) -> Downloaded:
    """Download ``url`` into ``part``, resuming from its current size.

    ``expected_size`` (bytes, from a manifest) bounds the file more tightly than
    ``policy.max_bytes``. ``validator`` is the ETag / Last-Modified seen before;
    ``on_validator`` is told a new one so it can be persisted for a later resume.
    Raises :class:`TooLarge` and :class:`FetchFailed`.
    """
    limit = policy.max_bytes if expected_size is None else expected_size
    if expected_size is not None and expected_size > policy.max_bytes:
        raise TooLarge(
            f"the file is {expected_size} bytes, more than the {policy.max_bytes} "
            "allowed (max_file_mb)"
        )
    _prepare(part)
    first_offset = _size(part)
    failures = 0
    attempts = 0
    while True:
        attempts += 1
        offset = _size(part)
        if expected_size is not None and offset == expected_size and offset > 0:
            return Downloaded(offset, first_offset, attempts, validator)
        if offset > limit:
            _truncate(part)
            offset = 0
        try:
            done, validator = await _attempt(
                session, url, part, offset, limit, validator, policy
            )
        except (TimeoutError, aiohttp.ClientError, _Retryable) as exc:
            grown = _size(part) > offset
            failures = 0 if grown else failures + 1
            if failures >= policy.retries:
                raise FetchFailed(
                    f"{redact(url)}: gave up after {failures} attempts without "
                    f"progress: {_why(exc)}"
                ) from None
            delay = policy.backoff(max(failures, 1))
            log.info(
                "download of %s interrupted at %d bytes (%s); again in %.1f s",
                redact(url),
                _size(part),
                _why(exc),
                delay,
            )
            await asyncio.sleep(delay)
            continue
        finally:
            if on_validator is not None and validator:
                on_validator(validator)
        if done:
            return Downloaded(_size(part), first_offset, attempts, validator)


class _Retryable(Exception):
    """An answer worth asking again for (5xx, a short body)."""


async def _attempt(
    session: aiohttp.ClientSession,
    url: str,
    part: Path,
    offset: int,
    limit: int,
    validator: str,
    policy: FetchPolicy,
) -> tuple[bool, str]:
    """One GET; append what arrives. Returns (complete, validator)."""
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator:
            headers["If-Range"] = validator
    async with session.get(
        url, headers=headers, timeout=policy.timeout(), ssl=policy.ssl_context or True
    ) as response:
        new_validator = (
            response.headers.get("ETag") or response.headers.get("Last-Modified") or ""
        )
        if response.status == 416 and offset:
            # Our .part is not a prefix the server recognises: start over.
            _truncate(part)
            raise _Retryable("server refused the range; starting over")
        if response.status >= 500 or response.status == 429:
            raise _Retryable(f"HTTP {response.status}")
        if response.status not in (200, 206):
            raise FetchFailed(
                f"{redact(url)}: HTTP {response.status} {response.reason}"
            )
        if response.status == 200 and offset:
            _truncate(part)
            offset = 0
        if response.status == 206:
            start = _range_start(response.headers.get("Content-Range", ""))
            if start != offset:
                _truncate(part)
                raise _Retryable(f"server sent bytes from {start}, asked from {offset}")
        length = response.content_length
        total = offset + length if length is not None else None
        if total is not None and total > limit:
            raise TooLarge(
                f"{redact(url)} is {total} bytes, more than the {limit} allowed"
            )
        received = offset
        with part.open("ab") as handle:
            async for chunk in response.content.iter_chunked(_CHUNK):
                received += len(chunk)
                if received > limit:
                    raise TooLarge(
                        f"{redact(url)} sent more than the {limit} bytes allowed"
                    )
                handle.write(chunk)
                handle.flush()
        if total is not None and received < total:
            raise _Retryable(f"connection closed at {received} of {total} bytes")
        return True, new_validator


async def fetch_small(
    session: aiohttp.ClientSession, url: str, policy: FetchPolicy
) -> bytes | None:
    """GET a small document (a manifest, at most 64 KiB); ``None`` on HTTP 404.

    Retries like :func:`download`. Raises :class:`FetchFailed` and :class:`TooLarge`.
    """
    failures = 0
    while True:
        try:
            async with session.get(
                url, timeout=policy.timeout(), ssl=policy.ssl_context or True
            ) as response:
                if response.status in (404, 410):
                    return None
                if response.status >= 500 or response.status == 429:
                    raise _Retryable(f"HTTP {response.status}")
                if response.status != 200:
                    raise FetchFailed(f"{redact(url)}: HTTP {response.status}")
                data = await response.content.read(MAX_MANIFEST_BYTES + 1)
                if len(data) > MAX_MANIFEST_BYTES:
                    raise TooLarge(f"{redact(url)} is larger than a manifest can be")
                return data
        except (TimeoutError, aiohttp.ClientError, _Retryable) as exc:
            failures += 1
            if failures >= policy.retries:
                raise FetchFailed(f"{redact(url)}: {_why(exc)}") from None
            await asyncio.sleep(policy.backoff(failures))


async def upload(
    session: aiohttp.ClientSession,
    url: str,
    path: Path,
    policy: FetchPolicy,
    *,
    method: str,
    content_type: str,
) -> int:
    """Send the file at ``path`` to ``url`` with ``method`` (PUT or POST); return the
    HTTP status. Retries server errors and lost connections.

    Raises :class:`FetchFailed` when the server refuses it or retries run out.
    """
    failures = 0
    while True:
        try:
            with path.open("rb") as body:
                async with session.request(
                    method,
                    url,
                    data=body,
                    headers={
                        "Content-Type": content_type or "application/octet-stream"
                    },
                    timeout=policy.timeout(),
                    ssl=policy.ssl_context or True,
                ) as response:
                    if response.status >= 500 or response.status == 429:
                        raise _Retryable(f"HTTP {response.status}")
                    if response.status >= 300:
                        raise FetchFailed(
                            f"{redact(url)} refused the upload: HTTP {response.status}"
                        )
                    return response.status
        except (TimeoutError, aiohttp.ClientError, _Retryable, OSError) as exc:
            failures += 1
            if failures >= policy.retries:
                raise FetchFailed(f"{redact(url)}: {_why(exc)}") from None
            await asyncio.sleep(policy.backoff(failures))


def _prepare(part: Path) -> None:
    part.parent.mkdir(parents=True, exist_ok=True)
    part.touch(exist_ok=True)


def _size(part: Path) -> int:
    """Bytes already downloaded (the resume offset)."""
    return part.stat().st_size


def _truncate(part: Path) -> None:
    """Start a download over: the server will not continue this ``.part``."""
    part.write_bytes(b"")


def _range_start(content_range: str) -> int:
    """The first byte of ``Content-Range: bytes 100-199/200``; -1 if unreadable."""
    try:
        unit, _, spec = content_range.partition(" ")
        return int(spec.split("-", 1)[0]) if unit == "bytes" else -1
    except ValueError:
        return -1


def _why(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:200]
