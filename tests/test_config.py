"""Site configuration: the example site loads, broken files name file, line and key,
every problem is reported at once, and ``ies-agent config check`` exits accordingly.

Pure file parsing: no peer is needed. ``to_bus_spec`` builds the real driver BusSpec.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from ies_agent.commands import config as config_command
from ies_agent.config import (
    ConfigError,
    ConfigProblem,
    Site,
    load_site,
    parse_interval,
)
from ies_drivers.modbus.bus import BusSpec
from ies_drivers.templates import shipped_templates_dir

EXAMPLE = ROOT / "configs" / "examples" / "site.toml"

GATEWAY = """\
[gateway]
id = "gw-1"
"""

TCP_BUS = """
[[buses]]
id = "lan"
kind = "tcp"
host = "10.0.0.5"
"""

RTU_BUS = """
[[buses]]
id = "rs485"
kind = "rtu"
serial_port = "/dev/ttyUSB0"
"""


def device(**fields: object) -> str:
    lines = ["", "[[devices]]"]
    for key, value in fields.items():
        rendered = f'"{value}"' if isinstance(value, str) else str(value).lower()
        lines.append(f"{key} = {rendered}")
    return "\n".join(lines) + "\n"


def write(tmp_path: Path, text: str, name: str = "site.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems_of(path: Path, **kwargs: bool) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as caught:
        load_site(path, **kwargs)
    return caught.value.problems


def run_check(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    config_command.configure(parser)
    return config_command.main(parser.parse_args(list(argv)))


# --- the example site ----------------------------------------------------------------


def test_example_site_loads() -> None:
    site = load_site(EXAMPLE)
    assert isinstance(site, Site)
    assert site.gateway.id == "gw-pune-0001"
    assert site.gateway.timezone == "Asia/Kolkata"
    assert site.gateway.interval_s == 900
    assert site.gateway.key_alg == "ecdsa-p256"
    assert list(site.buses) == ["lan", "rs485-panel", "rs485-pump-room"]
    assert site.buses["rs485-panel"].gap_ms == 20
    assert site.buses["rs485-pump-room"].kind == "rtu-over-tcp"
    meter = site.devices["main-incomer"]
    assert (meter.bus, meter.unit, meter.template.id) == (
        "rs485-panel",
        1,
        "eastron-sdm630",
    )
    assert meter.template.point("energy_active_import").cumulative
    inverter = site.devices["inverter"]
    assert inverter.template.sunspec and 103 in inverter.sunspec_models
    assert inverter.sunspec_bases == (40000, 0, 50000)
    assert site.devices["grid-meter"].sunspec_base == 40000
    assert site.devices["pump-room"].timeout_s == 1.5


def test_config_check_passes_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_check("check", str(EXAMPLE)) == 0
    out = capsys.readouterr().out
    assert f"{EXAMPLE}: ok — gateway gw-pune-0001, 3 buses, 5 devices" in out
    assert "main-incomer: bus rs485-panel unit 1, eastron-sdm630 (31 points)" in out


def test_config_check_runs_as_a_program(tmp_path: Path) -> None:
    # The real entry point, in a child process: status and output as a shell sees.
    broken = write(
        tmp_path, GATEWAY + TCP_BUS + device(id="m", bus="lan", unit=1, template="nope")
    )
    code = (
        "import argparse, sys\n"
        "from ies_agent.commands import config\n"
        "p = argparse.ArgumentParser(); config.configure(p)\n"
        "sys.exit(config.main(p.parse_args(sys.argv[1:])))\n"
    )
    for path, status in ((EXAMPLE, 0), (broken, 1)):
        result = subprocess.run(
            [sys.executable, "-c", code, "check", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env={"PYTHONPATH": f"{ROOT / 'agent'}:{ROOT / 'drivers'}", "PATH": ""},
        )
        assert result.returncode == status, result.stdout + result.stderr
    assert f"{broken}:13: devices[0].template: no template 'nope'" in result.stdout


def test_config_check_prints_problems_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, GATEWAY + 'timezone = "Mars/Olympus"\n')
    assert run_check("check", str(path)) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{path}:3: gateway.timezone: unknown time zone")
    assert "1 problem, not usable" in out


def test_config_check_warns_about_a_missing_serial_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = GATEWAY + RTU_BUS.replace("/dev/ttyUSB0", str(tmp_path / "ttyNONE"))
    assert run_check("check", str(write(tmp_path, text))) == 0
    assert f"warning: bus rs485: serial port {tmp_path / 'ttyNONE'}" in (
        capsys.readouterr().out
    )


def test_config_templates_lists_site_and_shipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    own = tmp_path / "templates"
    own.mkdir()
    text = (shipped_templates_dir() / "rish-master-3430.toml").read_text()
    (own / "panel-meter.toml").write_text(
        text.replace('id = "rish-master-3430"', 'id = "panel-meter"')
    )
    assert run_check("templates", "--dir", str(own)) == 0
    out = capsys.readouterr().out
    assert f"panel-meter: Rishabh Instruments RISH Master 3430 (meter) — {own}" in out
    assert "eastron-sdm630: Eastron SDM630-Modbus (meter)" in out


# --- broken sites: each names the right line and key ---------------------------------

BROKEN = [
    pytest.param(
        GATEWAY + "colour = 1\n",
        3,
        "gateway.colour",
        "unknown key; allowed here: data_dir, demo, id, interval",
        id="unknown-gateway-key",
    ),
    pytest.param(
        GATEWAY + 'intervall = "15m"\n',
        3,
        "gateway.intervall",
        "unknown key (did you mean 'interval'?)",
        id="misspelt-key",
    ),
    pytest.param(
        GATEWAY + 'timezone = "Asia/Calcuta"\n',
        3,
        "gateway.timezone",
        "unknown time zone 'Asia/Calcuta' (did you mean 'Asia/Calcutta'?)",
        id="timezone",
    ),
    pytest.param(
        GATEWAY + 'interval = "5s"\n',
        3,
        "gateway.interval",
        'an interval of \'5s\' (5 s) is not allowed: use "15m", "30m" or "60m" '
        "(1-60 s only "
        "with demo = true",
        id="short-interval-without-demo",
    ),
    pytest.param(
        GATEWAY + 'interval = "10m"\n',
        3,
        "gateway.interval",
        "an interval of '10m' (600 s) is not allowed",
        id="interval-not-allowed",
    ),
    pytest.param(
        GATEWAY + 'interval = "quarter"\n',
        3,
        "gateway.interval",
        "'quarter' is not an interval",
        id="interval-syntax",
    ),
    pytest.param(
        GATEWAY + 'key_alg = "rsa"\n',
        3,
        "gateway.key_alg",
        "'rsa' is not one of ecdsa-p256, ed25519",
        id="key-alg",
    ),
    pytest.param(
        '[gateway]\nid = "my gateway"\n',
        2,
        "gateway.id",
        "'my gateway' is not an id",
        id="gateway-id",
    ),
    pytest.param(
        GATEWAY + '\n[[buses]]\nid = "rs485"\nkind = "rtu"\n',
        4,
        "buses[0].serial_port",
        "missing: an rtu bus needs serial_port",
        id="rtu-without-serial-port",
    ),
    pytest.param(
        GATEWAY + TCP_BUS + "baudrate = 9600\n",
        8,
        "buses[0].baudrate",
        "baudrate applies to rtu-over-tcp, rtu and dlms-hdlc buses only "
        "(this bus is tcp)",
        id="serial-key-on-tcp-bus",
    ),
    pytest.param(
        GATEWAY + RTU_BUS + "baudrate = 9601\n",
        8,
        "buses[0].baudrate",
        "9601 is not a standard rate",
        id="baudrate",
    ),
    pytest.param(
        GATEWAY + RTU_BUS + 'parity = "even-ish"\n',
        8,
        "buses[0].parity",
        "'even-ish' is not a parity",
        id="parity",
    ),
    pytest.param(
        GATEWAY + '\n[[buses]]\nid = "x"\nkind = "tcp-ip"\nhost = "h"\n',
        6,
        "buses[0].kind",
        "'tcp-ip' is not one of tcp, rtu, rtu-over-tcp",
        id="bus-kind",
    ),
    pytest.param(
        GATEWAY + TCP_BUS + TCP_BUS,
        10,
        "buses[1].id",
        "bus id 'lan' is already used (line 5)",
        id="duplicate-bus",
    ),
    pytest.param(
        GATEWAY
        + TCP_BUS
        + device(id="m", bus="lam", unit=1, template="eastron-sdm630"),
        11,
        "devices[0].bus",
        "no bus 'lam' (did you mean 'lan'?) (buses: lan)",
        id="unknown-bus",
    ),
    pytest.param(
        GATEWAY
        + TCP_BUS
        + device(id="m", bus="lan", unit=1, template="eastron-sdm603"),
        13,
        "devices[0].template",
        "no template 'eastron-sdm603' (did you mean 'eastron-sdm630'?) (known: ",
        id="unknown-template",
    ),
    pytest.param(
        GATEWAY
        + RTU_BUS
        + device(id="m", bus="rs485", unit=0, template="eastron-sdm630"),
        12,
        "devices[0].unit",
        "0 is out of range, expected 1..247",
        id="unit-zero-on-rtu",
    ),
    pytest.param(
        GATEWAY
        + RTU_BUS
        + device(id="m", bus="rs485", unit=1, template="eastron-sdm630")
        + device(id="m", bus="rs485", unit=2, template="eastron-sdm630"),
        16,
        "devices[1].id",
        "device id 'm' is already used (line 10)",
        id="duplicate-device",
    ),
    pytest.param(
        GATEWAY
        + RTU_BUS
        + device(id="a", bus="rs485", unit=3, template="eastron-sdm630")
        + device(id="b", bus="rs485", unit=3, template="rish-master-3430"),
        18,
        "devices[1].unit",
        "unit 3 on bus 'rs485' is already used by device 'a' (line 10)",
        id="duplicate-unit-on-bus",
    ),
    pytest.param(
        GATEWAY
        + TCP_BUS
        + device(id="m", bus="lan", unit=1, template="eastron-sdm630", poll="10"),
        14,
        "devices[0].poll",
        "unknown key (did you mean 'poll_s'?)",
        id="device-misspelt-key",
    ),
    pytest.param(
        GATEWAY
        + TCP_BUS
        + device(id="m", bus="lan", unit=1, template="eastron-sdm630", poll_s="10"),
        14,
        "devices[0].poll_s",
        "expected a number, got a string ('10')",
        id="poll-as-string",
    ),
    pytest.param(
        GATEWAY
        + TCP_BUS
        + device(
            id="m", bus="lan", unit=1, template="eastron-sdm630", sunspec_base=40000
        ),
        14,
        "devices[0].sunspec_base",
        "applies to SunSpec templates only ('eastron-sdm630' is plain Modbus)",
        id="sunspec-base-on-modbus",
    ),
    pytest.param(
        GATEWAY + TCP_BUS + device(id="m", bus="lan", template="eastron-sdm630"),
        9,
        "devices[0].unit",
        "missing, expected an integer 0..255",
        id="missing-unit",
    ),
    pytest.param(
        GATEWAY + 'template_dirs = ["nowhere"]\n',
        3,
        "gateway.template_dirs",
        "unknown key",
        id="template-dirs-in-wrong-table",
    ),
    pytest.param(
        'id = "gw"\n',
        None,
        "gateway",
        "missing, expected a table",
        id="no-gateway",
    ),
    pytest.param(
        GATEWAY + "[[buses]\n",
        3,
        "",
        "not valid TOML",
        id="toml-syntax",
    ),
]


@pytest.mark.parametrize(("text", "line", "key", "fragment"), BROKEN)
def test_broken_site_names_file_line_and_key(
    tmp_path: Path, text: str, line: int | None, key: str, fragment: str
) -> None:
    path = write(tmp_path, text)
    problems = problems_of(path)
    matching = [p for p in problems if fragment in p.message]
    assert matching, f"no problem says {fragment!r}: {[str(p) for p in problems]}"
    problem = matching[0]
    assert (problem.file, problem.line, problem.key) == (str(path), line, key), [
        str(p) for p in problems
    ]
    where = f"{path}:{line}" if line is not None else str(path)
    assert str(problem).startswith(f"{where}: ")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = (
        '[gateway]\nid = "gw"\ntimezone = "Nowhere/City"\ninterval = "7m"\n'
        + RTU_BUS
        + "stopbits = 3\n"
        + device(id="a", bus="rs485", unit=300, template="eastron-sdm630")
        + device(id="b", bus="rs485", unit=2, template="missing-model")
    )
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_site(path)
    keys = [p.key for p in caught.value.problems]
    assert keys == [
        "gateway.timezone",
        "gateway.interval",
        "buses[0].stopbits",
        "devices[0].unit",
        "devices[1].template",
    ]
    lines = str(caught.value).splitlines()
    assert len(lines) == 5 and all(line.startswith(f"{path}:") for line in lines)


def test_problems_in_a_site_template_point_into_the_template(tmp_path: Path) -> None:
    own = tmp_path / "templates"
    own.mkdir()
    text = (shipped_templates_dir() / "rish-master-3430.toml").read_text()
    broken = text.replace('id = "rish-master-3430"', 'id = "panel"').replace(
        'obis = "1-0:14.7.0"', 'obis = "1-0:14.7"'
    )
    template_path = own / "panel.toml"
    template_path.write_text(broken)
    site = write(
        tmp_path,
        GATEWAY + RTU_BUS + device(id="m", bus="rs485", unit=1, template="panel"),
    )
    problems = problems_of(site)
    assert [p.key for p in problems] == [
        "devices[0].template",
        "blocks[0].points[24].obis",
    ]
    assert problems[0].message.startswith("template 'panel' is invalid: 1 problem(s)")
    frequency_line = broken.splitlines().index('obis = "1-0:14.7"') + 1
    assert (problems[1].file, problems[1].line) == (str(template_path), frequency_line)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    (problem,) = problems_of(tmp_path / "absent.toml")
    assert str(problem) == f"{tmp_path / 'absent.toml'}: no such file"
    (problem,) = problems_of(tmp_path)
    assert "is a directory" in problem.message


# --- values and defaults -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (900, 900),
        ("15m", 900),
        ("30m", 1800),
        ("60m", 3600),
        ("1h", 3600),
        ("5s", 5),
        ("15 min", 900),
    ],
)
def test_parse_interval(value: object, seconds: int) -> None:
    assert parse_interval(value) == seconds


@pytest.mark.parametrize("value", ["15", "15x", "-5s", 0, True, 1.5, "0m"])
def test_parse_interval_refuses(value: object) -> None:
    with pytest.raises(ValueError):
        parse_interval(value)


def test_short_intervals_need_demo_or_the_test_switch(tmp_path: Path) -> None:
    path = write(tmp_path, GATEWAY + 'interval = "5s"\n')
    assert load_site(path, allow_short_interval=True).gateway.interval_s == 5
    demo = write(tmp_path, GATEWAY + "interval = 5\ndemo = true\n", "demo.toml")
    gateway = load_site(demo).gateway
    assert (gateway.interval_s, gateway.demo) == (5, True)
    (problem,) = problems_of(
        write(tmp_path, GATEWAY + 'interval = "90s"\ndemo = true\n', "long.toml")
    )
    assert problem.message.startswith("an interval of '90s' (90 s) is not allowed")


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "templates").mkdir()
    path = write(tmp_path, GATEWAY + 'data_dir = "data"\n')
    site = load_site(path)
    gateway = site.gateway
    assert (gateway.timezone, gateway.interval_s, gateway.key_alg, gateway.origin) == (
        "Asia/Kolkata",
        900,
        "ecdsa-p256",
        None,
    )
    assert gateway.data_dir == tmp_path / "data"
    # The site's own "templates" directory is used when it exists.
    assert site.template_dirs == (tmp_path / "templates",)
    assert site.buses == {} and site.devices == {}


def test_template_dirs_are_searched_before_the_shipped_ones(tmp_path: Path) -> None:
    own = tmp_path / "my-templates"
    own.mkdir()
    text = (shipped_templates_dir() / "eastron-sdm630.toml").read_text()
    (own / "eastron-sdm630.toml").write_text(
        text.replace('model = "SDM630-Modbus"', 'model = "SDM630 (site copy)"')
    )
    path = write(
        tmp_path,
        'template_dirs = ["my-templates"]\n'
        + GATEWAY
        + RTU_BUS
        + device(id="m", bus="rs485", unit=1, template="eastron-sdm630")
        + device(id="r", bus="rs485", unit=2, template="rish-master-3430"),
    )
    site = load_site(path)
    assert site.template_dirs == (own,)
    assert site.devices["m"].template.model == "SDM630 (site copy)"
    assert site.devices["m"].template_path == own / "eastron-sdm630.toml"
    assert site.devices["r"].template_path == shipped_templates_dir() / (
        "rish-master-3430.toml"
    )
    (problem,) = problems_of(
        write(tmp_path, 'template_dirs = ["gone"]\n' + GATEWAY, "x.toml")
    )
    assert (problem.line, problem.key) == (1, "template_dirs[0]")
    assert problem.message == f"no such directory: {tmp_path / 'gone'}"


def test_tcp_buses_accept_unit_0_and_255(tmp_path: Path) -> None:
    text = (
        GATEWAY
        + TCP_BUS
        + device(id="a", bus="lan", unit=0, template="sunspec-inverter")
        + device(id="b", bus="lan", unit=255, template="sunspec-meter")
    )
    site = load_site(write(tmp_path, text))
    assert [d.unit for d in site.devices.values()] == [0, 255]
    assert site.devices["b"].sunspec_models[0] == 1


def test_same_unit_on_different_buses_is_fine(tmp_path: Path) -> None:
    text = (
        GATEWAY
        + TCP_BUS
        + RTU_BUS
        + device(id="a", bus="lan", unit=1, template="eastron-sdm630")
        + device(id="b", bus="rs485", unit=1, template="eastron-sdm630", enabled=False)
    )
    site = load_site(write(tmp_path, text))
    assert list(site.devices) == ["a", "b"]
    assert site.devices["b"].enabled is False


def test_bus_config_builds_the_driver_bus_spec(tmp_path: Path) -> None:
    text = (
        GATEWAY
        + RTU_BUS
        + 'baudrate = 19200\nparity = "even"\nstopbits = 2\ngap_ms = 15\n'
        + "timeout_s = 0.3\nbackoff_max_s = 30\n"
        + TCP_BUS
        + "port = 1502\n"
    )
    site = load_site(write(tmp_path, text))
    rtu = site.buses["rs485"].to_bus_spec()
    assert isinstance(rtu, BusSpec)
    assert (rtu.name, rtu.kind, rtu.serial_port, rtu.baudrate, rtu.parity) == (
        "rs485",
        "rtu",
        "/dev/ttyUSB0",
        19200,
        "E",
    )
    assert (rtu.stopbits, rtu.bytesize, rtu.timeout_s, rtu.backoff_max_s) == (
        2,
        8,
        0.3,
        30,
    )
    assert rtu.gap_s == pytest.approx(0.015)
    tcp = site.buses["lan"].to_bus_spec()
    assert (tcp.kind, tcp.host, tcp.port, tcp.gap_s) == ("tcp", "10.0.0.5", 1502, None)
    assert site.buses["lan"].label == "10.0.0.5:1502"
    assert site.buses["rs485"].label == "/dev/ttyUSB0"


# --- [[upstreams]] and [storage] (ies_agent.upstream.settings) -----------------------


def test_upstreams_load_with_defaults_and_resolved_paths(tmp_path: Path) -> None:
    text = (
        GATEWAY
        + """
[[upstreams]]
name = "utility"
kind = "mqtt"
url = "mqtts://broker.example:8883"
tls_ca_file = "ca.pem"
tls_cert_file = "gw.pem"
tls_key_file = "gw.key"
username = "gw-1"
password_file = "mqtt.pass"
e2e_ack = true
protocol = "3.1.1"

[[upstreams]]
name = "discom"
kind = "ies-https"
url = "https://ies.example/beckn"
mode = "direct"
subscriber_id = "gw-1.discom.example"
key_id = "k1"
signing_key_file = "/etc/ies-agent/beckn.key"
meter_refs = { grid = "did:web:discom.example:meter:1" }

[[upstreams]]
name = "stick"
kind = "file"
path = "/media/usb"
enabled = false

[storage]
reserve_mb = 100
quota_mb = 2048
"""
    )
    site = load_site(write(tmp_path, text))
    mqtt, ies, stick = site.upstreams
    assert (mqtt.name, mqtt.kind, mqtt.prefix, mqtt.protocol) == (
        "utility",
        "mqtt",
        "ies",
        "3.1.1",
    )
    assert mqtt.tls and mqtt.e2e_ack and mqtt.batch_max_entries == 200
    assert mqtt.tls_ca_file == tmp_path / "ca.pem"
    assert mqtt.password_file == tmp_path / "mqtt.pass"
    assert ies.mode == "direct" and ies.action == "on_status"
    assert ies.meter_refs == {"grid": "did:web:discom.example:meter:1"}
    assert stick.path == Path("/media/usb") and not stick.enabled
    assert (site.storage.reserve_mb, site.storage.quota_mb) == (100, 2048)


@pytest.mark.parametrize(
    ("table", "key", "message"),
    [
        ('kind = "mqtt"\nurl = "http://b:1883"', "url", "is not a mqtt url"),
        (
            'kind = "mqtt"\nurl = "mqtt://b"\ntls_ca_file = "ca.pem"',
            "tls_ca_file",
            "plain mqtt://",
        ),
        (
            'kind = "mqtt"\nurl = "mqtts://b"\ntls_cert_file = "c.pem"',
            "tls_cert_file",
            "needs both",
        ),
        (
            'kind = "mqtt"\nurl = "mqtts://b"\nprefix = "ies/#"',
            "prefix",
            "not a topic prefix",
        ),
        (
            'kind = "mqtt"\nurl = "mqtts://b"\npassword_file = "p"',
            "password_file",
            "needs username",
        ),
        (
            'kind = "mqtt"\nurl = "mqtts://b"\nmode = "direct"',
            "mode",
            "applies to ies-https upstreams only",
        ),
        ('kind = "ies-https"\nurl = "http://ies.example"', "url", "only allowed to"),
        (
            'kind = "ies-https"\nurl = "https://x"\nmode = "direct"',
            "subscriber_id",
            "needs subscriber_id",
        ),
        ('kind = "ies-https"\nurl = "https://x"\nkey_id = "a|b"', "key_id", "'|'"),
        ('kind = "file"', "path", "missing"),
        ('kind = "ftp"', "kind", "is not one of"),
        (
            'kind = "file"\npath = "/x"\nbatch_max_entries = 0',
            "batch_max_entries",
            "out of range",
        ),
    ],
)
def test_bad_upstream_tables_name_line_and_key(
    tmp_path: Path, table: str, key: str, message: str
) -> None:
    text = GATEWAY + '\n[[upstreams]]\nname = "u"\n' + table + "\n"
    with pytest.raises(ConfigError) as caught:
        load_site(write(tmp_path, text))
    problem = next(p for p in caught.value.problems if p.key.endswith(key))
    assert message in problem.message
    assert problem.line is not None and problem.line > 3


def test_duplicate_upstream_names_are_refused(tmp_path: Path) -> None:
    one = '\n[[upstreams]]\nname = "u"\nkind = "file"\npath = "/a"\n'
    with pytest.raises(ConfigError, match="already used"):
        load_site(write(tmp_path, GATEWAY + one + one))
