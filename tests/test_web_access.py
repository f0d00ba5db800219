"""Access rules of the web page: secrets at rest, CSRF, sessions, rate limits.

A real aiohttp server on a free loopback port with a real evidence log; the client
is aiohttp's. The only fake is the clock of session expiry, moved by shortening the
session lifetime.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from conftest import free_port
from ies_agent.config import ConfigError, load_site
from ies_agent.evidence.log import EvidenceLog
from ies_agent.state import AgentState
from ies_agent.web.auth import (
    Gatekeeper,
    SecretFileError,
    check_secret,
    hash_secret,
    read_secret_hash,
    write_secret_hash,
)
from ies_agent.web.errors import WebSetupError
from ies_agent.web.facts import SiteFacts
from ies_agent.web.server import WebServer, mask_secrets

PASSWORD = "correct horse battery"


def client() -> aiohttp.ClientSession:
    """A client that keeps cookies of IP-address hosts (aiohttp's default does not)."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


def site_text(listen: str, port: int, secret: str = "") -> str:
    return (
        '[gateway]\nid = "gw-web"\ntimezone = "Asia/Kolkata"\ninterval = "15m"\n'
        'data_dir = "."\n\n[http]\n'
        f'listen = "{listen}"\nport = {port}\n{secret}'
    )


async def start(tmp_path: Path, listen: str = "127.0.0.1") -> tuple[WebServer, str]:
    write_secret_hash(tmp_path / "pw.hash", PASSWORD)
    port = free_port()
    (tmp_path / "site.toml").write_text(
        site_text(listen, port, 'password_file = "pw.hash"\n')
    )
    site = load_site(tmp_path / "site.toml")
    assert site.http is not None
    log = EvidenceLog.open(tmp_path / "data", gateway_id="gw-web")
    facts = SiteFacts(
        AgentState("gw-web"), log, {}, data_dir=tmp_path / "data", interval_s=900
    )
    server = WebServer(site.http, facts, site)
    await server.start()
    return server, f"http://{listen}:{port}"


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[WebServer, str]]:
    server, url = await start(tmp_path)
    yield server, url
    await server.close()
    server.facts.evidence.close()


def test_hash_round_trip_and_file_rules(tmp_path: Path) -> None:
    hashed = hash_secret(PASSWORD)
    assert PASSWORD not in hashed
    assert check_secret(PASSWORD, hashed)
    assert not check_secret(PASSWORD + "x", hashed)
    path = tmp_path / "pw"
    write_secret_hash(path, PASSWORD)
    assert path.stat().st_mode & 0o777 == 0o600
    assert check_secret(PASSWORD, read_secret_hash(path))
    path.write_text(PASSWORD)
    with pytest.raises(SecretFileError, match="plain password must never"):
        read_secret_hash(path)
    write_secret_hash(path, PASSWORD)
    path.chmod(0o644)
    with pytest.raises(SecretFileError, match="readable by every user"):
        read_secret_hash(path)


def test_lan_address_without_secret_is_refused(tmp_path: Path) -> None:
    (tmp_path / "site.toml").write_text(site_text("0.0.0.0", 8780))
    with pytest.raises(ConfigError, match="needs a secret"):
        load_site(tmp_path / "site.toml")
    (tmp_path / "site.toml").write_text(site_text("my-gateway", 8780))
    with pytest.raises(ConfigError, match="not an IP address"):
        load_site(tmp_path / "site.toml")


async def test_missing_secret_file_stops_the_page(tmp_path: Path) -> None:
    (tmp_path / "site.toml").write_text(
        site_text("127.0.0.1", free_port(), 'password_file = "absent"\n')
    )
    site = load_site(tmp_path / "site.toml")
    assert site.http is not None
    log = EvidenceLog.open(tmp_path / "data", gateway_id="gw-web")
    try:
        facts = SiteFacts(AgentState("gw"), log, {}, data_dir=tmp_path, interval_s=900)
        with pytest.raises(WebSetupError, match="cannot read"):
            await WebServer(site.http, facts, site).start()
    finally:
        log.close()


def test_login_rate_limit_and_session_expiry() -> None:
    gate = Gatekeeper(hashes=[hash_secret(PASSWORD)], session_s=0.2, max_failures=3)
    for _ in range(3):
        assert gate.login("10.0.0.9", "wrong") is None
    assert gate.retry_after("10.0.0.9") > 50
    assert gate.retry_after("10.0.0.8") == 0
    session = gate.login("10.0.0.8", PASSWORD)
    assert session is not None
    assert gate.session(session.id) is session
    time.sleep(0.25)
    assert gate.session(session.id) is None


def test_secrets_are_masked() -> None:
    masked = mask_secrets(
        {
            "http": {"password_file": "pw.hash", "port": 8780},
            "upstreams": [{"url": "mqtts://user:s3cret@broker:8883", "psk": "abc"}],
            "gateway": {"key_alg": "ed25519"},
        }
    )
    assert masked["http"] == {"password_file": "••••", "port": 8780}
    assert masked["upstreams"][0] == {
        "url": "mqtts://user:••••@broker:8883",
        "psk": "••••",
    }
    assert masked["gateway"]["key_alg"] == "ed25519"


async def test_posts_need_login_and_csrf(served: tuple[WebServer, str]) -> None:
    _, url = served
    async with client() as http:
        async with http.post(url + "/api/verify") as response:
            assert response.status == 401
        async with http.get(url + "/api/session") as response:
            info = await response.json()
            assert info["logged_in"] is False and info["loopback"] is True
        # Login without the login CSRF token: refused.
        async with http.post(url + "/api/login", json={"secret": PASSWORD}) as r:
            assert r.status == 403
        head = {"X-CSRF-Token": info["login_csrf"]}
        async with http.post(
            url + "/api/login", json={"secret": "no"}, headers=head
        ) as r:
            assert r.status == 401
        async with http.post(
            url + "/api/login", json={"secret": PASSWORD}, headers=head
        ) as response:
            assert response.status == 200
            csrf = (await response.json())["csrf"]
        # Logged in, but no CSRF token or a foreign origin: 403.
        async with http.post(url + "/api/verify") as response:
            assert response.status == 403
        foreign = {"X-CSRF-Token": csrf, "Origin": "http://evil.example"}
        async with http.post(url + "/api/verify", headers=foreign) as response:
            assert response.status == 403
        async with http.post(url + "/api/verify", headers={"X-CSRF-Token": csrf}) as r:
            assert r.status == 200
            report = await r.json()
            assert "summary" in report
    # Scripts use the token as a Bearer header, without cookies.
    async with client() as http:
        bearer = {"Authorization": f"Bearer {PASSWORD}"}
        async with http.post(url + "/api/verify", headers=bearer) as response:
            assert response.status == 200


async def test_failed_logins_are_rate_limited(served: tuple[WebServer, str]) -> None:
    _, url = served
    async with client() as http:
        async with http.get(url + "/api/session") as response:
            head = {"X-CSRF-Token": (await response.json())["login_csrf"]}
        codes = []
        for _ in range(6):
            async with http.post(
                url + "/api/login", json={"secret": "guess"}, headers=head
            ) as response:
                codes.append(response.status)
        assert codes[:5] == [401] * 5
        assert codes[5] == 429
        async with http.post(
            url + "/api/login", json={"secret": PASSWORD}, headers=head
        ) as response:
            assert response.status == 429  # even the right one waits


async def test_loopback_reads_are_open(served: tuple[WebServer, str]) -> None:
    _, url = served
    async with client() as http:
        for path in ("/", "/metrics", "/api/state", "/api/config", "/api/dispatch"):
            async with http.get(url + path) as response:
                assert response.status == 200, path
        async with http.get(url + "/") as response:
            assert "script-src 'nonce-" in response.headers["Content-Security-Policy"]


async def test_lan_page_needs_login_to_read(tmp_path: Path) -> None:
    # Bound to every interface; the test talks to it through 127.0.0.1.
    server, url = await start(tmp_path, listen="0.0.0.0")
    url = url.replace("0.0.0.0", "127.0.0.1")
    try:
        async with client() as http:
            async with http.get(url + "/") as response:
                assert response.status == 200
            for path in ("/metrics", "/api/state", "/api/config"):
                async with http.get(url + path) as response:
                    assert response.status == 401, path
            bearer = {"Authorization": f"Bearer {PASSWORD}"}
            async with http.get(url + "/api/state", headers=bearer) as response:
                assert response.status == 200
    finally:
        await server.close()
        server.facts.evidence.close()


def test_web_password_command_stores_only_a_hash(tmp_path: Path) -> None:
    import subprocess
    import sys

    target = tmp_path / "web-password"
    done = subprocess.run(
        [sys.executable, "-m", "ies_agent.cli", "web-password", str(target)],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stdout
    stored = target.read_text()
    assert PASSWORD not in stored
    assert check_secret(PASSWORD, read_secret_hash(target))
    short = subprocess.run(
        [sys.executable, "-m", "ies_agent.cli", "web-password", str(target)],
        input="short\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert short.returncode == 1
    assert "at least" in short.stdout


async def test_consumer_opt_out_through_the_local_api(
    served: tuple[WebServer, str],
) -> None:
    import json

    from ies_agent.dispatch.engine import OPT_OUT_DIR

    server, url = served
    inbox = server.facts.data_dir / OPT_OUT_DIR
    async with client() as http:
        body = {"event": "evt-42", "reason": "guests at home"}
        async with http.post(url + "/api/dispatch/optout", json=body) as response:
            assert response.status == 401  # nothing changes without authentication
        assert not inbox.exists()
        bearer = {"Authorization": f"Bearer {PASSWORD}"}
        async with http.post(
            url + "/api/dispatch/optout", json={"reason": "x"}, headers=bearer
        ) as response:
            assert response.status == 400
        async with http.post(
            url + "/api/dispatch/optout", json=body, headers=bearer
        ) as response:
            assert response.status == 200
    # The request waits in the data directory for the dispatch engine to take it.
    (request,) = inbox.glob("*.json")
    assert json.loads(request.read_text()) == {
        "event": "evt-42",
        "reason": "guests at home",
    }


async def test_loopback_page_refuses_foreign_host_names(
    served: tuple[WebServer, str],
) -> None:
    # DNS rebinding: evil.example resolved to 127.0.0.1 must not read the site file.
    _, url = served
    async with client() as http:
        foreign = {"Host": "attacker.example:18780"}
        async with http.get(url + "/api/config", headers=foreign) as response:
            assert response.status == 421
        for name in ("localhost:8780", "127.0.0.1", "[::1]:8780"):
            async with http.get(url + "/api/state", headers={"Host": name}) as r:
                assert r.status == 200, name
