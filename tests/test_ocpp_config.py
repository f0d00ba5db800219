"""The ``[ocpp]`` table of a site file: defaults, and every error with file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from ies_agent.config import ConfigError, load_site
from ies_agent.ocpp.server import CentralSystem, OcppSetupError
from ies_agent.state import AgentState
from ies_drivers.ocpp.versions import OcppVersion

GATEWAY = '[gateway]\nid = "gw-1"\ndata_dir = "data"\n\n'


def _site(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(GATEWAY + text)
    return path


def test_a_minimal_table_gets_safe_defaults(tmp_path: Path) -> None:
    (tmp_path / "cp1.pass").write_text("pw-0123456789\n")
    site = load_site(
        _site(
            tmp_path,
            '[ocpp]\nlisten_port = 9000\n\n[[ocpp.chargers]]\nid = "CP-1"\n'
            'password_file = "cp1.pass"\nversions = ["1.6"]\n\n'
            '[ocpp.csms]\nurl = "wss://csms.example.net/ocpp/"\n',
        )
    )
    ocpp = site.ocpp
    assert ocpp is not None
    assert ocpp.listen_host == "127.0.0.1"  # loopback unless told otherwise
    assert ocpp.security_profile == 1 and not ocpp.accept_unknown
    charger = ocpp.chargers["CP-1"]
    assert charger.versions == (OcppVersion.V16,)
    assert charger.password_file == tmp_path / "cp1.pass"
    assert ocpp.charger("stranger") is None
    assert ocpp.csms is not None and ocpp.csms.url == "wss://csms.example.net/ocpp"


def test_every_problem_is_named_with_its_line(tmp_path: Path) -> None:
    path = _site(
        tmp_path,
        "[ocpp]\n"  # line 5
        "listen_port = 70000\n"
        "security_profile = 2\n"
        "colour = 1\n"
        "\n"
        "[[ocpp.chargers]]\n"  # line 10
        'id = "CP-1"\n'
        'versions = ["1.6", "1.5"]\n'
        'quirks = ["be_nice"]\n'
        "\n"
        "[[ocpp.chargers]]\n"  # line 15
        'id = "CP-1"\n'
        'password_file = "missing.pass"\n'
        "\n"
        "[ocpp.csms]\n"
        'url = "http://csms"\n',  # line 20
    )
    with pytest.raises(ConfigError) as caught:
        load_site(path)
    text = str(caught.value)
    expected = [
        (6, "ocpp.listen_port", "out of range"),
        (8, "ocpp.colour", "unknown key"),
        (12, "ocpp.chargers[0].versions[1]", "unknown OCPP version '1.5'"),
        (13, "ocpp.chargers[0].quirks", "unknown quirk flag(s) be_nice"),
        (17, "ocpp.chargers[1].password_file", "no such file"),
        (20, "ocpp.csms.url", "not a ws:// or wss:// address"),
    ]
    for line, key, message in expected:
        assert f"{path}:{line}: {key}: " in text and message in text, (line, text)
    assert "needs tls_cert" in text and "needs tls_key" in text
    assert "needs a password_file for each charger" in text  # CP-1, profile 2


def test_a_charger_id_may_not_repeat_a_device_id(tmp_path: Path) -> None:
    path = _site(
        tmp_path,
        '[[buses]]\nid = "lan"\nkind = "tcp"\nhost = "127.0.0.1"\n\n'
        '[[devices]]\nid = "ev-1"\nbus = "lan"\nunit = 1\n'
        'template = "eastron-sdm630"\n\n'
        "[ocpp]\nlisten_port = 9000\nsecurity_profile = 0\n\n"
        '[[ocpp.chargers]]\nid = "ev-1"\n',
    )
    with pytest.raises(ConfigError, match="already a device id"):
        load_site(path)


def test_unreadable_secrets_stop_the_central_system_at_start(tmp_path: Path) -> None:
    secret = tmp_path / "cp1.pass"
    secret.write_text("\n")
    site = load_site(
        _site(
            tmp_path,
            '[ocpp]\nlisten_port = 0\n\n[[ocpp.chargers]]\nid = "CP-1"\n'
            'password_file = "cp1.pass"\n',
        )
    )
    assert site.ocpp is not None
    with pytest.raises(OcppSetupError, match="is empty"):
        CentralSystem(
            site.ocpp,
            data_dir=tmp_path,
            evidence=None,
            state=AgentState("gw-1"),
        )
