"""The bridge service: control socket for the agent, HTTP for chargers, the transfers.

Three faces, one event loop:

- **Control socket** (unix stream, JSON lines, one object per line, at most 256 KiB):
  the agent registers firmware and upload transfers, reports charger statuses, lists
  the cache, and takes evidence events. Requests carry an ``id`` echoed in the answer::

      → {"id": 1, "op": "hello", "client": "ies-agent"}
      ← {"id": 1, "ok": true, "base_url": "http://192.168.1.2:8790", ...}
      ← {"event": {"seq": 7, "ev": "firmware_verified", "fields": {...}}}
      → {"op": "ack", "seq": 7}
      → {"id": 2, "op": "firmware", "charger": "CP-1", "ocpp": "1.6",
         "action": "UpdateFirmware", "location": "https://fw.example/cp.bin",
         "request_id": null, "signing_certificate": null, "signature": null}
      ← {"id": 2, "ok": true, "transfer": "9f0c…", "url": "http://…/fw/<token>/cp.bin"}
      → {"id": 3, "op": "upload", "charger": "CP-1", "ocpp": "1.6",
         "action": "GetDiagnostics", "location": "https://csms.example/diag/"}
      → {"id": 4, "op": "report", "charger": "CP-1", "kind": "firmware",
         "status": "Installed"}
      → {"id": 5, "op": "list"}
      ← {"id": 2, "ok": false, "error": "...", "status": "InvalidCertificate"}

  Events stay in the outbox until acknowledged and are sent again on every
  connection (at least once; each carries its ``seq``).
- **HTTP for chargers** (``listen``:``port``, HTTPS with ``tls_cert``): ``GET
  /fw/<token>/<name>`` serves a verified file (ranges allowed); while the file is
  still being fetched the request waits up to ``hold_s`` and then gets ``503`` with
  ``Retry-After``; a file that failed verification gets ``404`` — its bytes are never
  sent. ``PUT`` or ``POST /up/<token>[/<name>]`` takes a charger's diagnostics or log
  file, which is then forwarded to the location the CSMS named. Tokens are 192-bit
  random, one per transfer.
- **Work**: one task per live transfer; transfers not finished when the bridge
  stopped (or was killed) are resumed at start, downloads from their ``.part`` offset.

Evidence events (the bridge holds no keys; the agent appends them): ``firmware_
requested``, ``firmware_downloaded``, ``firmware_verified``, ``firmware_rejected``
(with ``reason`` and the OCPP ``status``), ``firmware_download_failed``,
``firmware_served``, ``diagnostics_requested``, ``diagnostics_received``,
``diagnostics_forwarded``, ``diagnostics_upload_failed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import ssl
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
from aiohttp import web

from ies_agent.signing.manifest import ManifestError, verify_manifest
from ies_firmware_bridge.config import BridgeConfig
from ies_firmware_bridge.fetch import (
    FetchError,
    FetchPolicy,
    download,
    fetch_small,
    upload,
)
from ies_firmware_bridge.store import (
    FileCache,
    Outbox,
    QuotaError,
    StoreError,
    Transfer,
    TransferBook,
    redact,
)
from ies_firmware_bridge.trust import (
    BadSignature,
    PublisherTrust,
    TrustError,
    check_certificate,
    check_digest,
    check_file_signature,
    file_sha256,
    manifest_url,
)

log = logging.getLogger(__name__)

LINE_LIMIT = 256 * 1024
FIRMWARE_ACTIONS = ("UpdateFirmware", "SignedUpdateFirmware")
UPLOAD_ACTIONS = ("GetDiagnostics", "GetLog")
KEEP_SERVED_S = 7 * 86_400
"""A verified file stays out of eviction this long after it was asked for, unless
its charger reported it installed."""
_NAME = re.compile(r"[^A-Za-z0-9._+~-]")
_DONE_STATUSES = frozenset(
    {"Installed", "InstallationFailed", "InstallVerificationFailed"}
)


class RequestError(Exception):
    """A control request the bridge refuses; ``status`` is the OCPP word, if any."""

    def __init__(self, message: str, status: str = "Rejected") -> None:
        super().__init__(message)
        self.status = status


class Bridge:
    """The firmware and file bridge; :meth:`start`, then :meth:`serve` until stopped."""

    def __init__(self, config: BridgeConfig) -> None:
        self.config = config
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.cache = FileCache(config.cache_dir, config.quota_bytes)
        self.book = TransferBook(config.state_dir / "transfers")
        self.outbox = Outbox(config.state_dir)
        self.trust = PublisherTrust.load(config.trust_dirs)
        for problem in self.trust.problems:
            log.warning("trust file left out: %s", problem)
        self.policy = FetchPolicy(
            connect_timeout_s=config.connect_timeout_s,
            read_timeout_s=config.read_timeout_s,
            retries=config.retries,
            backoff_first_s=config.backoff_first_s,
            backoff_max_s=config.backoff_max_s,
            max_bytes=config.max_file_bytes,
            ssl_context=_upstream_ssl(config),
        )
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._control: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._work: dict[str, asyncio.Task[None]] = {}
        self._verdicts: dict[str, asyncio.Event] = {}
        self._connections: set[asyncio.Task[None]] = set()
        self.http_port = config.port

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Open the HTTP server and the control socket; resume unfinished transfers.

        Raises ``OSError`` when the port or the socket path cannot be used.
        """
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=self.config.max_file_bytes)
        app.router.add_get("/fw/{token}/{name}", self._get_file)
        app.router.add_route("*", "/up/{token}", self._take_upload)
        app.router.add_route("*", "/up/{token}/{name}", self._take_upload)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            self.config.listen,
            self.config.port,
            ssl_context=_serving_ssl(self.config),
        )
        await site.start()
        addresses = self._runner.addresses
        if addresses:
            self.http_port = int(addresses[0][1])
        socket_path = self.config.socket
        socket_path.parent.mkdir(parents=True, exist_ok=True)
        socket_path.unlink(missing_ok=True)
        self._control = await asyncio.start_unix_server(
            self._serve_client, path=str(socket_path), limit=LINE_LIMIT
        )
        # The agent runs as another user: it must be able to connect.
        os.chmod(socket_path, 0o666)
        for transfer in self.book.live():
            self._resume(transfer)
        log.info(
            "firmware bridge: chargers fetch from %s, agent socket %s, trust: %s",
            self.base_url,
            socket_path,
            self.trust.describe(),
        )

    @property
    def base_url(self) -> str:
        if self.config.public_url:
            return self.config.public_url.rstrip("/")
        scheme = "https" if self.config.tls_cert is not None else "http"
        host = self.config.listen
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{self.http_port}"

    async def serve(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then close everything."""
        try:
            await stop.wait()
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop work (downloads keep their ``.part``), close servers and files."""
        for task in list(self._work.values()):
            task.cancel()
        for task in list(self._work.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._control is not None:
            self._control.close()
            for writer in list(self._writers):
                writer.close()
            for task in list(self._connections):
                task.cancel()
            self._control = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        self.config.socket.unlink(missing_ok=True)
        self.outbox.close()

    # --- events -----------------------------------------------------------------------

    def event(self, ev: str, fields: dict[str, Any]) -> None:
        """Queue an evidence event and push it to connected agents."""
        event = self.outbox.add(ev, fields)
        line = _line({"event": event})
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                writer.write(line)

    # --- control socket ---------------------------------------------------------------

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        peer = _peer_uid(writer)
        if peer not in _allowed_uids():
            # The socket is open to every local user (the agent runs as another
            # user than this DynamicUser service); only the agent may talk to it.
            log.warning("refused a control connection from uid %s", peer)
            # Take the caller's first line (briefly), then answer and close, so the
            # refusal reaches it rather than a broken pipe.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader.readline(), 1.0)
            writer.write(_line({"ok": False, "error": "not allowed"}))
            with contextlib.suppress(Exception):
                await writer.drain()
            writer.close()
            if task is not None:
                self._connections.discard(task)
            return
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:
                    writer.write(_line({"ok": False, "error": "line too long"}))
                    break
                if not line:
                    break
                answer = self._answer(line, writer)
                if answer is not None:
                    writer.write(_line(answer))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()
            if task is not None:
                self._connections.discard(task)

    def _answer(
        self, line: bytes, writer: asyncio.StreamWriter
    ) -> dict[str, Any] | None:
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("expected a JSON object")
        except ValueError as exc:
            return {"ok": False, "error": f"not a JSON request: {exc}"}
        op = request.get("op")
        rid = request.get("id")
        try:
            if op == "ack":
                seq = request.get("seq")
                if isinstance(seq, int):
                    self.outbox.ack(seq)
                return None
            if op == "hello":
                self._writers.add(writer)
                answer = {"base_url": self.base_url, "version": _version()}
                for event in self.outbox.pending():
                    writer.write(_line({"event": event}))
            elif op == "firmware":
                answer = self.register_firmware(request)
            elif op == "upload":
                answer = self.register_upload(request)
            elif op == "report":
                answer = self.report(request)
            elif op == "list":
                answer = self.listing()
            else:
                raise RequestError(f"unknown op {op!r}")
        except RequestError as exc:
            return {"id": rid, "ok": False, "error": str(exc), "status": exc.status}
        except (StoreError, OSError) as exc:
            log.error("control request %s failed: %s", op, exc)
            return {"id": rid, "ok": False, "error": str(exc), "status": "Rejected"}
        return {"id": rid, "ok": True, **answer}

    # --- registering transfers --------------------------------------------------------

    def register_firmware(self, request: dict[str, Any]) -> dict[str, Any]:
        """Start fetching the firmware a CSMS named; return the charger's URL.

        Raises :class:`RequestError` for a request that cannot be carried out
        (not HTTP(S), a signing certificate no trusted publisher issued).
        """
        _basics(request, FIRMWARE_ACTIONS)
        location = str(request["location"])
        certificate = _opt_str(request, "signing_certificate")
        signature = _opt_str(request, "signature")
        if (certificate is None) != (signature is None):
            raise RequestError("signingCertificate and signature go together")
        transfer = self._new(request, "firmware", "downloading")
        transfer.name = _file_name(location)
        transfer.signing_certificate = certificate
        transfer.signature = signature
        fields = self._fields(transfer)
        self.event("firmware_requested", {**fields, "location": redact(location)})
        self.book.add(transfer)
        if certificate is not None:
            try:
                check_certificate(certificate, self.trust)
            except TrustError as exc:
                self._reject(transfer, exc)
                raise RequestError(str(exc), exc.status) from None
        self._resume(transfer)
        return {"transfer": transfer.id, "url": self._url(transfer)}

    def register_upload(self, request: dict[str, Any]) -> dict[str, Any]:
        """Offer the charger an upload target for a diagnostics or log file."""
        _basics(request, UPLOAD_ACTIONS)
        transfer = self._new(request, "upload", "waiting")
        self.book.add(transfer)
        self.event(
            "diagnostics_requested",
            {**self._fields(transfer), "location": redact(transfer.location)},
        )
        return {"transfer": transfer.id, "url": self._url(transfer)}

    def report(self, request: dict[str, Any]) -> dict[str, Any]:
        """Note a status a charger reported about its latest transfer."""
        charger = request.get("charger")
        status = request.get("status")
        kind = request.get("kind", "firmware")
        if not isinstance(charger, str) or not isinstance(status, str):
            raise RequestError("report needs charger and status")
        for transfer in self.book.recent(len(self.book.by_id)):
            if transfer.charger == charger and transfer.kind == kind:
                transfer.charger_status = status
                transfer.history = [*transfer.history[-19:], status]
                self.book.save(transfer)
                return {"transfer": transfer.id}
        return {"transfer": None}

    def listing(self) -> dict[str, Any]:
        """The cache and recent transfers, for ``ies-agent firmware list``."""
        return {
            "quota_bytes": self.cache.quota_bytes,
            "used_bytes": self.cache.used_bytes(),
            "cache": [vars(c) for c in self.cache.files()],
            "transfers": [t.summary() for t in self.book.recent(50)],
        }

    def _new(self, request: dict[str, Any], kind: str, state: str) -> Transfer:
        request_id = request.get("request_id")
        return Transfer(
            id=secrets.token_hex(8),
            token=secrets.token_urlsafe(24),
            kind=kind,
            charger=str(request["charger"]),
            ocpp=str(request["ocpp"]),
            action=str(request["action"]),
            location=str(request["location"]),
            state=state,
            created_ms=_now_ms(),
            request_id=request_id if isinstance(request_id, int) else None,
        )

    def _url(self, transfer: Transfer) -> str:
        if transfer.kind == "firmware":
            return f"{self.base_url}/fw/{transfer.token}/{transfer.name}"
        return f"{self.base_url}/up/{transfer.token}/"

    def _fields(self, transfer: Transfer) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "transfer": transfer.id,
            "charger": transfer.charger,
            "ocpp": transfer.ocpp,
            "action": transfer.action,
        }
        if transfer.request_id is not None:
            fields["request_id"] = transfer.request_id
        return fields

    def _resume(self, transfer: Transfer) -> None:
        if transfer.id in self._work:
            return
        if transfer.kind == "firmware" and transfer.state == "downloading":
            work = self._fetch_firmware(transfer)
        elif transfer.kind == "upload" and transfer.state == "received":
            work = self._forward_upload(transfer)
        else:
            return
        self._verdicts.setdefault(transfer.id, asyncio.Event())
        task = asyncio.create_task(work, name=f"bridge:{transfer.kind}:{transfer.id}")
        self._work[transfer.id] = task
        task.add_done_callback(lambda _t: self._work.pop(transfer.id, None))

    # --- firmware ---------------------------------------------------------------------

    async def _fetch_firmware(self, transfer: Transfer) -> None:
        """Find out what the file must be, fetch it, verify it, cache it."""
        assert self._session is not None
        part = self.cache.part_path(transfer.id)
        try:
            # What must the file be? A certificate, a pin, or a signed manifest.
            cert = None
            if transfer.signing_certificate is not None:
                cert = check_certificate(transfer.signing_certificate, self.trust)
                transfer.trust = f"certificate:{cert.subject.rfc4514_string()}"
            elif transfer.expected_sha256 is None:
                await self._expectation(transfer)
            self.book.save(transfer)

            # A file with that hash already verified: no download at all.
            cached = (
                self.cache.get(transfer.expected_sha256)
                if transfer.expected_sha256
                else None
            )
            if cached is None:
                resumed = part.stat().st_size if part.exists() else 0
                room = (transfer.expected_size or 0) - resumed
                self.cache.make_room(max(room, 0), keep=self._kept())
                result = await download(
                    self._session,
                    transfer.location,
                    part,
                    self.policy,
                    expected_size=transfer.expected_size,
                    validator=transfer.validator,
                    on_validator=lambda v: self._note_validator(transfer, v),
                )
                self.event(
                    "firmware_downloaded",
                    {
                        **self._fields(transfer),
                        "bytes": result.size,
                        "resumed_from": result.resumed_from,
                        "attempts": result.attempts,
                    },
                )
                if cert is not None:
                    assert transfer.signature is not None
                    sha = await asyncio.to_thread(
                        check_file_signature, part, cert, transfer.signature
                    )
                else:
                    assert transfer.expected_sha256 is not None
                    await asyncio.to_thread(
                        check_digest,
                        part,
                        transfer.expected_sha256,
                        transfer.expected_size,
                    )
                    sha = transfer.expected_sha256
                self.cache.make_room(0, keep=self._kept())
                cached = self.cache.commit(
                    part,
                    sha,
                    name=transfer.name,
                    source=redact(transfer.location),
                    verified_by=transfer.trust,
                )
            transfer.sha256 = cached.sha256
            transfer.size = cached.size
            transfer.state = "ready"
            transfer.status = "Downloaded"
            self.book.save(transfer)
            self.event(
                "firmware_verified",
                {
                    **self._fields(transfer),
                    "sha256": cached.sha256,
                    "bytes": cached.size,
                    "by": transfer.trust,
                },
            )
        except TrustError as exc:
            part.unlink(missing_ok=True)
            self._reject(transfer, exc)
        except (FetchError, QuotaError, StoreError, OSError) as exc:
            part.unlink(missing_ok=True)
            transfer.state = "failed"
            transfer.status = "DownloadFailed"
            transfer.reason = str(exc)[:500]
            self.book.save(transfer)
            log.warning("firmware for %s not fetched: %s", transfer.charger, exc)
            self.event(
                "firmware_download_failed",
                {
                    **self._fields(transfer),
                    "status": "DownloadFailed",
                    "reason": transfer.reason,
                },
            )
        finally:
            self._verdicts.setdefault(transfer.id, asyncio.Event()).set()

    async def _expectation(self, transfer: Transfer) -> None:
        """Learn the SHA-256 (and size) the file must have: a pin, else a manifest.

        Raises :class:`BadSignature` when neither exists or the manifest is not
        trusted, :class:`FetchError` when the manifest cannot be fetched.
        """
        assert self._session is not None
        pins = self.config.pins
        pin = pins.get(transfer.location) or pins.get(transfer.name)
        if pin is not None:
            transfer.expected_sha256 = pin
            transfer.trust = "pin"
            return
        where = manifest_url(transfer.location)
        data = await fetch_small(self._session, where, self.policy)
        if data is None:
            raise BadSignature(
                f"no signed manifest at {redact(where)} and no pin for this file: "
                "nothing says what the file should be, so it is not trusted"
            )
        if self.trust.keys is None:
            raise BadSignature("no trusted publisher keys are installed")
        try:
            manifest = verify_manifest(data, self.trust.keys, source=redact(where))
        except ManifestError as exc:
            raise BadSignature(str(exc)) from None
        if manifest.file != transfer.name:
            raise BadSignature(
                f"the manifest is for {manifest.file!r}, not {transfer.name!r}"
            )
        transfer.expected_sha256 = manifest.sha256
        transfer.expected_size = manifest.size
        transfer.trust = f"manifest:{manifest.signed_by[:16]}:{manifest.version}"

    def _reject(self, transfer: Transfer, exc: TrustError) -> None:
        transfer.state = "rejected"
        transfer.status = exc.status
        transfer.reason = str(exc)[:500]
        with contextlib.suppress(StoreError, OSError):
            self.book.save(transfer)
        log.warning("firmware for %s refused: %s", transfer.charger, exc)
        self.event(
            "firmware_rejected",
            {**self._fields(transfer), "status": exc.status, "reason": transfer.reason},
        )
        self._verdicts.setdefault(transfer.id, asyncio.Event()).set()

    def _note_validator(self, transfer: Transfer, validator: str) -> None:
        if validator != transfer.validator:
            transfer.validator = validator
            self.book.save(transfer)

    def _kept(self) -> set[str]:
        """Hashes eviction must spare: files chargers may still fetch."""
        horizon = _now_ms() - KEEP_SERVED_S * 1000
        return {
            t.sha256 or t.expected_sha256 or ""
            for t in self.book.by_id.values()
            if t.kind == "firmware"
            and t.created_ms > horizon
            and t.charger_status not in _DONE_STATUSES
        }

    async def _get_file(self, request: web.Request) -> web.StreamResponse:
        transfer = self.book.by_token.get(request.match_info["token"])
        if transfer is None or transfer.kind != "firmware":
            raise web.HTTPNotFound(text="no such file\n")
        if transfer.state == "downloading":
            verdict = self._verdicts.setdefault(transfer.id, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(verdict.wait(), self.config.hold_s)
        if transfer.state == "downloading":
            raise web.HTTPServiceUnavailable(
                text="still being fetched and verified; try again\n",
                headers={"Retry-After": "30"},
            )
        if transfer.state != "ready" or transfer.sha256 is None:
            # Never a byte of a file that did not verify.
            raise web.HTTPNotFound(text=f"not available: {transfer.status}\n")
        path = self.cache.path_of(transfer.sha256)
        if not path.is_file():
            raise web.HTTPGone(text="evicted from the cache; ask again\n")
        size = path.stat().st_size
        first, last = _byte_range(request.headers.get("Range", ""), size)
        response = web.StreamResponse(status=206 if first or last < size - 1 else 200)
        response.headers["Content-Type"] = "application/octet-stream"
        response.headers["Content-Disposition"] = (
            f'attachment; filename="{transfer.name}"'
        )
        response.headers["Accept-Ranges"] = "bytes"
        response.headers["ETag"] = f'"{transfer.sha256}"'
        if response.status == 206:
            response.headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        response.content_length = last - first + 1 if size else 0
        await response.prepare(request)
        sent = await _send_file(response, path, first, last)
        await response.write_eof()
        transfer.served += 1
        self.book.save(transfer)
        self.cache.touch(transfer.sha256)
        self.event(
            "firmware_served",
            {
                **self._fields(transfer),
                "sha256": transfer.sha256,
                "bytes": sent,
                "range": request.headers.get("Range", ""),
                "peer": request.remote or "",
            },
        )
        return response

    # --- diagnostics and logs ---------------------------------------------------------

    async def _take_upload(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("PUT", "POST"):
            raise web.HTTPMethodNotAllowed(request.method, ["PUT", "POST"])
        transfer = self.book.by_token.get(request.match_info["token"])
        if transfer is None or transfer.kind != "upload":
            raise web.HTTPNotFound(text="no such upload target\n")
        if transfer.state != "waiting":
            raise web.HTTPConflict(text=f"already {transfer.state}\n")
        limit = self.config.max_file_bytes
        if request.content_length is not None and request.content_length > limit:
            raise web.HTTPRequestEntityTooLarge(limit, request.content_length)
        try:
            self.cache.make_room(request.content_length or 0, keep=self._kept())
        except QuotaError as exc:
            raise web.HTTPInsufficientStorage(text=f"{exc}\n") from None
        path = self.cache.upload_path(transfer.id)
        size = 0
        with path.open("wb") as handle:
            async for chunk in request.content.iter_chunked(64 * 1024):
                size += len(chunk)
                if size > limit:
                    handle.close()
                    path.unlink(missing_ok=True)
                    raise web.HTTPRequestEntityTooLarge(limit, size)
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        name = request.match_info.get("name", "")
        transfer.name = _NAME.sub("_", unquote(name))[:120] if name else ""
        transfer.size = size
        transfer.sha256 = await asyncio.to_thread(file_sha256, path)
        transfer.method = request.method
        transfer.content_type = request.headers.get("Content-Type", "")
        transfer.state = "received"
        self.book.save(transfer)
        self.event(
            "diagnostics_received",
            {**self._fields(transfer), "bytes": size, "sha256": transfer.sha256},
        )
        self._resume(transfer)
        return web.Response(status=201, text="stored\n")

    async def _forward_upload(self, transfer: Transfer) -> None:
        assert self._session is not None
        path = self.cache.upload_path(transfer.id)
        target = transfer.location
        if target.endswith("/") and transfer.name:
            target += transfer.name
        try:
            status = await upload(
                self._session,
                target,
                path,
                self.policy,
                method=transfer.method or "PUT",
                content_type=transfer.content_type,
            )
        except FetchError as exc:
            transfer.state = "failed"
            transfer.status = (
                "UploadFailed" if transfer.ocpp == "1.6" else "UploadFailure"
            )
            transfer.reason = str(exc)[:500]
            self.book.save(transfer)
            self.event(
                "diagnostics_upload_failed",
                {
                    **self._fields(transfer),
                    "status": transfer.status,
                    "reason": transfer.reason,
                },
            )
            return
        finally:
            self._verdicts.setdefault(transfer.id, asyncio.Event()).set()
        path.unlink(missing_ok=True)
        transfer.state = "forwarded"
        transfer.status = "Uploaded"
        self.book.save(transfer)
        self.event(
            "diagnostics_forwarded",
            {
                **self._fields(transfer),
                "bytes": transfer.size or 0,
                "sha256": transfer.sha256 or "",
                "http_status": status,
                "location": redact(transfer.location),
            },
        )


def _byte_range(header: str, size: int) -> tuple[int, int]:
    """First and last byte (inclusive) a ``Range: bytes=a-b`` header asks for;
    the whole file for no header or one this server does not read."""
    whole = (0, max(size - 1, 0))
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if match is None or not (match.group(1) or match.group(2)):
        return whole
    if not match.group(1):
        count = int(match.group(2))
        return (max(size - count, 0), size - 1)
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) else size - 1
    if first >= size or last < first:
        raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"*/{size}"})
    return first, min(last, size - 1)


async def _send_file(
    response: web.StreamResponse, path: Path, first: int, last: int
) -> int:
    """Write bytes ``first``..``last`` of ``path``; return how many were sent."""
    sent = 0
    handle = await asyncio.to_thread(path.open, "rb")
    try:
        handle.seek(first)
        left = last - first + 1
        while left > 0:
            chunk = await asyncio.to_thread(handle.read, min(left, 256 * 1024))
            if not chunk:
                break
            await response.write(chunk)
            sent += len(chunk)
            left -= len(chunk)
    finally:
        handle.close()
    return sent


def _basics(
    request: dict[str, Any], actions: tuple[str, ...]
) -> tuple[str, str, str, str]:
    values = []
    for key in ("charger", "ocpp", "action", "location"):
        value = request.get(key)
        if not isinstance(value, str) or not value:
            raise RequestError(f"{key} is missing")
        values.append(value)
    charger, ocpp, action, location = values
    if action not in actions:
        raise RequestError(f"action {action!r} is not one of {', '.join(actions)}")
    scheme = urlsplit(location).scheme.lower()
    if scheme not in ("http", "https"):
        raise RequestError(
            f"the firmware bridge moves files over HTTP(S) only, not {scheme or '?'}:"
            f" ask the CSMS for an https:// location",
            "Rejected",
        )
    return charger, ocpp, action, location


def _opt_str(request: dict[str, Any], key: str) -> str | None:
    value = request.get(key)
    return value if isinstance(value, str) and value else None


def _file_name(location: str) -> str:
    """The last path segment of ``location`` as a safe file name."""
    segment = unquote(urlsplit(location).path.rsplit("/", 1)[-1])
    name = _NAME.sub("_", segment)[:120].lstrip(".")
    return name or "firmware.bin"


def _line(message: dict[str, Any]) -> bytes:
    return json.dumps(message, sort_keys=True).encode() + b"\n"


def _serving_ssl(config: BridgeConfig) -> ssl.SSLContext | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls_cert, config.tls_key)
    return context


def _upstream_ssl(config: BridgeConfig) -> ssl.SSLContext | None:
    if config.upstream_ca_file is None:
        return None
    context = ssl.create_default_context(cafile=str(config.upstream_ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _version() -> str:
    from ies_agent import __version__

    return __version__


def _now_ms() -> int:
    return int(time.time() * 1000)


AGENT_USER = "ies-agent"
"""The system user the agent runs as (packaging/debian/postinst creates it)."""


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    """Return the user id of the process at the other end of a unix socket."""
    import socket
    import struct

    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    try:
        creds = sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
        )
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _allowed_uids() -> set[int]:
    """Root, this service's own user, and the agent's user when it exists."""
    import pwd

    allowed = {0, os.getuid()}
    with contextlib.suppress(KeyError):
        allowed.add(pwd.getpwnam(AGENT_USER).pw_uid)
    return allowed
