"""``ies-agent read``, ``scan`` and ``decode`` against real pymodbus servers."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from cli_helpers import run_agent
from conftest import DATA
from ies_drivers.sunspec.image import SunSpecImage
from peers.modbus import UnitFilterProxy

FC01 = "01 03 04 00 00 3F 80 EA 63"  # field case FC-01: SolarEdge CosPhi response


class ServerThread:
    """A pymodbus TCP server on a free loopback port, in its own event loop thread."""

    def __init__(
        self, devices: list[SimDevice], dead_units: tuple[int, ...] = ()
    ) -> None:
        self.devices = devices
        self.dead_units = dead_units
        self.port = 0
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self.server = ModbusTcpServer(self.devices, address=("127.0.0.1", 0))
        await self.server.serve_forever(background=True)
        self.port = self.server.transport.sockets[0].getsockname()[1]
        # pymodbus 3.16 answers every unit id (exception 4 for unknown ones); a
        # gateway that drops the absent units makes them silent, as on a real line.
        self.proxy = UnitFilterProxy(self.port, self.dead_units)
        if self.dead_units:
            self.port = await self.proxy.start()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        assert self._ready.wait(10), "pymodbus server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.dead_units:
            stopped = asyncio.run_coroutine_threadsafe(self.proxy.stop(), self._loop)
            stopped.result(10)
        fut = asyncio.run_coroutine_threadsafe(self.server.shutdown(), self._loop)
        fut.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def sunspec_image() -> SunSpecImage:
    """An inverter image with known raw values; the points not given are sentinels."""
    image = SunSpecImage(40000)
    image.add_model(1, {"Mn": "Fronius", "Md": "Symo 5.0-3-M", "SN": "31415926"})
    image.add_model(
        103,
        {
            "A": 1234,
            "A_SF": -2,
            "PhVphA": 2351,
            "V_SF": -1,
            "W": -58,
            "W_SF": 0,
            "Hz": 4997,
            "Hz_SF": -2,
            "WH": 21267458,
            "WH_SF": 0,
            "St": 4,
            # VA, VAr, PF, DC values, temperatures: not given → "not implemented"
        },
    )
    return image


@pytest.fixture
def inverter_site(tmp_path: Path) -> Iterator[Path]:
    registers = sunspec_image().registers()
    device = SimDevice(
        3,
        simdata=[
            SimData(
                40000,
                count=len(registers),
                values=registers,
                datatype=DataType.REGISTERS,
            )
        ],
    )
    with ServerThread([device]) as server:
        site = tmp_path / "site.toml"
        site.write_text(
            f"""
[gateway]
id = "gw-test"
data_dir = "data"

[[buses]]
id = "lan"
kind = "tcp"
host = "127.0.0.1"
port = {server.port}
timeout_s = 1.0

[[devices]]
id = "inv"
bus = "lan"
unit = 3
template = "sunspec-inverter"
"""
        )
        yield site


def test_read_prints_scaled_sunspec_values_and_not_implemented(
    inverter_site: Path,
) -> None:
    result = run_agent("read", "--config", str(inverter_site), "inv", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["identity"]["mfr"] == "Fronius"
    assert report["identity"]["ser"] == "31415926"
    values = {row["quantity"]: row for row in report["values"]}
    assert values["103.A"]["value"] == "12.34"
    assert values["103.PhVphA"]["value"] == "235.1"
    assert values["103.W"]["value"] == "-58"
    assert values["103.Hz"]["value"] == "49.97"
    assert values["103.WH"]["value"] == "21267458"
    assert values["103.WH"]["obis"] == "1-0:2.8.0*255"
    for absent in ("103.VA", "103.VAr", "103.PF", "103.TmpCab"):
        assert values[absent]["value"] is None
        assert values[absent]["state"] == "not_implemented"

    table = run_agent("read", "--config", str(inverter_site), "inv")
    assert table.returncode == 0
    row = next(line for line in table.stdout.splitlines() if line.startswith("103.VA "))
    assert "not implemented" in row


def test_read_names_an_unknown_device(inverter_site: Path) -> None:
    result = run_agent("read", "--config", str(inverter_site), "nope")
    assert result.returncode == 2
    assert "no device 'nope'" in result.stdout and "inv" in result.stdout


def test_read_of_a_silent_device_fails_clearly(tmp_path: Path) -> None:
    import socket

    with socket.socket() as listener:  # accepts, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        site = tmp_path / "site.toml"
        site.write_text(
            f'[gateway]\nid = "gw"\n\n[[buses]]\nid = "lan"\nkind = "tcp"\n'
            f'host = "127.0.0.1"\nport = {port}\ntimeout_s = 0.3\n\n'
            '[[devices]]\nid = "m"\nbus = "lan"\n'
            'unit = 1\ntemplate = "eastron-sdm630"\n'
        )
        result = run_agent("read", "--config", str(site), "m")
    assert result.returncode == 1
    assert result.stdout.startswith("m: ")


def test_scan_finds_the_unit_and_its_sunspec_models() -> None:
    registers = sunspec_image().registers()
    device = SimDevice(
        3,
        simdata=[
            SimData(0, count=1, values=0, datatype=DataType.REGISTERS),
            SimData(
                40000,
                count=len(registers),
                values=registers,
                datatype=DataType.REGISTERS,
            ),
        ],
    )
    with ServerThread([device], dead_units=(1, 2, 4)) as server:
        result = run_agent(
            "scan", "--tcp", f"127.0.0.1:{server.port}", "--units", "1-4"
        )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "unit 3: answers; SunSpec models [1, 103]" in result.stdout
    assert 'template = "sunspec-inverter"' in result.stdout
    assert "unit 1" not in result.stdout


def test_scan_parses_host_and_port_forms() -> None:
    from ies_agent.commands.scan import parse_host_port

    assert parse_host_port("10.0.0.5") == ("10.0.0.5", 502)
    assert parse_host_port("meter.local:1502") == ("meter.local", 1502)
    assert parse_host_port("[::1]:502") == ("::1", 502)
    assert parse_host_port("[fe80::1]") == ("fe80::1", 502)
    for bad in (":502", "host:port", "host:70000", "[::1]x"):
        with pytest.raises(ValueError):
            parse_host_port(bad)
    result = run_agent("scan", "--tcp", ":502")
    assert result.returncode == 2 and "names no host" in result.stdout


def test_decode_prints_the_field_case_frame() -> None:
    result = run_agent("decode", "--protocol", "modbus-rtu", FC01)
    assert result.returncode == 0, result.stdout
    assert "unit:      1" in result.stdout
    assert "function:  3 (read holding registers)" in result.stdout
    assert "0x0000" in result.stdout and "0x3F80" in result.stdout


def test_decode_shows_the_word_order_that_makes_sense() -> None:
    # FC-01: the same two registers are 1.0 low-word-first and a denormal big-endian.
    result = run_agent("decode", "--protocol", "modbus-rtu", FC01)
    assert "ABCD=denormal (wrong order?)  CDAB=1" in result.stdout


def test_decode_modbus_tcp_field_case_and_hint_from_rtu() -> None:
    # FC-02: a Modbus TCP response of 105 registers (SunSpec model 203 payload).
    lines = (DATA / "modbus" / "FC-02.hex").read_text().splitlines()
    response = next(line for line in lines if line.startswith("<--"))[3:]
    tcp = run_agent("decode", "--protocol", "modbus-tcp", response)
    assert tcp.returncode == 0, tcp.stdout
    assert "transaction: 147" in tcp.stdout and "count:     105" in tcp.stdout
    assert "[+0] 0x0067  (103)" in tcp.stdout
    rtu = run_agent("decode", "--protocol", "modbus-rtu", response)
    assert rtu.returncode == 1
    assert "try --protocol modbus-tcp" in rtu.stdout


def test_decode_of_text_that_is_not_hex_is_a_usage_error() -> None:
    result = run_agent("decode", "--protocol", "modbus-rtu", "01 0G")
    assert result.returncode == 2
    assert "not a hex digit" in result.stdout


def test_decode_exits_1_on_a_bad_crc() -> None:
    result = run_agent("decode", "--protocol", "modbus-rtu", FC01[:-2] + "64")
    assert result.returncode == 1
    assert "CRC" in result.stdout


def test_config_check_names_file_line_and_key(tmp_path: Path) -> None:
    site = tmp_path / "broken.toml"
    site.write_text(
        '[gateway]\nid = "gw"\n\n[[buses]]\nid = "lan"\nkind = "tcp"\n\n'
        '[[devices]]\nid = "m"\nbus = "lan"\nunit = 1\ntemplate = "no-such-meter"\n'
    )
    result = run_agent("config", "check", str(site))
    assert result.returncode == 1
    assert "broken.toml:12: devices[0].template:" in result.stdout
    good = run_agent(
        "config", "check", str(Path(__file__).parents[1] / "configs/examples/site.toml")
    )
    assert good.returncode == 0, good.stdout
