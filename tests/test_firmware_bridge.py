"""The firmware bridge end to end, with real peers.

A publisher's file host (aiohttp, slow and dropping connections on demand), the
``ies-firmware-bridge`` process, the agent's OCPP central system bridged to a test
CSMS (``ocpp`` package), and chargers (``ocpp`` package) that download from the
gateway. The evidence log is the agent's real one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from conftest import free_port
from firmware_fixtures import BridgeProcess, DownloadingCharger, Publisher, start_csms
from ies_agent.firmware_client import FirmwareClient
from ies_drivers.ocpp.versions import OcppVersion
from ocpp_fixtures import Running, ocpp_config, running_central
from peers.file_host import FileHost
from peers.ocpp_csms import calls_in

IMAGE = bytes(range(256)) * 1024  # 256 KiB


@dataclass
class Site:
    host: FileHost
    publisher: Publisher
    bridge: BridgeProcess
    running: Running
    client: FirmwareClient
    csms: Any
    charger: DownloadingCharger

    def csms_calls(self, action: str) -> list[dict[str, Any]]:
        return [
            p
            for a, p in calls_in(self.csms.frames(), self.charger.charger_id)
            if a == action
        ]


async def _until(predicate: Any, timeout_s: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


@pytest.fixture
async def host() -> AsyncIterator[FileHost]:
    host = FileHost()
    await host.start()
    yield host
    await host.stop()


async def _site(
    tmp_path: Path, host: FileHost, version: OcppVersion
) -> AsyncIterator[Site]:
    publisher = Publisher(tmp_path / "trust")
    bridge = BridgeProcess(tmp_path / "bridge", publisher.trust_dir)
    bridge.start()
    csms = await start_csms(free_port(), tmp_path / "csms.jsonl")
    config = ocpp_config({"CP-1": (version,)}, csms_url=csms.url)
    stop = asyncio.Event()
    try:
        async with running_central(config, tmp_path / "agent") as running:
            client = FirmwareClient(
                bridge.socket, running.evidence, reconnect_max_s=0.5
            )
            client.attach(running.central)
            task = asyncio.create_task(client.run(stop))
            await asyncio.wait_for(client.connected.wait(), 10)
            charger = DownloadingCharger("CP-1", version, running.url)
            charger.start()
            await asyncio.wait_for(charger.booted.wait(), 10)
            await _until(lambda: "CP-1" in csms.stations)
            try:
                yield Site(host, publisher, bridge, running, client, csms, charger)
            finally:
                await charger.stop()
                stop.set()
                await asyncio.wait_for(task, 10)
    finally:
        bridge.kill()
        bridge.remove_socket_dir()
        await csms.stop()


@pytest.fixture
async def site16(tmp_path: Path, host: FileHost) -> AsyncIterator[Site]:
    async for site in _site(tmp_path, host, OcppVersion.V16):
        yield site


@pytest.fixture
async def site201(tmp_path: Path, host: FileHost) -> AsyncIterator[Site]:
    async for site in _site(tmp_path, host, OcppVersion.V201):
        yield site


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _update16(site: Site, location: str) -> None:
    from ocpp.v16 import call

    await site.csms.stations["CP-1"].call(
        call.UpdateFirmware(location=location, retrieve_date=_now()), suppress=False
    )


def _events(site: Site, ev: str) -> list[dict[str, Any]]:
    return site.running.events(ev)


# --- acceptance -----------------------------------------------------------------------


async def test_signed_image_reaches_a_16_charger_through_the_gateway(
    site16: Site,
) -> None:
    site = site16
    url = site.host.add("cp-2.1.0.bin", IMAGE)
    site.host.add(
        "cp-2.1.0.bin.manifest.json", site.publisher.manifest("cp-2.1.0.bin", IMAGE)
    )

    await _update16(site, url)
    await asyncio.wait_for(site.charger.done.wait(), 20)

    # The charger fetched from the gateway, never from the publisher, and got the image.
    assert site.charger.images == [IMAGE]
    assert site.charger.locations[0].startswith(site.bridge.base_url + "/fw/")
    assert f"127.0.0.1:{site.host.port}" not in site.charger.locations[0]
    # The CSMS heard every status the charger reported, in order.
    await _until(lambda: len(site.csms_calls("FirmwareStatusNotification")) == 4)
    statuses = [p["status"] for p in site.csms_calls("FirmwareStatusNotification")]
    assert statuses == ["Downloading", "Downloaded", "Installing", "Installed"]
    # Every step is evidence.
    await _until(lambda: bool(_events(site, "firmware_served")))
    verified = _events(site, "firmware_verified")
    assert verified[0]["sha256"] == hashlib.sha256(IMAGE).hexdigest()
    for ev in (
        "firmware_requested",
        "firmware_downloaded",
        "firmware_verified",
        "firmware_installed",
    ):
        assert _events(site, ev), ev
    assert _events(site, "firmware_verified")[0]["by"].startswith("manifest:")


async def test_tampered_image_is_refused_and_the_csms_hears_why(site16: Site) -> None:
    site = site16
    tampered = bytearray(IMAGE)
    tampered[1000] ^= 0xFF
    url = site.host.add("cp-2.1.1.bin", bytes(tampered))
    site.host.add(
        "cp-2.1.1.bin.manifest.json", site.publisher.manifest("cp-2.1.1.bin", IMAGE)
    )

    await _update16(site, url)
    await asyncio.wait_for(site.charger.done.wait(), 20)

    # Not one byte reached the charger: the gateway answered 404.
    assert site.charger.images == []
    assert 200 not in site.charger.fetch_statuses
    assert site.charger.reported[-1] == "DownloadFailed"
    # The evidence log says why.
    rejected = _events(site, "firmware_rejected")
    assert len(rejected) == 1 and "SHA-256" in rejected[0]["reason"]
    assert not _events(site, "firmware_served")
    # The CSMS hears DownloadFailed and, in a DataTransfer, the reason.
    await _until(lambda: bool(site.csms_calls("DataTransfer")))
    detail = json.loads(site.csms_calls("DataTransfer")[0]["data"])
    assert detail["status"] == "InvalidSignature" and "SHA-256" in detail["reason"]
    assert "DownloadFailed" in [
        p["status"] for p in site.csms_calls("FirmwareStatusNotification")
    ]


async def test_201_signed_update_verifies_the_certificate_and_signature(
    site201: Site,
) -> None:
    from ocpp.v201 import call

    site = site201
    good = site.host.add("cs-3.0.bin", IMAGE)
    bad = site.host.add("cs-3.0-evil.bin", IMAGE[:-1] + b"X")
    station = site.csms.stations["CP-1"]
    firmware = {
        "location": good,
        "retrieveDateTime": _now(),
        "signingCertificate": site.publisher.cert_pem(),
        "signature": site.publisher.signature(IMAGE),
    }
    answer = await station.call(
        call.UpdateFirmware(request_id=7, firmware=firmware), suppress=False
    )
    assert answer.status == "Accepted"
    await asyncio.wait_for(site.charger.done.wait(), 20)
    assert site.charger.images == [IMAGE]
    await _until(lambda: len(site.csms_calls("FirmwareStatusNotification")) == 4)
    assert {p["requestId"] for p in site.csms_calls("FirmwareStatusNotification")} == {
        7
    }

    # The same signature over other bytes: refused, the CSMS told InvalidSignature.
    site.charger.done.clear()
    firmware = {**firmware, "location": bad}
    await station.call(
        call.UpdateFirmware(request_id=8, firmware=firmware), suppress=False
    )
    await asyncio.wait_for(site.charger.done.wait(), 20)
    assert site.charger.images == [IMAGE]
    await _until(
        lambda: any(
            p.get("status") == "InvalidSignature" and p.get("requestId") == 8
            for p in site.csms_calls("FirmwareStatusNotification")
        )
    )
    told = [
        p
        for p in site.csms_calls("FirmwareStatusNotification")
        if p["status"] == "InvalidSignature"
    ]
    assert "signature does not verify" in told[0]["customData"]["reason"]

    # A certificate no trusted CA issued: the CSMS gets InvalidCertificate at once and
    # the charger is never asked.
    other = Publisher(site.running.data_dir / "other-trust")
    firmware = {
        **firmware,
        "signingCertificate": other.cert_pem(),
        "signature": other.signature(IMAGE),
    }
    answer = await station.call(
        call.UpdateFirmware(request_id=9, firmware=firmware), suppress=False
    )
    assert answer.status == "InvalidCertificate"
    assert (
        "not issued by a trusted publisher CA" in answer.status_info["additional_info"]
    )


async def test_download_interrupted_half_way_resumes_after_a_bridge_restart(
    tmp_path: Path, host: FileHost
) -> None:
    publisher = Publisher(tmp_path / "trust")
    image = bytes(range(256)) * 8192  # 2 MiB
    url = host.add("big.bin", image, chunk=64 * 1024, delay_s=0.03)
    host.add("big.bin.manifest.json", publisher.manifest("big.bin", image))
    bridge = BridgeProcess(tmp_path / "bridge", publisher.trust_dir)
    bridge.start()
    from ies_agent.evidence.log import EvidenceLog

    evidence = EvidenceLog.open(
        tmp_path / "agent", gateway_id="gw-test", interval_s=900
    )
    client = FirmwareClient(bridge.socket, evidence, reconnect_max_s=0.3)
    stop = asyncio.Event()
    task = asyncio.create_task(client.run(stop))
    try:
        await asyncio.wait_for(client.connected.wait(), 10)
        answer = await client.request(
            "firmware",
            charger="CP-9",
            ocpp="1.6",
            action="UpdateFirmware",
            location=url,
        )
        # Kill the bridge (SIGKILL: no goodbye) once half the file went out.
        await _until(lambda: host.sent.get("big.bin", 0) >= len(image) // 2)
        bridge.kill()
        part = tmp_path / "bridge" / "cache" / "partial" / f"{answer['transfer']}.part"
        offset = part.stat().st_size
        assert len(image) // 4 < offset < len(image)

        client.connected.clear()
        bridge.start()
        await asyncio.wait_for(client.connected.wait(), 10)

        def verified() -> bool:
            lines = (tmp_path / "agent" / "evidence.jsonl").read_text().splitlines()
            return any('"firmware_verified"' in line for line in lines)

        await _until(verified, 20)
        # The second run asked only for the rest, from where the .part ended.
        assert host.ranges("big.bin") == ["", f"bytes={offset}-"]
        cached = tmp_path / "bridge" / "cache" / "objects"
        assert [
            p.read_bytes() == image for p in cached.iterdir() if p.suffix == ""
        ] == [True]
        lines = (tmp_path / "agent" / "evidence.jsonl").read_text().splitlines()
        downloaded = [json.loads(x) for x in lines if '"firmware_downloaded"' in x]
        assert downloaded[-1]["resumed_from"] == offset
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        bridge.kill()
        bridge.remove_socket_dir()
        evidence.close()


def test_only_the_agent_may_talk_to_the_control_socket(
    tmp_path: Path, host: FileHost
) -> None:
    # The socket file is open to every local user (the agent runs as another user
    # than the bridge); the bridge checks who is calling. Here: nobody (65534).
    import subprocess

    if os.getuid() != 0:
        pytest.skip("needs root to connect as another user")
    publisher = Publisher(tmp_path / "trust")
    bridge = BridgeProcess(tmp_path / "bridge", publisher.trust_dir)
    bridge.start()
    try:
        # Let the other user reach the socket file, as on a gateway (/run/...).
        for folder in (bridge.socket.parent, *bridge.socket.parent.parents):
            if folder == Path("/tmp") or folder == Path("/"):
                break
            os.chmod(folder, 0o755)
        # socat as the client: a system binary the unprivileged user can run.
        result = subprocess.run(
            ["socat", "-t", "5", "-", f"UNIX-CONNECT:{bridge.socket}"],
            input='{"op": "list"}\n',
            capture_output=True,
            text=True,
            timeout=20,
            user=65534,
            check=False,
        )
    finally:
        bridge.kill()
    assert '"not allowed"' in result.stdout, result.stderr
    assert '"ok": true' not in result.stdout
