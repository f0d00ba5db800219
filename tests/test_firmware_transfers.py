"""The bridge's transfers against a flaky publisher host, in one process.

The :class:`Bridge` runs in the test's event loop (its HTTP server and unix socket are
real); the agent side is the real :class:`FirmwareClient` with the real evidence log.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from firmware_fixtures import Publisher
from ies_agent.commands.firmware import render
from ies_agent.config import load_site
from ies_agent.evidence.log import EvidenceLog
from ies_agent.firmware_client import BridgeRefused, FirmwareClient, query
from ies_firmware_bridge.config import BridgeConfig, BridgeConfigError, load_config
from ies_firmware_bridge.service import Bridge
from peers.file_host import FileHost

IMAGE = bytes(range(251)) * 2000  # ~490 KiB


class Env:
    def __init__(self, tmp: Path, host: FileHost, publisher: Publisher) -> None:
        self.tmp, self.host, self.publisher = tmp, host, publisher
        socket = Path(tempfile.mkdtemp(prefix="fwt-", dir="/tmp")) / "b.sock"
        self.config = BridgeConfig(
            state_dir=tmp / "state",
            cache_dir=tmp / "cache",
            socket=socket,
            port=0,
            trust_dirs=(publisher.trust_dir,),
            quota_bytes=2 * 1024 * 1024,
            max_file_bytes=1024 * 1024,
            connect_timeout_s=2,
            read_timeout_s=2,
            retries=3,
            hold_s=5,
            backoff_first_s=0.05,
            pins={"pinned.bin": hashlib.sha256(IMAGE).hexdigest()},
        )
        self.evidence = EvidenceLog.open(
            tmp / "agent", gateway_id="gw-t", interval_s=900
        )

    def events(self, ev: str) -> list[dict[str, Any]]:
        lines = (self.tmp / "agent" / "evidence.jsonl").read_text().splitlines()
        return [e for e in map(json.loads, lines) if e.get("ev") == ev]


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[Env, Bridge, FirmwareClient]]:
    host = FileHost()
    await host.start()
    environment = Env(tmp_path, host, Publisher(tmp_path / "trust"))
    bridge = Bridge(environment.config)
    await bridge.start()
    client = FirmwareClient(environment.config.socket, environment.evidence)
    stop = asyncio.Event()
    task = asyncio.create_task(client.run(stop))
    await asyncio.wait_for(client.connected.wait(), 5)
    try:
        yield environment, bridge, client
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await bridge.close()
        await host.stop()
        environment.evidence.close()
        shutil.rmtree(environment.config.socket.parent, ignore_errors=True)


async def _register(client: FirmwareClient, url: str, **extra: Any) -> dict[str, Any]:
    return await client.request(
        "firmware",
        charger="CP-7",
        ocpp="1.6",
        action="UpdateFirmware",
        location=url,
        **extra,
    )


async def _fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers=headers) as r,
    ):
        return r.status, await r.read()


async def test_dropped_connections_resume_with_range_requests(env: Any) -> None:
    environment, _bridge, client = env
    host = environment.host
    url = host.add("cp.bin", IMAGE, chunk=32 * 1024, drop_at=100_000, drops=2)
    host.add("cp.bin.manifest.json", environment.publisher.manifest("cp.bin", IMAGE))
    answer = await _register(client, url)

    status, body = await _fetch(answer["url"])
    assert status == 200 and body == IMAGE
    # First GET whole, then two resumes from exactly where each connection broke.
    assert host.ranges("cp.bin") == ["", "bytes=100000-", "bytes=200000-"]
    # A charger may resume too: ranges are served.
    status, tail = await _fetch(answer["url"], {"Range": "bytes=1000-"})
    assert status == 206 and tail == IMAGE[1000:]


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("truncated", "bytes"),
        ("wrong_key", "not signed by a trusted publisher key"),
        ("no_manifest", "no signed manifest"),
        ("wrong_name", "the manifest is for"),
    ],
)
async def test_files_that_do_not_verify_are_never_served(
    env: Any, case: str, reason: str
) -> None:
    environment, _bridge, client = env
    host, publisher = environment.host, environment.publisher
    name = f"{case}.bin"
    data = IMAGE[: len(IMAGE) // 2] if case == "truncated" else IMAGE
    url = host.add(name, data)
    if case == "wrong_key":
        manifest = publisher.manifest(name, IMAGE, ed25519.Ed25519PrivateKey.generate())
    elif case == "wrong_name":
        manifest = publisher.manifest("other.bin", IMAGE)
    else:
        manifest = publisher.manifest(name, IMAGE)
    if case != "no_manifest":
        host.add(f"{name}.manifest.json", manifest)
    answer = await _register(client, url)

    status, body = await _fetch(answer["url"])
    assert status == 404 and IMAGE[:64] not in body
    await asyncio.sleep(0.1)
    rejected = environment.events("firmware_rejected")
    assert len(rejected) == 1 and reason in rejected[0]["reason"]
    assert rejected[0]["status"] == "InvalidSignature"
    assert not list((environment.tmp / "cache" / "partial").iterdir())


async def test_pinned_file_cache_hit_and_listing(env: Any, capsys: Any) -> None:
    environment, _bridge, client = env
    url = environment.host.add("pinned.bin", IMAGE)
    first = await _register(client, url)
    assert (await _fetch(first["url"]))[1] == IMAGE
    # The same image again: served from the cache, no second download.
    second = await _register(client, url)
    assert (await _fetch(second["url"]))[1] == IMAGE
    assert environment.host.ranges("pinned.bin") == [""]
    assert first["url"] != second["url"]

    listing = await query(environment.config.socket, "list")
    assert [c["sha256"] for c in listing["cache"]] == [
        hashlib.sha256(IMAGE).hexdigest()
    ]
    text = render(listing)
    assert "pinned.bin" in text and "verified by pin" in text and "CP-7" in text
    assert first["url"].split("/")[-2] not in json.dumps(listing)  # tokens stay secret


async def test_too_large_files_fail_and_http_only(env: Any) -> None:
    environment, _bridge, client = env
    big = bytes(2 * 1024 * 1024)
    url = environment.host.add("big.bin", big)
    environment.host.add(
        "big.bin.manifest.json", environment.publisher.manifest("big.bin", big)
    )
    answer = await _register(client, url)
    assert (await _fetch(answer["url"]))[0] == 404
    failed = environment.events("firmware_download_failed")
    assert failed and "allowed" in failed[0]["reason"]

    with pytest.raises(BridgeRefused, match="HTTP"):
        await _register(client, "ftp://fw.example.com/cp.bin")


async def test_diagnostics_go_from_the_charger_to_the_csms_location(env: Any) -> None:
    environment, _bridge, client = env
    target = f"http://127.0.0.1:{environment.host.port}/upload/"
    answer = await client.request(
        "upload", charger="CP-7", ocpp="1.6", action="GetDiagnostics", location=target
    )
    async with aiohttp.ClientSession() as session:
        async with session.put(answer["url"] + "diag.log", data=b"hello log") as r:
            assert r.status == 201
        async with session.put(answer["url"] + "again.log", data=b"x") as r:
            assert r.status == 409

    for _ in range(200):
        if "diag.log" in environment.host.uploads:
            break
        await asyncio.sleep(0.05)
    assert environment.host.uploads["diag.log"] == b"hello log"
    await asyncio.sleep(0.1)
    assert environment.events("diagnostics_forwarded")[0]["bytes"] == 9


def test_config_file_flags_and_site_table(tmp_path: Path) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text('listen = "10.0.0.2"\nquota_mb = 64\n[pins]\n"a.bin" = "00"\n')
    with pytest.raises(BridgeConfigError, match=r"bridge.toml:4: pins.\"?a.bin"):
        load_config(path, {})
    path.write_text('listen = "10.0.0.2"\nquota_mb = 64\nmax_file_mb = 32\n')
    config = load_config(path, {"port": 9000})
    assert config.base_url == "http://10.0.0.2:9000"
    assert config.quota_bytes == 64 * 1024 * 1024
    with pytest.raises(BridgeConfigError, match="not an IP address"):
        load_config(None, {"listen": "gateway.local"})

    site = tmp_path / "site.toml"
    site.write_text(
        '[gateway]\nid = "gw-1"\ndata_dir = "data"\n\n[firmware]\nsocket = "fw.sock"\n'
    )
    loaded = load_site(site)
    assert loaded.firmware is not None
    assert loaded.firmware.socket == tmp_path / "fw.sock"
