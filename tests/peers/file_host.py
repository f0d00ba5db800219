"""A publisher's file host for the firmware bridge tests: a real aiohttp HTTP(S) server.

Each hosted file can be served slowly (``chunk`` bytes every ``delay_s``) and can drop
the connection after ``drop_at`` bytes of a response (``drops`` times), the way a
flaky uplink does. ``Range: bytes=N-`` is honoured (206 with Content-Range) and
an ``ETag`` is sent, so a resumed download can be checked in :attr:`FileHost.log`,
which records every request (method, path, Range header, status). ``PUT`` and ``POST``
under ``/upload/`` store the body in :attr:`FileHost.uploads` (a CSMS's diagnostics
target).
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Hosted:
    """One file and how it is served."""

    data: bytes
    chunk: int = 64 * 1024
    delay_s: float = 0.0
    drop_at: int | None = None
    drops: int = 0
    status: int = 200


@dataclass(frozen=True)
class Logged:
    """One request the host saw."""

    method: str
    path: str
    range: str
    status: int


@dataclass
class FileHost:
    """The host; :meth:`start` on a free loopback port, :meth:`stop` after."""

    files: dict[str, Hosted] = field(default_factory=dict)
    log: list[Logged] = field(default_factory=list)
    uploads: dict[str, bytes] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)
    port: int = 0
    scheme: str = "http"
    _runner: web.AppRunner | None = None

    def add(self, name: str, data: bytes, **how: object) -> str:
        """Host ``data`` as ``name``; return its URL."""
        self.files[name] = Hosted(data, **how)  # type: ignore[arg-type]
        return self.url(name)

    def url(self, name: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/files/{name}"

    def ranges(self, name: str) -> list[str]:
        """The Range headers of the GETs for ``name``, in order ('' for none)."""
        return [
            entry.range
            for entry in self.log
            if entry.method == "GET" and entry.path == f"/files/{name}"
        ]

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/files/{name}", self._get)
        app.router.add_route("*", "/upload/{name:.*}", self._upload)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        self.scheme = "https" if ssl_context is not None else "http"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _get(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        wanted = request.headers.get("Range", "")
        hosted = self.files.get(name)
        if hosted is None or hosted.status != 200:
            status = 404 if hosted is None else hosted.status
            self.log.append(Logged("GET", request.path, wanted, status))
            return web.Response(status=status, text="not here\n")
        data = hosted.data
        etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
        start = 0
        if wanted.startswith("bytes=") and wanted.endswith("-"):
            if_range = request.headers.get("If-Range")
            if if_range is None or if_range == etag:
                start = int(wanted[6:-1])
        if start > len(data):
            self.log.append(Logged("GET", request.path, wanted, 416))
            return web.Response(status=416)
        status = 206 if start else 200
        self.log.append(Logged("GET", request.path, wanted, status))
        response = web.StreamResponse(status=status)
        response.headers["ETag"] = etag
        response.headers["Accept-Ranges"] = "bytes"
        response.content_length = len(data) - start
        if start:
            response.headers["Content-Range"] = (
                f"bytes {start}-{len(data) - 1}/{len(data)}"
            )
        await response.prepare(request)
        offset = start
        while offset < len(data):
            end = min(offset + hosted.chunk, len(data))
            drop = start + hosted.drop_at if hosted.drop_at is not None else None
            if drop is not None and hosted.drops > 0 and offset < drop <= end:
                end = drop
            await response.write(data[offset:end])
            self.sent[name] = self.sent.get(name, 0) + (end - offset)
            offset = end
            if hosted.drops > 0 and offset == drop:
                hosted.drops -= 1
                # A dropped uplink: the body stops short of its Content-Length.
                assert request.transport is not None
                request.transport.close()
                return response
            if hosted.delay_s:
                await asyncio.sleep(hosted.delay_s)
        await response.write_eof()
        return response

    async def _upload(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.log.append(Logged(request.method, request.path, "", 201))
        self.uploads[request.match_info["name"]] = body
        return web.Response(status=201, text="thanks\n")
