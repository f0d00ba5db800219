"""The bus owner against real peers: pymodbus servers, socat ptys, scripted devices.

Peers come from ``tests/peers/modbus.py``: pymodbus 3.16 TCP, RTU-over-TCP and serial
RTU servers (requests counted with pymodbus's ``trace_pdu`` hook), a scripted device of
our own for the faults pymodbus cannot produce (echo, garbage, wrong unit, short answer,
bad CRC, exception codes 1-11), a TCP listener that never answers, and a gateway that
drops the requests for an unplugged unit. Timeouts are short so the file stays fast.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from conftest import free_port
from ies_drivers.errors import (
    DeviceBackedOff,
    DeviceTimeout,
    DriverError,
    ExceptionResponse,
    FrameError,
    TransportError,
    WrongUnitError,
)
from ies_drivers.modbus.bus import BusSpec, ModbusBus
from ies_drivers.modbus.model import PointSpec, PointType
from ies_drivers.modbus.scan import scan_units
from ies_drivers.reading import ReadingState
from peers.modbus import (
    Misbehaviour,
    PymodbusServer,
    ScriptedDevice,
    SeenRequest,
    SilentListener,
    UnitFilterProxy,
    register_value,
    start_serial_server,
    start_tcp_server,
)
from peers.ptys import SocatPair

BUS_LOG = "ies_drivers.modbus.bus"


def expected(unit: int, function: int, address: int, count: int) -> tuple[int, ...]:
    return tuple(
        register_value(unit, function, a) for a in range(address, address + count)
    )


def u16_points(
    addresses: range | list[int], function: str = "holding"
) -> list[PointSpec]:
    return [
        PointSpec(f"r{a}", a, PointType.U16, function=function)  # type: ignore[arg-type]
        for a in addresses
    ]


def tcp_bus(port: int, kind: str = "tcp", **kw: float) -> ModbusBus:
    spec = BusSpec(
        "test",
        kind=kind,  # type: ignore[arg-type]
        port=port,
        timeout_s=kw.pop("timeout_s", 0.5),
        connect_timeout_s=1.0,
        backoff_initial_s=kw.pop("backoff_initial_s", 2.0),
        backoff_max_s=kw.pop("backoff_max_s", 10.0),
        **kw,  # type: ignore[arg-type]
    )
    return ModbusBus(spec)


def serial_bus(path: str, **kw: float) -> ModbusBus:
    spec = BusSpec(
        "line",
        kind="rtu",
        serial_port=path,
        baudrate=19200,
        timeout_s=kw.pop("timeout_s", 0.5),
        backoff_initial_s=kw.pop("backoff_initial_s", 2.0),
        **kw,  # type: ignore[arg-type]
    )
    return ModbusBus(spec)


@pytest.fixture
async def tcp_server() -> AsyncIterator[PymodbusServer]:
    server = await start_tcp_server(units=(1, 2))
    yield server
    await server.stop()


@pytest.fixture
def pty_pair(tmp_path: Path) -> Iterator[SocatPair]:
    pair = SocatPair(tmp_path).start()
    yield pair
    pair.stop()


@pytest.fixture
async def scripted() -> AsyncIterator[list[ScriptedDevice]]:
    """Scripted devices a test starts; all are stopped afterwards."""
    started: list[ScriptedDevice] = []
    yield started
    for device in started:
        await device.stop()


async def start_scripted(
    started: list[ScriptedDevice],
    transport: str,
    pair: SocatPair | None = None,
    **misbehaviour: object,
) -> tuple[ScriptedDevice, ModbusBus]:
    """Start a scripted device on ``transport`` and return it with a bus to it."""
    device = ScriptedDevice(
        units=(1, 2),
        misbehaviour=Misbehaviour(**misbehaviour),  # type: ignore[arg-type]
        framing="mbap" if transport == "tcp" else "rtu",
    )
    started.append(device)
    if transport == "serial":
        assert pair is not None
        await device.serve_pty(pair.a)
        return device, serial_bus(pair.b, timeout_s=0.3)
    port = await device.serve_tcp()
    return device, tcp_bus(port, kind=transport, timeout_s=0.3)


# --- Modbus TCP against a pymodbus server -------------------------------------------


async def test_tcp_reads_holding_and_input_registers(
    tcp_server: PymodbusServer,
) -> None:
    async with tcp_bus(tcp_server.port) as bus:
        holding = await bus.read_registers(1, "holding", 10, 5)
        inputs = await bus.read_registers(2, 4, 0, 125)
    assert holding.registers == expected(1, 3, 10, 5)
    assert (holding.function_code, holding.address) == (3, 10)
    assert holding.latency_s > 0
    assert inputs.registers == expected(2, 4, 0, 125)


async def test_tcp_write_then_read_back(tcp_server: PymodbusServer) -> None:
    async with tcp_bus(tcp_server.port) as bus:
        await bus.write_registers(1, 20, [0xBEEF, 7])
        block = await bus.read_registers(1, "holding", 20, 2)
    assert block.registers == (0xBEEF, 7)


async def test_exception_2_from_the_server_does_not_back_off(
    tcp_server: PymodbusServer,
) -> None:
    async with tcp_bus(tcp_server.port) as bus:
        with pytest.raises(ExceptionResponse) as caught:
            await bus.read_registers(1, "holding", 290, 20)  # past the 300 registers
        assert (caught.value.code, caught.value.unit, caught.value.address) == (
            2,
            1,
            290,
        )
        # The device answered, so it is alive and asked again at once.
        assert (await bus.read_registers(1, "holding", 0, 1)).registers == expected(
            1, 3, 0, 1
        )
        stats = bus.stats[1]
    assert stats.errors == {"exception": 1}
    assert stats.consecutive_failures == 0 and stats.backoff_remaining_s == 0


async def test_read_points_uses_125_register_blocks_on_the_wire(
    tcp_server: PymodbusServer,
) -> None:
    points = u16_points(range(260))
    async with tcp_bus(tcp_server.port) as bus:
        result = await bus.read_points(1, points)
    assert tcp_server.requests == [
        SeenRequest(1, 3, 0, 125),
        SeenRequest(1, 3, 125, 125),
        SeenRequest(1, 3, 250, 10),
    ]
    assert result.requests == 3 and result.refused == 0
    assert [r.value.value for r in result.values] == [
        str(v) for v in expected(1, 3, 0, 260)
    ]


async def test_read_points_bridges_small_gaps_only(tcp_server: PymodbusServer) -> None:
    points = u16_points([0, 10, 20, 100]) + u16_points([5], "input")
    async with tcp_bus(tcp_server.port) as bus:
        await bus.read_points(2, points, max_gap=16)
    assert tcp_server.requests == [
        SeenRequest(2, 3, 0, 21),
        SeenRequest(2, 3, 100, 1),
        SeenRequest(2, 4, 5, 1),
    ]


async def test_read_points_refused_block_marks_only_its_points(
    tcp_server: PymodbusServer,
) -> None:
    points = u16_points([0, 1]) + u16_points(range(295, 305))
    async with tcp_bus(tcp_server.port) as bus:
        result = await bus.read_points(1, points)
    states = [r.value.state for r in result.values]
    assert states[:2] == [ReadingState.OK, ReadingState.OK]
    assert set(states[2:]) == {ReadingState.ERROR}
    assert "illegal data address" in str(result.values[2].value.note)
    assert result.refused == 1


async def test_read_points_scale_factor_in_another_block(
    tcp_server: PymodbusServer,
) -> None:
    # The scale factor sits 200 registers away from its point: another request.
    points = [
        PointSpec("W", 0, PointType.S16, scale_factor="W_SF"),
        PointSpec("W_SF", 200, PointType.SUNSSF),
    ]
    async with tcp_bus(tcp_server.port) as bus:
        await bus.write_registers(1, 0, [1234])
        await bus.write_registers(1, 200, [0xFFFE])  # -2
        result = await bus.read_points(1, points, sunspec=True)
    assert [r.value.value for r in result.values] == ["12.34", "-2"]
    assert result.requests == 2


# --- RTU over TCP and serial RTU against pymodbus servers ---------------------------


async def test_rtu_over_tcp_against_pymodbus() -> None:
    server = await start_tcp_server(units=(1, 2), framer="rtu")
    try:
        async with tcp_bus(server.port, kind="rtu-over-tcp") as bus:
            block = await bus.read_registers(2, "input", 7, 3)
            with pytest.raises(ExceptionResponse) as caught:
                await bus.read_registers(1, "holding", 299, 2)
    finally:
        await server.stop()
    assert block.registers == expected(2, 4, 7, 3)
    assert caught.value.code == 2


async def test_serial_rtu_against_pymodbus_on_a_pty(pty_pair: SocatPair) -> None:
    server = await start_serial_server(pty_pair.a, units=(1, 2))
    try:
        async with serial_bus(pty_pair.b) as bus:
            result = await bus.read_points(2, u16_points(range(130)))
            with pytest.raises(ExceptionResponse) as caught:
                await bus.read_registers(1, "holding", 299, 2)
    finally:
        await server.stop()
    assert [r.value.value for r in result.values] == [
        str(v) for v in expected(2, 3, 0, 130)
    ]
    assert server.requests[:2] == [SeenRequest(2, 3, 0, 125), SeenRequest(2, 3, 125, 5)]
    assert caught.value.code == 2


def test_serial_gap_is_at_least_three_and_a_half_characters() -> None:
    spec = BusSpec("line", kind="rtu", serial_port="/dev/ttyUSB0", baudrate=9600)
    assert spec.effective_gap_s == pytest.approx(3.5 * 10 / 9600)
    even = BusSpec("line", kind="rtu", serial_port="x", baudrate=9600, parity="E")
    assert even.effective_gap_s == pytest.approx(3.5 * 11 / 9600)
    fast = BusSpec("line", kind="rtu", serial_port="x", baudrate=115200, gap_s=0.0)
    assert fast.effective_gap_s == pytest.approx(0.00175)
    assert BusSpec("gw").effective_gap_s == 0
    assert BusSpec("gw", gap_s=0.02).effective_gap_s == 0.02


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "udp"},
        {"kind": "rtu"},
        {"parity": "X"},
        {"timeout_s": 0},
        {"backoff_initial_s": 5, "backoff_max_s": 1},
    ],
)
def test_impossible_bus_settings_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="bus b"):
        BusSpec("b", **kwargs)  # type: ignore[arg-type]


# --- misbehaving devices, on RTU over TCP and on a serial pty ------------------------

TRANSPORTS = ["rtu-over-tcp", "serial"]


@pytest.fixture(params=TRANSPORTS)
def transport(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[str, SocatPair | None]]:
    if request.param == "serial":
        pair = SocatPair(tmp_path).start()
        yield "serial", pair
        pair.stop()
    else:
        yield request.param, None


async def test_rs485_echo_of_our_request_is_skipped(
    transport: tuple[str, SocatPair | None], scripted: list[ScriptedDevice]
) -> None:
    _, bus = await start_scripted(scripted, *transport, echo=True)
    async with bus:
        block = await bus.read_registers(1, "holding", 3, 4)
    assert block.registers == expected(1, 3, 3, 4)


async def test_garbage_before_the_frame_is_skipped(
    transport: tuple[str, SocatPair | None], scripted: list[ScriptedDevice]
) -> None:
    _, bus = await start_scripted(
        scripted, *transport, echo=True, garbage_before=b"\x00\xff\x03\x7e"
    )
    async with bus:
        block = await bus.read_registers(2, "input", 0, 2)
    assert block.registers == expected(2, 4, 0, 2)


async def test_garbage_instead_of_an_answer_is_a_frame_error(
    transport: tuple[str, SocatPair | None], scripted: list[ScriptedDevice]
) -> None:
    _, bus = await start_scripted(scripted, *transport, garbage_only=b"\x55\xaa\x55")
    async with bus:
        with pytest.raises(FrameError, match="hold no response"):
            await bus.read_registers(1, "holding", 0, 2)
        with pytest.raises(DeviceBackedOff):
            await bus.read_registers(1, "holding", 0, 2)
        assert bus.stats[1].errors == {"frame": 1, "backed_off": 1}


async def test_answer_from_another_unit_is_a_wrong_unit_error(
    transport: tuple[str, SocatPair | None], scripted: list[ScriptedDevice]
) -> None:
    _, bus = await start_scripted(scripted, *transport, answer_as=9)
    async with bus:
        with pytest.raises(WrongUnitError) as caught:
            await bus.read_registers(1, "holding", 0, 2)
    assert (caught.value.expected, caught.value.got) == (1, 9)


async def test_short_answer_is_a_frame_error(
    transport: tuple[str, SocatPair | None], scripted: list[ScriptedDevice]
) -> None:
    _, bus = await start_scripted(scripted, *transport, truncate_to=6)
    async with bus:
        with pytest.raises(FrameError, match="short response"):
            await bus.read_registers(1, "holding", 0, 2)


async def test_bad_crc_is_a_frame_error_without_waiting_for_the_timeout(
    transport: tuple[str, SocatPair | None], scripted: list[ScriptedDevice]
) -> None:
    _, bus = await start_scripted(scripted, *transport, bad_crc=True)
    async with bus:
        started = time.monotonic()
        with pytest.raises(FrameError, match="CRC error"):
            await bus.read_registers(1, "holding", 0, 2)
        assert time.monotonic() - started < 0.25  # the timeout is 0.3 s


@pytest.mark.parametrize("code", [1, 3, 4, 6, 10, 11])
async def test_exception_codes_over_rtu(
    code: int, scripted: list[ScriptedDevice]
) -> None:
    _, bus = await start_scripted(scripted, "rtu-over-tcp", exception=code)
    async with bus:
        with pytest.raises(ExceptionResponse) as caught:
            await bus.read_registers(1, "holding", 100, 2)
        assert (caught.value.code, caught.value.function) == (code, 3)
        assert caught.value.address == 100
        # 10 and 11: a gateway says nothing answers behind it; back the unit off.
        if code in (10, 11):
            with pytest.raises(DeviceBackedOff):
                await bus.read_registers(1, "holding", 100, 2)
        else:
            with pytest.raises(ExceptionResponse):
                await bus.read_registers(1, "holding", 100, 2)


async def test_late_answer_of_a_timed_out_unit_is_not_taken_for_the_next(
    scripted: list[ScriptedDevice],
) -> None:
    # Unit 1 answers after 0.4 s (timeout 0.3 s); unit 2 after 0.15 s, so unit 1's
    # late answer reaches us while we wait for unit 2's.
    _, bus = await start_scripted(
        scripted, "rtu-over-tcp", unit_delays={1: 0.4, 2: 0.15}
    )
    async with bus:
        with pytest.raises(DeviceTimeout):
            await bus.read_registers(1, "holding", 0, 2)
        block = await bus.read_registers(2, "holding", 0, 2)
        stats = bus.stats
    assert block.registers == expected(2, 3, 0, 2)
    assert stats[2].errors == {}


# --- misbehaving Modbus TCP devices -------------------------------------------------


@pytest.mark.parametrize("code", [4, 6, 10, 11])
async def test_exception_codes_over_tcp(
    code: int, scripted: list[ScriptedDevice]
) -> None:
    _, bus = await start_scripted(scripted, "tcp", exception=code)
    async with bus:
        with pytest.raises(ExceptionResponse) as caught:
            await bus.read_registers(2, "input", 0, 1)
    assert (caught.value.code, caught.value.unit, caught.value.function) == (code, 2, 4)


async def test_tcp_answer_from_another_unit(scripted: list[ScriptedDevice]) -> None:
    _, bus = await start_scripted(scripted, "tcp", answer_as=7)
    async with bus:
        with pytest.raises(WrongUnitError, match="asked unit 1 but unit 7 answered"):
            await bus.read_registers(1, "holding", 0, 1)


async def test_tcp_short_answer(scripted: list[ScriptedDevice]) -> None:
    _, bus = await start_scripted(scripted, "tcp", truncate_to=9)
    async with bus:
        with pytest.raises(FrameError, match="short response"):
            await bus.read_registers(1, "holding", 0, 2)


async def test_tcp_stream_out_of_step_is_reconnected(
    scripted: list[ScriptedDevice],
) -> None:
    device, bus = await start_scripted(scripted, "tcp", bad_crc=True)
    async with bus:
        with pytest.raises(FrameError, match="protocol id 7"):
            await bus.read_registers(1, "holding", 0, 2)
        assert not bus.connected
        device.misbehaviour.bad_crc = False
        # Unit 2 is not backed off; the bus reconnects for it.
        block = await bus.read_registers(2, "holding", 0, 2)
        assert block.registers == expected(2, 3, 0, 2)
        assert bus.status.reconnects == 1


# --- silence, back-off and recovery -------------------------------------------------


async def test_silent_device_times_out_then_is_backed_off() -> None:
    listener = SilentListener()
    port = await listener.start()
    try:
        async with tcp_bus(port, timeout_s=0.2, backoff_initial_s=0.3) as bus:
            started = time.monotonic()
            with pytest.raises(DeviceTimeout, match="did not answer"):
                await bus.read_registers(1, "holding", 0, 2)
            assert 0.19 < time.monotonic() - started < 0.6
            # Back-off: refused at once, without touching the wire.
            started = time.monotonic()
            with pytest.raises(DeviceBackedOff, match="not asked again"):
                await bus.read_registers(1, "holding", 0, 2)
            assert time.monotonic() - started < 0.05
            sent = len(listener.received)
            await asyncio.sleep(bus.stats[1].backoff_remaining_s + 0.01)
            with pytest.raises(DeviceTimeout):
                await bus.read_registers(1, "holding", 0, 2)
            stats = bus.stats[1]
    finally:
        await listener.stop()
    assert len(listener.received) == 2 * sent == 24  # two MBAP requests of 12 bytes
    assert stats.errors == {"timeout": 2, "backed_off": 1}
    assert stats.consecutive_failures == 2
    assert stats.backoff_remaining_s > 0.3  # doubled after the second failure


async def test_outage_and_recovery_of_a_unit_are_logged_once_each(
    scripted: list[ScriptedDevice], caplog: pytest.LogCaptureFixture
) -> None:
    device, _ = await start_scripted(
        scripted, "rtu-over-tcp", silent_units=frozenset({1})
    )
    caplog.set_level(logging.DEBUG, logger=BUS_LOG)
    async with ModbusBus(
        BusSpec(
            "test",
            kind="rtu-over-tcp",
            port=device.port,
            timeout_s=0.1,
            backoff_initial_s=0.05,
            backoff_max_s=0.05,
        )
    ) as bus:
        for _ in range(3):
            with pytest.raises(DeviceTimeout):
                await bus.read_registers(1, "holding", 0, 1)
            await asyncio.sleep(0.06)
        device.misbehaviour.silent_units = frozenset()
        await bus.read_registers(1, "holding", 0, 1)
        await bus.read_registers(1, "holding", 0, 1)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert [r.getMessage() for r in warnings] == ["unit stopped answering; backing off"]
    assert [r.getMessage() for r in infos] == ["unit answers again"]
    assert infos[0].kv["failures"] == 3  # type: ignore[attr-defined]
    assert "> 01030000" in warnings[0].kv["frames"]  # type: ignore[attr-defined]


async def test_unreachable_bus_is_logged_once_and_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=BUS_LOG)
    port = free_port()
    bus = tcp_bus(port, backoff_initial_s=0.1, backoff_max_s=0.1)
    await bus.start()  # nothing listens: logged, not raised
    assert not bus.connected
    with pytest.raises(TransportError, match="is down"):
        await bus.read_registers(1, "holding", 0, 1)
    await asyncio.sleep(0.11)
    with pytest.raises(TransportError, match="unreachable"):
        await bus.read_registers(1, "holding", 0, 1)
    server = await start_tcp_server(units=(1,), port=port)
    try:
        await asyncio.sleep(0.11)
        block = await bus.read_registers(1, "holding", 0, 1)
        await server.stop()
        await asyncio.sleep(0.05)
        with pytest.raises(TransportError):
            await bus.read_registers(1, "holding", 0, 1)
    finally:
        await bus.close()
    assert block.registers == expected(1, 3, 0, 1)
    messages = [r.getMessage() for r in caplog.records if r.name == BUS_LOG]
    assert messages == [
        "bus unreachable",
        "bus reachable again",
        "bus link lost; reconnecting",
    ]
    assert bus.stats[1].errors.get("transport", 0) >= 2


async def test_closed_bus_refuses_requests(tcp_server: PymodbusServer) -> None:
    bus = tcp_bus(tcp_server.port)
    async with bus:
        await bus.read_registers(1, "holding", 0, 1)
    with pytest.raises(TransportError, match="closed"):
        await bus.read_registers(1, "holding", 0, 1)


# --- one request on the wire at a time, first come first served ---------------------


async def test_requests_queue_fifo_one_at_a_time(
    scripted: list[ScriptedDevice],
) -> None:
    device, bus = await start_scripted(scripted, "rtu-over-tcp", delay_s=0.01)
    depths: list[int] = []
    async with bus:
        tasks = [
            asyncio.create_task(bus.read_registers(1 + i % 2, "holding", i, 1))
            for i in range(8)
        ]
        await asyncio.sleep(0.005)
        depths.append(bus.queue_depth)
        blocks = await asyncio.gather(*tasks)
    assert device.overlaps == 0
    addresses = [int.from_bytes(frame[2:4], "big") for _, frame in device.requests]
    assert addresses == list(range(8))
    assert [b.registers for b in blocks] == [
        expected(1 + i % 2, 3, i, 1) for i in range(8)
    ]
    assert depths[0] >= 5


async def test_gap_between_requests_is_kept(scripted: list[ScriptedDevice]) -> None:
    device, _ = await start_scripted(scripted, "rtu-over-tcp")
    spec = BusSpec("gw", kind="rtu-over-tcp", port=device.port, gap_s=0.05)
    async with ModbusBus(spec) as bus:
        for unit in (1, 2, 1, 2):
            await bus.read_registers(unit, "holding", 0, 1)
    times = [t for t, _ in device.requests]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.045


# --- acceptance: a dead unit does not stall the live ones ---------------------------


async def poll(bus: ModbusBus, unit: int, period_s: float, duration_s: float) -> int:
    """Read ``unit`` every ``period_s`` for ``duration_s``; return the good reads.

    Ticks missed while the bus was busy are skipped, not caught up.
    """
    reads = 0
    start = time.monotonic()
    tick = start
    while True:
        now = time.monotonic()
        if tick > now:
            await asyncio.sleep(tick - now)
        if time.monotonic() - start >= duration_s:
            return reads
        try:
            await bus.read_registers(unit, "holding", 0, 10, timeout_s=0.25)
            reads += 1
        except DriverError:
            pass
        tick += period_s
        while tick < time.monotonic():
            tick += period_s


async def cadence(
    bus: ModbusBus, units: tuple[int, ...], duration_s: float
) -> list[int]:
    return list(await asyncio.gather(*(poll(bus, u, 0.2, duration_s) for u in units)))


async def test_dead_unit_on_a_shared_tcp_bus_does_not_stall_the_others(
    tcp_server: PymodbusServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=BUS_LOG)
    gateway = UnitFilterProxy(tcp_server.port, dead_units=[3])
    port = await gateway.start()
    try:
        async with tcp_bus(port) as bus:
            baseline = await cadence(bus, (1, 2), 3.0)
            with_dead = await cadence(bus, (1, 2, 3), 3.0)
            stats = bus.stats
    finally:
        await gateway.stop()
    assert min(baseline) >= 13  # 15 ticks in 3 s
    assert with_dead[0] >= 0.8 * baseline[0]
    assert with_dead[1] >= 0.8 * baseline[1]
    assert with_dead[2] == 0
    # Unit 3 cost a timeout once per back-off, and was refused at once otherwise.
    assert 1 <= stats[3].errors["timeout"] == gateway.dropped[3] <= 2
    assert stats[3].errors["backed_off"] >= 10
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].kv["unit"] == 3  # type: ignore[attr-defined]


async def test_dead_unit_on_a_serial_line_does_not_stall_the_others(
    pty_pair: SocatPair, scripted: list[ScriptedDevice]
) -> None:
    line = ScriptedDevice(units=(1, 2))  # unit 3 is wired but silent
    scripted.append(line)
    await line.serve_pty(pty_pair.a)
    async with serial_bus(pty_pair.b) as bus:
        baseline = await cadence(bus, (1, 2), 2.0)
        with_dead = await cadence(bus, (1, 2, 3), 2.0)
        stats = bus.stats
    assert min(baseline) >= 9  # 10 ticks in 2 s
    assert with_dead[0] >= 0.8 * baseline[0]
    assert with_dead[1] >= 0.8 * baseline[1]
    # One timeout, or two when the jittered back-off (1.5-2 s) ends inside the run.
    assert 1 <= stats[3].errors["timeout"] <= 2
    assert stats[3].errors["backed_off"] >= 5


# --- scanning ------------------------------------------------------------------------


async def test_scan_finds_the_units_that_answer_and_backs_nothing_off(
    tcp_server: PymodbusServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=BUS_LOG)
    gateway = UnitFilterProxy(tcp_server.port, dead_units=[3, 4, 5])
    port = await gateway.start()
    try:
        async with tcp_bus(port) as bus:
            found = await scan_units(
                bus, range(1, 6), function="holding", timeout_s=0.1
            )
            # A unit that refuses the probed register is there too (exception 2).
            refusing = await scan_units(
                bus, [2], function=3, address=299, timeout_s=0.1
            )
            stats = bus.stats
    finally:
        await gateway.stop()
    assert found == [1, 2]
    assert refusing == [2]
    assert all(s.backoff_remaining_s == 0 for s in stats.values())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(("code", "found"), [(2, [1, 2]), (11, [])])
async def test_scan_counts_exception_answers_except_gateway_ones(
    code: int, found: list[int], scripted: list[ScriptedDevice]
) -> None:
    _, bus = await start_scripted(scripted, "rtu-over-tcp", exception=code)
    async with bus:
        assert (
            await scan_units(bus, [1, 2, 3], function="input", timeout_s=0.1) == found
        )
