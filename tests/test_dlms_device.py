"""Our client and the agent's DLMS device against our meter server on real peers.

The meter server listens on a free loopback port (TCP wrapper, HDLC over TCP) or on
one end of a socat pseudo-terminal pair (HDLC, also behind the IEC 62056-21 mode E
opening and an echoing RS-485 adapter); the client uses the other end. Readings go
into a real evidence log, which must verify.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from ies_agent.clock import OffsetClock
from ies_agent.dlms_device import DlmsDevice
from ies_agent.evidence.log import EvidenceLog
from ies_agent.evidence.verify import verify_path
from ies_drivers.dlms import apdu as ap
from ies_drivers.dlms import security
from ies_drivers.dlms.client import ClientSettings
from ies_drivers.dlms.errors import (
    AssociationRejected,
    DataAccessError,
    DlmsTimeout,
    DlmsTransportError,
)
from ies_drivers.dlms.obis import Obis
from ies_drivers.dlms.server import (
    MeterServer,
    ServerSecurity,
    SimulatedMeter,
    demo_keys,
)
from ies_drivers.dlms.transport import DlmsClient, LinkSettings
from ies_drivers.errors import DeviceBackedOff, DriverError
from ies_drivers.reading import ReadingState
from peers.dlms import EchoingMeterServer, SilentListener
from peers.ptys import SocatPair

CLIENT_KEYS = security.SecurityKeys(
    demo_keys().block_cipher_key, demo_keys().authentication_key, b"IESGW001"
)
LLS = ClientSettings(client_sap=32, authentication="low", password=b"ABCDEFGH")
HLS_CIPHERED = ClientSettings(
    client_sap=48, authentication="high-gmac", keys=CLIENT_KEYS, security_control=0x30
)
DAY_MS = 86_400_000


@pytest.fixture
def pty(tmp_path: Path) -> Iterator[SocatPair]:
    pair = SocatPair(tmp_path, "dlms").start()
    yield pair
    pair.stop()


@pytest.fixture
async def tcp_meter() -> AsyncIterator[MeterServer]:
    server = MeterServer(
        SimulatedMeter(skew=timedelta(seconds=-42)),
        ServerSecurity(keys=demo_keys(), max_pdu=512),
    )
    await server.start_tcp()
    yield server
    await server.close()


def wrapper_link(server: MeterServer, timeout_s: float = 2.0) -> LinkSettings:
    return LinkSettings(
        "wrapper-tcp", host="127.0.0.1", port=server.port, timeout_s=timeout_s
    )


def hdlc_link(path: str, **extra: object) -> LinkSettings:
    return LinkSettings(
        "hdlc-serial",
        serial_port=path,
        server_physical=17,
        timeout_s=2.0,
        **extra,  # type: ignore[arg-type]
    )


# --- the client on each transport ---------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [ClientSettings(), LLS, HLS_CIPHERED],
    ids=["public", "lls", "hls-suite0"],
)
async def test_wrapper_client_reads_with_each_security_level(
    tcp_meter: MeterServer, settings: ClientSettings
) -> None:
    async with DlmsClient(wrapper_link(tcp_meter), settings) as client:
        serial = await client.get(1, Obis(0, 0, 96, 1, 0), 2)
        buffer = await client.get(7, Obis(1, 0, 99, 1, 0), 2)
        assert serial.as_text() == "IES0000001"
        assert len(buffer.items) >= 96
    session = tcp_meter.stats.sessions[-1]
    assert session.state == "idle"  # released
    assert session.ciphered == bool(settings.security_control)


async def test_hdlc_on_a_pty_reads_a_day_of_block_load_in_segments(
    pty: SocatPair,
) -> None:
    server = MeterServer(SimulatedMeter(history_days=1), max_info=128)
    await server.start_serial(pty.a)
    try:
        client = DlmsClient(hdlc_link(pty.b), ClientSettings())
        await client.connect()
        buffer, responses = await client.get_with_raw(7, Obis(1, 0, 99, 1, 0), 2)
        inst = await client.get(7, Obis(1, 0, 94, 91, 0), 2)
        frames = client._link.frames_in
        await client.release()
    finally:
        await server.close()
    assert len(buffer.items) == 96
    assert len(inst.items) == 1 and len(inst.items[0].items) == 18
    assert frames > len(ap.axdr.encode(buffer)) // 128  # segmented in 128-byte frames
    assert len(responses) > 1  # and needs block transfer at a 1024-byte PDU


async def test_hdlc_through_an_optical_probe_opening_mode_e(pty: SocatPair) -> None:
    server = MeterServer(mode_e=True)
    await server.start_serial(pty.a)
    try:
        async with DlmsClient(
            hdlc_link(pty.b, mode_e=True), ClientSettings()
        ) as client:
            serial = await client.get(1, Obis(0, 0, 96, 1, 0), 2)
            ident = client.identification
    finally:
        await server.close()
    assert serial.as_text() == "IES0000001"
    assert ident is not None and ident.mode_e and ident.baudrate == 9600


async def test_hdlc_tolerates_the_echo_of_an_rs485_adapter(pty: SocatPair) -> None:
    server = EchoingMeterServer()
    await server.start_serial(pty.a)
    try:
        async with DlmsClient(hdlc_link(pty.b), LLS) as client:
            buffer = await client.get(7, Obis(1, 0, 99, 1, 0), 2)
            echoes = client._link.echoes  # type: ignore[union-attr]
    finally:
        await server.close()
    assert len(buffer.items) >= 96
    assert echoes > 5


async def test_hdlc_over_tcp_with_small_frames() -> None:
    server = MeterServer(
        policy=ServerSecurity(keys=demo_keys()), hdlc_over_tcp=True, max_info=32
    )
    await server.start_tcp()
    link = LinkSettings(
        "hdlc-tcp", host="127.0.0.1", port=server.port, server_physical=17, max_info=64
    )
    try:
        async with DlmsClient(link, HLS_CIPHERED) as client:
            value = await client.get(1, Obis(0, 0, 96, 1, 1), 2)
    finally:
        await server.close()
    assert value.as_text() == "IES Simulated Meters"


# --- failures -----------------------------------------------------------------------


async def test_a_silent_meter_times_out_at_the_deadline() -> None:
    silent = await SilentListener().start()
    try:
        client = DlmsClient(
            LinkSettings(
                "wrapper-tcp", host="127.0.0.1", port=silent.port, timeout_s=0.3
            ),
            ClientSettings(),
        )
        with pytest.raises(DlmsTimeout, match=r"within 0\.3 s"):
            await client.connect()
        assert not client.is_open
    finally:
        await silent.stop()


async def test_a_missing_port_and_a_refused_connection_are_transport_errors(
    tmp_path: Path,
) -> None:
    client = DlmsClient(hdlc_link(str(tmp_path / "no-such-tty")), ClientSettings())
    with pytest.raises(DlmsTransportError, match="cannot open serial port"):
        await client.connect()
    from conftest import free_port

    refused = DlmsClient(
        LinkSettings("wrapper-tcp", host="127.0.0.1", port=free_port()),
        ClientSettings(),
    )
    with pytest.raises(DlmsTransportError, match="cannot connect"):
        await refused.connect()


async def test_a_rejected_association_closes_the_client(tcp_meter: MeterServer) -> None:
    wrong = ClientSettings(client_sap=32, authentication="low", password=b"NOTRIGHT")
    client = DlmsClient(wrapper_link(tcp_meter), wrong)
    with pytest.raises(AssociationRejected, match="authentication failure"):
        await client.connect()
    assert not client.is_open


async def test_writing_the_clock_is_refused_to_the_public_client(
    tcp_meter: MeterServer,
) -> None:
    async with DlmsClient(wrapper_link(tcp_meter), ClientSettings()) as client:
        with pytest.raises(DataAccessError, match=r"read-write-denied|object"):
            await client.set(1, Obis(0, 0, 96, 1, 0), 2, ap.axdr.octet_string(b"x"))
        assert client.is_open  # a refused write does not end the association


# --- the agent's device -------------------------------------------------------------


def device(
    link: LinkSettings, settings: ClientSettings = LLS, **extra: object
) -> DlmsDevice:
    return DlmsDevice("meter-1", link, settings, poll_s=5, **extra)  # type: ignore[arg-type]


async def test_open_names_the_meter_and_its_clock_deviation(
    tcp_meter: MeterServer,
) -> None:
    meter = device(wrapper_link(tcp_meter))
    identity = await meter.open()
    await meter.close()
    assert identity["protocol"] == "dlms"
    assert identity["ser"] == "IES0000001"
    assert identity["mfr"] == "IES Simulated Meters"
    assert identity["fw"] == "SIM-1.0"
    assert identity["profile"] == "is15959"
    assert identity["bus"].startswith("dlms-tcp:127.0.0.1:")
    assert abs(Decimal(identity["clock_dev_s"]) + 42) < 2


async def test_read_gives_instantaneous_values_with_the_raw_apdu(
    tcp_meter: MeterServer, tmp_path: Path
) -> None:
    meter = device(wrapper_link(tcp_meter))
    clock = OffsetClock()
    readings = await meter.read(clock)
    again = await meter.read(clock)
    await meter.close()
    by_name = {r.quantity: r for r in readings}
    assert set(by_name) >= {
        "voltage",
        "current",
        "frequency",
        "active_power",
        "energy_import",
        "energy_export",
        "clock_deviation",
    }
    assert (
        by_name["voltage"].unit == "V" and by_name["voltage"].obis == "1-0:12.7.0*255"
    )
    assert by_name["frequency"].value == "50.0"
    assert by_name["power_factor"].value == "0.95"
    assert by_name["energy_import"].cumulative
    assert by_name["energy_import"].device_time is not None
    assert by_name["energy_import"].device_time.endswith("+05:30")
    assert abs(Decimal(by_name["clock_deviation"].value or "0") + 42) < 2
    raw = by_name["voltage"].raw
    assert raw.startswith("dlms:c401")  # the plain GET response APDU
    assert ap.decode_apdu(bytes.fromhex(raw[5:]))
    assert meter.associations == 1  # the association is kept between reads
    assert len(again) == len(readings)
    # Into the evidence log, which verifies.
    log = EvidenceLog.open(tmp_path, gateway_id="GW-DLMS", clock=clock)
    for reading in readings + again:
        log.append_reading(reading)
    log.checkpoint()
    log.close()
    report = verify_path(tmp_path)
    assert report.errors == [] and report.entries >= len(readings) * 2


@pytest.mark.parametrize("transport", ["wrapper", "hdlc"])
async def test_catch_up_reads_a_day_of_block_load_marked_late(
    transport: str, pty: SocatPair
) -> None:
    server = MeterServer(SimulatedMeter(history_days=2), ServerSecurity(max_pdu=1024))
    if transport == "wrapper":
        await server.start_tcp()
        link = wrapper_link(server, timeout_s=3)
    else:
        await server.start_serial(pty.a)
        link = hdlc_link(pty.b)
    meter = device(link)
    block_ms = 900_000
    since_ms = int(time.time() * 1000) // block_ms * block_ms - DAY_MS
    try:
        late = await meter.catch_up(since_ms, OffsetClock())
    finally:
        await meter.close()
        await server.close()
    rows = {r.device_time for r in late}
    assert len(rows) == 96  # a day of 15-minute blocks
    assert all(r.state is ReadingState.LATE for r in late)
    assert all(r.raw.startswith("dlms-row:02") for r in late)
    energy = [r for r in late if r.quantity == "block_load.energy_import"]
    assert len(energy) == len(rows) and all(r.unit == "Wh" for r in energy)
    # The blocks are the meter's own energy model: their sum is its register's rise.
    blocks = sorted(energy, key=lambda r: r.device_time or "")
    first = SimulatedMeter.energy_wh_at_block(_block_index(blocks[0].device_time))
    last = SimulatedMeter.energy_wh_at_block(_block_index(blocks[-1].device_time) + 1)
    assert sum(int(r.value or 0) for r in blocks) == last - first


def _block_index(iso: str | None) -> int:
    from datetime import datetime

    from ies_drivers.dlms.server import BLOCK_S, EPOCH

    assert iso is not None
    return int((datetime.fromisoformat(iso) - EPOCH).total_seconds() // BLOCK_S)


async def test_sync_clock_corrects_the_meter(tcp_meter: MeterServer) -> None:
    meter = device(wrapper_link(tcp_meter))
    before = await meter.sync_clock(OffsetClock())
    after = await meter.sync_clock(OffsetClock())
    await meter.close()
    assert abs(before + 42) < 2 and abs(after) < 1


async def test_a_failing_meter_is_released_backed_off_and_read_again() -> None:
    server = MeterServer()
    port = await server.start_tcp()
    meter = device(wrapper_link(server, timeout_s=0.5), backoff_max_s=0.2)
    await meter.read(OffsetClock())
    await server.close()
    with pytest.raises(DriverError):
        await meter.read(OffsetClock())
    with pytest.raises(DeviceBackedOff, match="backed off"):
        await meter.read(OffsetClock())
    revived = MeterServer()
    await revived.start_tcp(port=port)
    try:
        await asyncio.sleep(0.25)
        readings = await meter.read(OffsetClock())
    finally:
        await meter.close()
        await revived.close()
    assert readings and meter.associations == 2


async def test_a_dead_meter_does_not_stop_another(tcp_meter: MeterServer) -> None:
    silent = await SilentListener().start()
    dead = DlmsDevice(
        "dead",
        LinkSettings("wrapper-tcp", host="127.0.0.1", port=silent.port, timeout_s=0.3),
        ClientSettings(),
    )
    good = device(wrapper_link(tcp_meter))
    try:
        results = await asyncio.gather(
            dead.read(OffsetClock()), good.read(OffsetClock()), return_exceptions=True
        )
    finally:
        await good.close()
        await dead.close()
        await silent.stop()
    assert isinstance(results[0], DlmsTimeout)
    assert isinstance(results[1], list) and results[1]
