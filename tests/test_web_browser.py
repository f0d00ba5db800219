"""The installer's page in a real headless browser against a running demo.

Debian's chromium driven by Playwright (never ``playwright install``). Screenshots of
the main pages go to ``tests/artifacts/``.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from web_fixtures import DEMO_DEVICES, RunningDemo, running_demo

__all__ = ["running_demo"]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

sync_api = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed", allow_module_level=True)


def post(url: str, body: dict[str, Any] | None = None, **headers: str) -> int:
    """POST JSON to ``url``; return the status code."""
    data = json.dumps(body or {}).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json", **headers}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture(scope="module")
def browser() -> Any:
    with sync_api.sync_playwright() as play:
        browser = play.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


def test_unauthenticated_posts_get_401(running_demo: RunningDemo) -> None:
    for path in ("/api/verify", "/api/scan", "/api/logout"):
        assert post(running_demo.url + path) == 401, path
    wrong = post(running_demo.url + "/api/verify", Authorization="Bearer not-it")
    assert wrong == 401


def test_page_shows_devices_and_verifies(
    running_demo: RunningDemo, browser: Any
) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on(
        "console", lambda msg: errors.append(msg.text) if msg.type == "error" else None
    )
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(running_demo.url + "/", wait_until="load")

    # Every simulated device shows up with at least one value.
    for device in DEMO_DEVICES:
        card = page.locator(f'.device[data-device="{device}"]')
        card.wait_for(timeout=10_000)
        value = card.locator("td.value").first.inner_text()
        assert value.strip() not in ("", "–"), device
    entries = int(page.locator("#evEntries").inner_text())
    assert entries > 0
    assert "no upstream configured" in page.locator("#upstreams").inner_text()
    # The demo runs dispatch: its section lists events (none before the scripted one).
    dispatch = page.locator("#dispatch").inner_text()
    assert "no dispatch events" in dispatch or "demo-" in dispatch

    # Log in with the demo's token, then verify the evidence log.
    page.fill("#secret", running_demo.token)
    page.click("#loginForm button")
    page.locator("#logout").wait_for(state="visible", timeout=10_000)
    page.click("#verify")
    result = page.locator('#verifyResult[data-ok="yes"]')
    result.wait_for(timeout=20_000)
    assert "OK" in result.inner_text()
    page.wait_for_timeout(2500)  # one more poll: the charts have samples
    page.screenshot(path=str(ARTIFACTS / "web-overview.png"), full_page=True)

    # The scan page proposes entries for the grid meter's bus.
    page.click('nav a[data-tab="scan"]')
    page.select_option("#scanBus", "lan-grid-meter")
    page.fill("#scanUnits", "1-2")
    page.click("#scanForm button")
    page.locator("#scanResult pre").wait_for(timeout=15_000)
    assert "[[devices]]" in page.locator("#scanResult pre").inner_text()
    page.screenshot(path=str(ARTIFACTS / "web-scan.png"), full_page=True)

    # Configuration, read-only.
    page.click('nav a[data-tab="config"]')
    page.locator("#config").wait_for()
    page.wait_for_function("document.getElementById('config').textContent.length > 0")
    config = page.locator("#config").inner_text()
    assert "lan-grid-meter" in config
    assert "••••" in config  # the token file and meter password paths are masked
    page.screenshot(path=str(ARTIFACTS / "web-config.png"), full_page=True)
    assert errors == []
    page.close()


def test_page_fits_a_phone(running_demo: RunningDemo, browser: Any) -> None:
    page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
    errors: list[str] = []
    page.on(
        "console", lambda msg: errors.append(msg.text) if msg.type == "error" else None
    )
    page.goto(running_demo.url + "/")
    page.locator('.device[data-device="grid-meter"]').wait_for(timeout=10_000)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390
    page.screenshot(path=str(ARTIFACTS / "web-phone.png"), full_page=True)
    assert errors == []
    page.close()
