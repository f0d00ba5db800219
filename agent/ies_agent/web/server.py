"""The local web page and its JSON API, served by aiohttp.

Routes::

    GET  /               the page (one HTML document, inline CSS and JS)
    GET  /metrics        Prometheus text format
    GET  /api/session    whether this browser is logged in; the login CSRF token
    GET  /api/state      everything below at once
    GET  /api/devices | /api/buses | /api/evidence | /api/upstreams | /api/chargers
    GET  /api/dispatch | /api/history | /api/config (read-only, secrets masked)
    POST /api/login      {"secret": …} → a session cookie and its CSRF token
    POST /api/logout
    POST /api/verify     verify the evidence log now (in a worker thread)
    POST /api/scan       {"bus": id} or {"tcp": "host:port"}, "units": "1-10"
    POST /api/dispatch/optout  {"event": id, "reason": "…"}: the consumer opts out

Access: every POST needs a session (cookie plus the session's ``X-CSRF-Token``
header) or ``Authorization: Bearer <token>``; without one the answer is 401, with a
wrong CSRF token or a foreign ``Origin`` 403. A login needs the login CSRF token
handed out by ``/api/session`` (double submit). Failed logins are limited per client
address (429). When the page listens on anything but loopback, the GET API and
``/metrics`` need a login or the token as well.

Raises :class:`~ies_agent.web.errors.WebSetupError` when it cannot start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import web

from ies_agent.metrics import CONTENT_TYPE, render, site_registry
from ies_agent.web.auth import (
    Gatekeeper,
    SecretFileError,
    csrf_matches,
    read_secret_hash,
)
from ies_agent.web.errors import WebSetupError
from ies_agent.web.page import render_page

if TYPE_CHECKING:
    from ies_agent.config import Site
    from ies_agent.web.config import HttpConfig
    from ies_agent.web.facts import SiteFacts

log = logging.getLogger(__name__)

SESSION_COOKIE = "ies_session"
LOGIN_COOKIE = "ies_login_csrf"
MAX_BODY_BYTES = 64 * 1024
_SECRET_KEY = re.compile(
    r"pass|secret|token|psk|credential|private|api_?key|(^|_)key$", re.IGNORECASE
)
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/@:\s]*:)[^/@\s]*@", re.I)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class WebServer:
    """The aiohttp application of one site, listening as ``[http]`` says."""

    def __init__(self, config: HttpConfig, facts: SiteFacts, site: Site) -> None:
        self.config = config
        self.facts = facts
        self.site = site
        self.registry = site_registry(facts)
        self.gate = Gatekeeper(hashes=[], session_s=config.session_s)
        self._runner: web.AppRunner | None = None
        self._verify_lock = asyncio.Lock()
        self._scan_lock = asyncio.Lock()

    async def start(self) -> None:
        """Load the secret hashes and listen; raises :class:`WebSetupError`."""
        for path in (self.config.password_file, self.config.token_file):
            if path is None:
                continue
            try:
                self.gate.hashes.append(read_secret_hash(path))
            except SecretFileError as exc:
                raise WebSetupError(f"web page: {exc}") from None
        if not self.config.loopback and not self.gate.has_secret:
            raise WebSetupError(
                f"web page: {self.config.listen} is reachable from the network; "
                "set [http] password_file or token_file, or listen on 127.0.0.1"
            )
        app = self.application()
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.listen, self.config.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise WebSetupError(
                f"web page: cannot listen on {self.config.listen}:{self.config.port}: "
                f"{exc.strerror}; choose another [http] port"
            ) from None
        log.info(
            "web page listening",
            extra={"kv": {"url": self.config.url, "login": self.gate.has_secret}},
        )

    async def close(self) -> None:
        """Stop listening and end every session."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- the application ---------------------------------------------------------------

    def application(self) -> web.Application:
        """Return the aiohttp application (also used by tests without a socket)."""
        app = web.Application(
            middlewares=[self._headers, self._access], client_max_size=MAX_BODY_BYTES
        )
        get = {
            "/": self.page,
            "/metrics": self.metrics,
            "/api/session": self.session_info,
            "/api/state": self.api_state,
            "/api/devices": self._view(lambda: self.facts.device_facts()),
            "/api/buses": self._view(lambda: self.facts.bus_facts()),
            "/api/evidence": self._view(lambda: self.facts.evidence_facts()),
            "/api/upstreams": self._view(lambda: self.facts.upstream_facts()),
            "/api/chargers": self._view(lambda: self.facts.charger_facts()),
            "/api/dispatch": self._view(lambda: self.facts.dispatch_facts()),
            "/api/history": self._view(lambda: self.facts.history_facts()),
            "/api/config": self.api_config,
        }
        for path, handler in get.items():
            app.router.add_get(path, handler)
        app.router.add_post("/api/login", self.login)
        app.router.add_post("/api/logout", self.logout)
        app.router.add_post("/api/verify", self.verify)
        app.router.add_post("/api/scan", self.scan)
        app.router.add_post("/api/dispatch/optout", self.opt_out)
        return app

    def _view(self, build: Callable[[], Any]) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            return web.json_response(build())

        return handler

    # -- middlewares -------------------------------------------------------------------

    @web.middleware
    async def _headers(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        response = await handler(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    @web.middleware
    async def _access(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        """Let a request through only if the access rules allow it."""
        path = request.path
        if self.config.loopback and not _loopback_host(request.host):
            # DNS rebinding: a web page may point its own name at 127.0.0.1; the
            # open loopback page answers only to loopback names.
            return _error(421, "this page answers to localhost / 127.0.0.1 only")
        if request.method == "POST":
            if not self._same_origin(request):
                return _error(403, "cross-site request refused")
            if path == "/api/login":
                return await handler(request)
            who = self._who(request)
            if who is None:
                return _error(401, "log in first (or send the token)")
            if who != "bearer":
                header = request.headers.get("X-CSRF-Token")
                if not csrf_matches(who, header):
                    return _error(403, "missing or wrong CSRF token; reload the page")
            return await handler(request)
        open_paths = ("/", "/api/session")
        needs_login = not self.config.loopback and path not in open_paths
        if needs_login and self._who(request) is None:
            return _error(401, "log in first (or send the token)")
        return await handler(request)

    def _who(self, request: web.Request) -> str | None:
        """Return ``"bearer"``, the session's CSRF token, or None (not logged in)."""
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            return "bearer" if self.gate.check(header[7:].strip()) else None
        session = self.gate.session(request.cookies.get(SESSION_COOKIE))
        return None if session is None else session.csrf

    def _same_origin(self, request: web.Request) -> bool:
        origin = request.headers.get("Origin")
        if origin is None:  # not a browser, or a same-origin GET-style form
            return True
        return urlsplit(origin).netloc == request.host

    # -- pages -------------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.StreamResponse:
        """The one HTML page; its script gets a fresh CSP nonce."""
        nonce = secrets.token_urlsafe(16)
        response = web.Response(
            text=render_page(nonce, self.site.gateway.id), content_type="text/html"
        )
        response.headers["Content-Security-Policy"] = (
            f"default-src 'none'; script-src 'nonce-{nonce}'; "
            "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; "
            "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
        )
        return response

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        """Prometheus metrics."""
        body = await asyncio.to_thread(render, self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def session_info(self, request: web.Request) -> web.StreamResponse:
        """Whether this browser is logged in; hands out the login CSRF token."""
        session = self.gate.session(request.cookies.get(SESSION_COOKIE))
        login_csrf = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(24)
        response = web.json_response(
            {
                "logged_in": session is not None,
                "csrf": None if session is None else session.csrf,
                "login_csrf": login_csrf,
                "secret_configured": self.gate.has_secret,
                "loopback": self.config.loopback,
                "gateway": self.site.gateway.id,
            }
        )
        response.set_cookie(
            LOGIN_COOKIE, login_csrf, httponly=True, samesite="Strict", path="/api/"
        )
        return response

    async def api_state(self, request: web.Request) -> web.StreamResponse:
        """Everything the page shows, in one answer."""
        return web.json_response(self.facts.snapshot(), dumps=_dumps)

    async def api_config(self, request: web.Request) -> web.StreamResponse:
        """The site file as loaded, secrets masked."""
        path = Path(self.site.path)
        try:
            text = await asyncio.to_thread(path.read_text, encoding="utf-8")
            data: Any = tomllib.loads(text)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            return _error(500, f"cannot read {path}: {exc}")
        return web.json_response({"path": str(path), "site": mask_secrets(data)})

    # -- actions -----------------------------------------------------------------------

    async def login(self, request: web.Request) -> web.StreamResponse:
        """Check the secret; on success set the session cookie."""
        expected = request.cookies.get(LOGIN_COOKIE)
        if not expected or not csrf_matches(
            expected, request.headers.get("X-CSRF-Token")
        ):
            return _error(403, "missing or wrong login CSRF token; reload the page")
        client = request.remote or "?"
        wait = self.gate.retry_after(client)
        if wait > 0:
            response = _error(429, f"too many failed logins; wait {wait:.0f} s")
            response.headers["Retry-After"] = str(int(wait) + 1)
            return response
        body = await _json_body(request)
        secret = body.get("secret") if isinstance(body, dict) else None
        if not self.gate.has_secret:
            return _error(
                403, "no password or token is configured ([http] password_file)"
            )
        session = self.gate.login(client, secret if isinstance(secret, str) else "")
        if session is None:
            log.warning("failed web login", extra={"kv": {"client": client}})
            return _error(401, "wrong password or token")
        log.info("web login", extra={"kv": {"client": client}})
        response = web.json_response({"logged_in": True, "csrf": session.csrf})
        response.set_cookie(
            SESSION_COOKIE,
            session.id,
            httponly=True,
            samesite="Strict",
            path="/",
            max_age=int(self.config.session_s),
        )
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        """End this browser's session."""
        self.gate.logout(request.cookies.get(SESSION_COOKIE))
        response = web.json_response({"logged_in": False})
        response.del_cookie(SESSION_COOKIE, path="/")
        return response

    async def verify(self, request: web.Request) -> web.StreamResponse:
        """Verify the evidence log in a worker thread; return the report."""
        from ies_agent.evidence.verify import VerifyInputError, verify_path

        if self._verify_lock.locked():
            return _error(409, "a verification is already running")
        async with self._verify_lock:
            try:
                report = await asyncio.to_thread(verify_path, self.facts.data_dir)
            except VerifyInputError as exc:
                return _error(500, str(exc))
        return web.json_response(
            {"ok": report.ok, "summary": report.summary(), "report": report.to_json()},
            dumps=_dumps,
        )

    async def opt_out(self, request: web.Request) -> web.StreamResponse:
        """The consumer opts out of a dispatch event; the engine records and reports
        it upstream within a second."""
        from ies_agent.dispatch.engine import request_opt_out

        try:
            body = await request.json()
        except ValueError:
            return _error(400, 'expected a JSON body like {"event": "<event id>"}')
        event = body.get("event") if isinstance(body, dict) else None
        reason = body.get("reason", "consumer") if isinstance(body, dict) else None
        if not isinstance(event, str) or not event or not isinstance(reason, str):
            return _error(400, 'expected {"event": "<event id>", "reason": "…"}')
        try:
            await asyncio.to_thread(
                request_opt_out, self.facts.data_dir, event, reason[:200]
            )
        except OSError as exc:
            return _error(500, f"cannot record the opt-out: {exc.strerror}")
        return web.json_response({"ok": True, "event": event, "reason": reason[:200]})

    async def scan(self, request: web.Request) -> web.StreamResponse:
        """Scan a bus of the site (or a TCP address) for unit ids and SunSpec models."""
        from ies_agent.commands.scan import parse_host_port, parse_units, scan_bus
        from ies_drivers.errors import DriverError
        from ies_drivers.modbus.bus import BusSpec, ModbusBus

        body = await _json_body(request)
        if not isinstance(body, dict):
            return _error(400, 'send JSON: {"bus": "<bus id>", "units": "1-10"}')
        bus_id, tcp = body.get("bus"), body.get("tcp")
        try:
            units = parse_units(str(body.get("units") or "1-10"))
            timeout_s = float(body.get("timeout_s", 0.3))
            if not 0.05 <= timeout_s <= 5:
                raise ValueError("timeout_s must be 0.05-5 s")
            host_port = parse_host_port(str(tcp)) if tcp else None
        except ValueError as exc:
            return _error(400, str(exc))
        if self._scan_lock.locked():
            return _error(409, "a scan is already running")
        async with self._scan_lock:
            running = self.facts.buses.get(str(bus_id)) if bus_id else None
            own: ModbusBus | None = None
            if running is None and host_port is None:
                known = ", ".join(self.facts.buses) or "none"
                return _error(400, f"no Modbus bus {bus_id!r} (buses: {known})")
            if running is None and host_port is not None:
                own = ModbusBus(
                    BusSpec(
                        name="scan", kind="tcp", host=host_port[0], port=host_port[1]
                    )
                )
                await own.start()
            bus = running or own
            assert bus is not None
            try:
                found = await scan_bus(bus, units, timeout_s=timeout_s)
            except DriverError as exc:
                return _error(502, str(exc))
            finally:
                if own is not None:
                    with contextlib.suppress(Exception):
                        await own.close()
        from ies_agent.commands.scan import proposed_entries

        label = str(bus_id) if running is not None else "<bus id>"
        return web.json_response(
            {
                "found": [{"unit": u, "sunspec_models": m} for u, m in found],
                "proposed": proposed_entries(found, label),
            }
        )


def mask_secrets(value: Any, key: str = "") -> Any:
    """Return ``value`` (parsed TOML) with secrets replaced by ``"••••"``.

    A key naming a password, token, key or other secret hides its value; a
    ``user:password@`` in a URL loses the password.
    """
    if isinstance(value, dict):
        return {k: mask_secrets(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_secrets(v, key) for v in value]
    if key and _SECRET_KEY.search(key) and not key.endswith("_alg"):
        return "••••"
    if isinstance(value, str):
        return _URL_PASSWORD.sub(r"\g<head>••••@", value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


async def _json_body(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        return None


def _dumps(value: Any) -> str:
    import json

    return json.dumps(value, default=str)


def _loopback_host(host: str) -> bool:
    """Tell whether a ``Host`` header names this machine's loopback interface."""
    import ipaddress

    name = host.strip().lower()
    if name.startswith("["):
        name = name[1 : name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.rsplit(":", 1)[0]
    if name in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
