"""Triangulation with Gurux DLMS, an independent implementation (GPL, tests only).

Each side is checked against Gurux: Gurux's client reads our meter server (public,
LLS, HLS-GMAC with suite 0 ciphering, block transfer, selective access by range,
HDLC on a pty and the TCP wrapper), and our client reads a meter built on Gurux's
server (public and LLS on both transports; Gurux's server is not used for HLS and
block transfer, which the first half covers). Both sides use the Indian date-time
convention: Gurux as its reader does for India (``useUtc2NormalTime``), we through
the IS 15959 profile's ``india_deviation_sign``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

pytest.importorskip("gurux_dlms", reason="gurux-dlms is a test-only peer")

from gurux_dlms.enums import Authentication, Security
from gurux_dlms.objects import (
    GXDLMSClock,
    GXDLMSData,
    GXDLMSProfileGeneric,
)

from ies_drivers.dlms.client import ClientSettings
from ies_drivers.dlms.errors import AssociationRejected
from ies_drivers.dlms.obis import Obis
from ies_drivers.dlms.profiles import (
    ObjectRef,
    Scale,
    decode_rows,
    load_profile,
    parse_columns,
)
from ies_drivers.dlms.server import (
    MeterServer,
    ServerSecurity,
    SimulatedMeter,
    demo_keys,
)
from ies_drivers.dlms.transport import DlmsClient, LinkSettings
from peers.gurux_peer import IST, GuruxClient, GuruxMeter
from peers.ptys import SocatPair

IS15959 = load_profile("is15959")
T = TypeVar("T")


@pytest.fixture
def pty(tmp_path: Path) -> Iterator[SocatPair]:
    pair = SocatPair(tmp_path, "dlms").start()
    yield pair
    pair.stop()


async def in_thread(work: Callable[[], T]) -> T:
    """Run blocking Gurux code off the event loop (our server runs on it); Gurux
    prints progress on stdout, which is swallowed."""

    def quiet() -> T:
        with contextlib.redirect_stdout(io.StringIO()):
            return work()

    return await asyncio.to_thread(quiet)


def utc(value: Any) -> datetime:
    """A Gurux date-time as an aware UTC datetime."""
    moment: datetime = value.value
    assert moment.tzinfo is not None
    return moment.astimezone(UTC)


# --- Gurux's client reads our meter -------------------------------------------------


async def test_gurux_reads_our_meter_over_the_wrapper_with_block_transfer() -> None:
    meter = SimulatedMeter(history_days=1)
    server = MeterServer(meter, ServerSecurity(max_pdu=256))
    port = await server.start_tcp()

    def work() -> tuple[Any, ...]:
        gurux = GuruxClient.tcp(port, hdlc=False)
        try:
            gurux.connect()
            serial = gurux.read(GXDLMSData("0.0.96.1.0.255"), 2)
            clock = gurux.read(GXDLMSClock(), 2)
            profile = GXDLMSProfileGeneric("1.0.99.1.0.255")
            gurux.read(profile, 3)
            rows = gurux.read(profile, 2)
            blocks = gurux.blocks
            gurux.release()
        finally:
            gurux.close()
        return serial, clock, rows, blocks

    try:
        serial, clock, rows, blocks = await in_thread(work)
    finally:
        await server.close()
    assert bytes(serial) == b"IES0000001"
    # Gurux, set for India, reads our +330 deviation as IST.
    assert abs((utc(clock) - meter.now().astimezone(UTC)).total_seconds()) < 5
    assert len(rows) == 96 and blocks > 5
    first = rows[0]
    assert first[2] == SimulatedMeter.block_power_w(_index(utc(first[0]))) * 900 // 3600


def _index(moment: datetime) -> int:
    from ies_drivers.dlms.server import BLOCK_S, EPOCH

    return int((moment - EPOCH).total_seconds() // BLOCK_S)


async def test_gurux_hls_gmac_with_suite0_encryption_reads_our_meter() -> None:
    server = MeterServer(policy=ServerSecurity(keys=demo_keys(), max_pdu=256))
    port = await server.start_tcp()

    def work() -> tuple[Any, Any]:
        gurux = GuruxClient.tcp(
            port,
            hdlc=False,
            client_sap=48,
            authentication=Authentication.HIGH_GMAC,
            security=Security.AUTHENTICATION_ENCRYPTION,
        )
        try:
            gurux.connect()
            serial = gurux.read(GXDLMSData("0.0.96.1.0.255"), 2)
            profile = GXDLMSProfileGeneric("1.0.99.1.0.255")
            gurux.read(profile, 3)
            now = datetime.now(IST)
            rows = gurux.read_range(profile, now - timedelta(hours=2), now)
            gurux.release()
        finally:
            gurux.close()
        return serial, rows

    try:
        serial, rows = await in_thread(work)
    finally:
        await server.close()
    session = server.stats.sessions[-1]
    assert session.ciphered and session.security_control == 0x30
    assert bytes(serial) == b"IES0000001"
    assert 6 <= len(rows) <= 9  # two hours of 15-minute blocks, by selective access


async def test_gurux_reads_our_meter_over_hdlc_on_a_pty_with_lls(
    pty: SocatPair,
) -> None:
    server = MeterServer()
    await server.start_serial(pty.a)

    def work() -> list[Any]:
        gurux = GuruxClient.serial(
            pty.b,
            hdlc=True,
            client_sap=32,
            authentication=Authentication.LOW,
            password=b"ABCDEFGH",
        )
        try:
            gurux.connect()
            profile = GXDLMSProfileGeneric("1.0.94.91.0.255")
            gurux.read(profile, 3)
            rows: list[Any] = gurux.read(profile, 2)
            gurux.release()
        finally:
            gurux.close()
        return rows

    try:
        rows = await in_thread(work)
    finally:
        await server.close()
    (row,) = rows
    assert len(row) == 18
    assert row[5] == 500  # frequency, 50.0 Hz at scaler -1
    assert row[4] == 95  # power factor 0.95


async def test_gurux_with_a_wrong_password_is_refused_by_our_meter() -> None:
    server = MeterServer()
    port = await server.start_tcp()

    def work() -> None:
        gurux = GuruxClient.tcp(
            port,
            hdlc=False,
            client_sap=32,
            authentication=Authentication.LOW,
            password=b"WRONG123",
        )
        try:
            gurux.connect()
        finally:
            gurux.close()

    try:
        with pytest.raises(Exception, match=r"(?i)auth|reject|denied"):
            await in_thread(work)
    finally:
        await server.close()


# --- our client reads a Gurux meter -------------------------------------------------


async def read_gurux_meter(
    link: LinkSettings, settings: ClientSettings
) -> dict[str, Any]:
    async with DlmsClient(link, settings) as client:
        serial = await client.get(1, Obis(0, 0, 96, 1, 0), 2)
        voltage = await client.get(3, Obis(1, 0, 12, 7, 0), 2)
        scaler_unit = await client.get(3, Obis(1, 0, 12, 7, 0), 3)
        clock = await client.get(8, Obis(0, 0, 1, 0, 0), 2)
        columns = parse_columns(await client.get(7, Obis(1, 0, 94, 91, 0), 3))
        buffer = await client.get(7, Obis(1, 0, 94, 91, 0), 2)
    scaler, unit = (v.as_int() for v in scaler_unit.items)
    rows = decode_rows(
        columns, buffer, IS15959, {Obis(1, 0, 12, 7, 0): Scale(scaler, unit)}
    )
    return {
        "serial": serial.as_text(),
        "voltage": (voltage.as_int(), scaler, unit),
        "clock": clock.as_datetime().to_datetime(india_deviation_sign=True),
        "columns": columns,
        "rows": rows,
    }


def check_gurux_meter(found: dict[str, Any], meter: GuruxMeter) -> None:
    assert found["serial"] == GuruxMeter.SERIAL
    assert found["voltage"] == (GuruxMeter.VOLTAGE_RAW, GuruxMeter.VOLTAGE_SCALER, 35)
    assert (
        found["clock"] == meter.clock_time
    )  # Gurux's India encoding, our India decoding
    assert found["columns"] == (
        ObjectRef(8, Obis(0, 0, 1, 0, 0)),
        ObjectRef(3, Obis(1, 0, 12, 7, 0)),
    )
    (row,) = found["rows"]
    assert row.time == meter.clock_time
    (cell,) = row.cells
    assert (cell.name, cell.value, cell.unit) == ("voltage", "230.12", "V")


async def test_our_client_reads_a_gurux_meter_over_the_wrapper() -> None:
    meter = GuruxMeter(hdlc=False)
    port = meter.serve_tcp()
    try:
        link = LinkSettings("wrapper-tcp", host="127.0.0.1", port=port, timeout_s=3)
        found = await read_gurux_meter(link, ClientSettings())
    finally:
        meter.stop()
    check_gurux_meter(found, meter)


async def test_our_client_reads_a_gurux_meter_over_hdlc_on_a_pty(
    pty: SocatPair,
) -> None:
    meter = GuruxMeter(hdlc=True)
    meter.serve_serial(pty.a)
    try:
        link = LinkSettings(
            "hdlc-serial", serial_port=pty.b, server_physical=17, timeout_s=3
        )
        lls = ClientSettings(client_sap=32, authentication="low", password=b"ABCDEFGH")
        found = await read_gurux_meter(link, lls)
    finally:
        meter.stop()
    check_gurux_meter(found, meter)


async def test_a_gurux_meter_rejecting_our_password_is_a_typed_error() -> None:
    meter = GuruxMeter(hdlc=False)
    port = meter.serve_tcp()
    try:
        client = DlmsClient(
            LinkSettings("wrapper-tcp", host="127.0.0.1", port=port, timeout_s=3),
            ClientSettings(client_sap=32, authentication="low", password=b"WRONG123"),
        )
        with pytest.raises(AssociationRejected, match="authentication"):
            await client.connect()
    finally:
        meter.stop()
