"""IES over HTTPS against a real aiohttp HTTPS endpoint (``peers.ies_endpoint``).

The endpoint verifies Beckn signatures with PyNaCl and its own parsing (not the
agent's signer), validates every MeterData payload against the IES v0.6 schema and
validation rules, and answers ACK, NACK, 401, 500, slowly or not at all. After each
fault the endpoint holds every ``seq`` from 0 to the last, none missing.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ies_agent.cli import main as cli
from ies_agent.state import AgentState
from ies_agent.upstream import ies_https
from ies_agent.upstream.manager import Upstreams
from ies_agent.upstream.meterdata import profiles_from_lines
from ies_agent.upstream.settings import UpstreamConfig
from peers.ies_endpoint import IesEndpoint
from peers.mosquitto import TestPki
from upstream_fixtures import (
    GATEWAY,
    MixedSite,
    expected_blocks,
    instant_snapshots,
    interval_blocks,
    log_lines,
    write_site_log,
)

SUBSCRIBER = "gw.discom.example"
KEY_ID = "k1"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return TestPki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    key = Ed25519PrivateKey.generate()
    path = tmp_path_factory.mktemp("beckn") / "signing.key"
    path.write_bytes(base64.b64encode(key.private_bytes_raw()))
    return path, key.public_key().public_bytes_raw()


@pytest.fixture
async def endpoint(
    pki: TestPki, signing_key: tuple[Path, bytes]
) -> AsyncIterator[IesEndpoint]:
    peer = IesEndpoint(
        cert=pki.server_cert,
        key=pki.server_key,
        keys={(SUBSCRIBER, KEY_ID): signing_key[1]},
    )
    await peer.start()
    yield peer
    await peer.stop()


def direct(url: str, pki: TestPki, key: Path, **extra: object) -> UpstreamConfig:
    fields: dict[str, object] = {
        "mode": "direct",
        "subscriber_id": SUBSCRIBER,
        "key_id": KEY_ID,
        "signing_key_file": key,
        "tls_ca_file": pki.ca,
        "backoff_max_s": 0.3,
        "timeout_s": 1.0,
        "batch_max_entries": 7,
        "meter_refs": {"grid": "did:web:discom.example:meter:SM-0001"},
    }
    fields.update(extra)
    return UpstreamConfig(name="ies", kind="ies-https", url=url, **fields)  # type: ignore[arg-type]


async def until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def upstreams_for(data: Path, config: UpstreamConfig) -> tuple[Upstreams, AgentState]:
    state = AgentState(GATEWAY)
    upstreams = Upstreams(
        [config], data_dir=data, gateway_id=GATEWAY, origin="o", state=state
    )
    return upstreams, state


def assert_complete_and_verifies(endpoint: IesEndpoint, data: Path, tmp: Path) -> None:
    lines = log_lines(data)
    assert endpoint.missing(len(lines) - 1) == []
    assert endpoint.invalid == []
    out = tmp / "received"
    out.mkdir()
    (out / "evidence.jsonl").write_bytes(
        b"".join(endpoint.entries[seq] + b"\n" for seq in range(len(lines)))
    )
    import json

    (out / "checkpoints.jsonl").write_text(
        "".join(
            json.dumps({"note": n, "size": s}, sort_keys=True, separators=(",", ":"))
            + "\n"
            for s, n in sorted(endpoint.checkpoints.items())
        )
    )
    assert cli(["verify", str(out), "--key", str(data / "keys" / "log.vkey")]) == 0


async def test_signed_meterdata_and_evidence_arrive_valid_and_complete(
    tmp_path: Path,
    endpoint: IesEndpoint,
    pki: TestPki,
    signing_key: tuple[Path, bytes],
) -> None:
    data = tmp_path / "data"
    write_site_log(data, 8)
    url = f"https://127.0.0.1:{endpoint.port}/beckn"
    upstreams, state = upstreams_for(data, direct(url, pki, signing_key[0]))
    upstreams.start()
    assert await upstreams.finish(20)
    assert_complete_and_verifies(endpoint, data, tmp_path)
    assert set(endpoint.actions) == {"on_status"}
    # Interval rows spanning batch boundaries still came out (7 entries a batch).
    assert endpoint.profiles > 8
    assert state.upstreams["ies"].acked == len(log_lines(data)) - 1


async def test_meterdata_rows_chain_across_batches_and_agent_restarts(
    tmp_path: Path,
    endpoint: IesEndpoint,
    pki: TestPki,
    signing_key: tuple[Path, bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The IES upstream builds MeterData batch by batch (7 entries each) and, after
    a restart, from a short look back into the log: what the endpoint receives, put
    together, is exactly what the export makes of the whole log, and what the log's
    boundary readings say."""
    # A short first look back makes the upstream find the boot settings and read
    # further back for the openings of its first rows, as on a large log.
    monkeypatch.setattr(ies_https, "PRIME_ENTRIES", 8)
    data = tmp_path / "data"
    site = MixedSite(data)
    site.run(5, grid_missing=[3], charger_missing=[1])
    url = f"https://127.0.0.1:{endpoint.port}/beckn"
    refs = {"grid": "did:web:discom.example:meter:SM-0001"}
    upstreams, _ = upstreams_for(data, direct(url, pki, signing_key[0]))
    upstreams.start()
    assert await upstreams.finish(20)
    # The gateway was off for two boundaries, then runs on; its upstream stops in
    # the middle (the endpoint fails), and a third run delivers the rest.
    site.run(6, skip_before=2, charger_missing=[8])
    endpoint.ack_limit = len(endpoint.meter_data) + 9
    upstreams, state = upstreams_for(data, direct(url, pki, signing_key[0]))
    upstreams.start()
    assert not await upstreams.finish(1.0)
    assert 0 < state.upstreams["ies"].acked < len(log_lines(data)) - 1
    endpoint.ack_limit = None
    upstreams, _ = upstreams_for(data, direct(url, pki, signing_key[0]))
    upstreams.start()
    assert await upstreams.finish(20)
    assert_complete_and_verifies(endpoint, data, tmp_path)

    exported = profiles_from_lines(log_lines(data), gateway_id=GATEWAY, meter_refs=refs)
    received = interval_blocks(endpoint.meter_data)
    assert received == interval_blocks([exported])
    assert received == expected_blocks(
        site,
        {
            "grid": refs["grid"],
            "smart": f"{GATEWAY}/smart",
            "cp-1/1": f"{GATEWAY}/cp-1/1",
        },
    )
    assert instant_snapshots(endpoint.meter_data) == instant_snapshots([exported])


async def test_nack_401_500_slow_and_silent_are_retried_until_acked(
    tmp_path: Path,
    endpoint: IesEndpoint,
    pki: TestPki,
    signing_key: tuple[Path, bytes],
) -> None:
    data = tmp_path / "data"
    write_site_log(data, 4)
    url = f"https://127.0.0.1:{endpoint.port}/beckn"
    upstreams, state = upstreams_for(data, direct(url, pki, signing_key[0]))
    ies = state.upstreams["ies"]
    endpoint.mode = "nack"
    upstreams.start()
    reasons = {
        "nack": "not accepting data now",
        "401": "401",
        "500": "500",
        "silent": "no answer within 1 s",
    }
    for mode, reason in reasons.items():
        endpoint.mode = mode
        before = endpoint.requests
        await until(
            lambda r=reason, b=before: (
                endpoint.requests > b + 1 and r in (ies.last_error or "")
            ),
            10,
            f"{mode} reported",
        )
        assert ies.acked == -1, mode
    endpoint.mode = "slow"
    endpoint.slow_s = 0.3  # slower than usual, faster than the 1 s timeout
    assert await upstreams.finish(30)
    assert_complete_and_verifies(endpoint, data, tmp_path)


async def test_a_wrong_signing_key_is_refused_and_nothing_counts_as_sent(
    tmp_path: Path, endpoint: IesEndpoint, pki: TestPki
) -> None:
    data = tmp_path / "data"
    write_site_log(data, 2)
    other = tmp_path / "other.key"
    other.write_bytes(
        base64.b64encode(Ed25519PrivateKey.generate().private_bytes_raw())
    )
    url = f"https://127.0.0.1:{endpoint.port}/beckn"
    upstreams, state = upstreams_for(data, direct(url, pki, other))
    upstreams.start()
    assert not await upstreams.finish(1.5)
    assert "401" in (state.upstreams["ies"].last_error or "")
    assert endpoint.invalid and all("bad signature" in x for x in endpoint.invalid)
    assert state.upstreams["ies"].acked == -1 and endpoint.entries == {}


async def test_https_url_to_a_plain_http_port_says_the_server_spoke_no_tls(
    tmp_path: Path, pki: TestPki
) -> None:
    endpoint = IesEndpoint(keys=None)  # plain HTTP
    plain_url = await endpoint.start()
    try:
        data = tmp_path / "data"
        write_site_log(data, 1)
        config = UpstreamConfig(
            name="ies",
            kind="ies-https",
            url=plain_url.replace("http://", "https://"),
            tls_ca_file=pki.ca,
            backoff_max_s=0.3,
            timeout_s=1.0,
        )
        upstreams, state = upstreams_for(data, config)
        upstreams.start()
        assert not await upstreams.finish(1.0)
        error = state.upstreams["ies"].last_error or ""
        assert "the server did not speak TLS: is this a plain HTTP port?" in error
        assert "never sends without TLS" in error
        assert endpoint.requests == 0 and state.upstreams["ies"].acked == -1
    finally:
        await endpoint.stop()


async def test_adapter_mode_over_mutual_tls(tmp_path: Path, pki: TestPki) -> None:
    endpoint = IesEndpoint(
        cert=pki.server_cert, key=pki.server_key, client_ca=pki.ca, keys=None
    )
    await endpoint.start()
    try:
        data = tmp_path / "data"
        write_site_log(data, 3)
        url = f"https://127.0.0.1:{endpoint.port}/beckn"
        base = {
            "mode": "adapter",
            "tls_ca_file": pki.ca,
            "backoff_max_s": 0.3,
            "timeout_s": 1.0,
        }
        # Without a client certificate the adapter refuses the handshake.
        bare = UpstreamConfig(name="ies", kind="ies-https", url=url, **base)  # type: ignore[arg-type]
        upstreams, state = upstreams_for(data, bare)
        upstreams.start()
        assert not await upstreams.finish(1.0)
        assert state.upstreams["ies"].acked == -1 and endpoint.entries == {}
        assert state.upstreams["ies"].last_error
        # With it, everything goes through; the wrong CA is a TLS error.
        wrong_ca = UpstreamConfig(
            name="ies",
            kind="ies-https",
            url=url,
            **{**base, "tls_ca_file": pki.other_ca},  # type: ignore[arg-type]
        )
        upstreams, state = upstreams_for(data, wrong_ca)
        upstreams.start()
        assert not await upstreams.finish(1.0)
        assert "not trusted" in (state.upstreams["ies"].last_error or "")
        good = UpstreamConfig(
            name="ies",
            kind="ies-https",
            url=url,
            tls_cert_file=pki.client_cert,
            tls_key_file=pki.client_key,
            **base,  # type: ignore[arg-type]
        )
        upstreams, state = upstreams_for(data, good)
        upstreams.start()
        assert await upstreams.finish(20)
        assert_complete_and_verifies(endpoint, data, tmp_path)
    finally:
        await endpoint.stop()
