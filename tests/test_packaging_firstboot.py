"""First boot: a site file on the boot partition becomes the running configuration.

Temporary directories stand in for the boot partition, ``/etc/ies-agent`` and
``/var/lib/ies-agent``; the command runs as a child process as the unit runs it.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from cli_helpers import agent_cmd, agent_env, entries, run_agent
from conftest import free_port
from ies_agent.config import load_site
from ies_agent.firstboot import (
    ERROR_FILE,
    KEY_CARD_FILE,
    FirstBootError,
    find_boot_file,
    import_site_file,
    split_secrets,
)


@pytest.fixture
def gateway(tmp_path: Path) -> dict[str, Path]:
    """Scratch stand-ins for the boot partition, /etc/ies-agent and the data dir."""
    dirs = {name: tmp_path / name for name in ("boot", "etc", "data")}
    dirs["boot"].mkdir()
    return dirs


def site_text(port: int, *, extra: str = "") -> str:
    """A small valid site: one Modbus TCP meter on ``port``."""
    return f"""\
[gateway]
id = "gw-test-0001"
interval = "15m"

[[buses]]
id = "lan"
kind = "tcp"
host = "127.0.0.1"
port = {port}
timeout_s = 0.2

[[devices]]
id = "grid-meter"
bus = "lan"
unit = 1
template = "eastron-sdm630"
poll_s = 1
{extra}"""


def firstboot(gateway: dict[str, Path]) -> subprocess.CompletedProcess[str]:
    return run_agent(
        "firstboot",
        "--boot-dir",
        str(gateway["boot"]),
        "--etc-dir",
        str(gateway["etc"]),
        "--data-dir",
        str(gateway["data"]),
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


MQTT_UPSTREAM = """
[[upstreams]]
name = "utility-broker"
kind = "mqtt"
url = "mqtts://broker.example:8883"
username = "gw-test-0001"
password = "hunter2-not-real"     # the installer typed it here
"""


def test_valid_file_becomes_the_configuration_with_secrets_split_out(
    gateway: dict[str, Path],
) -> None:
    text = site_text(
        free_port(), extra=MQTT_UPSTREAM + '\n[secrets]\nbackup = "b4ckup"\n'
    )
    boot_file = gateway["boot"] / "ies-agent.toml"
    boot_file.write_text(text)

    done = firstboot(gateway)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "imported" in done.stdout
    site_file = gateway["etc"] / "ies-agent.toml"
    imported = site_file.read_text().splitlines()
    original = text.splitlines()
    assert len(imported) == len(original)  # every line kept its number
    line = original.index(
        'password = "hunter2-not-real"     # the installer typed it here'
    )
    written = 'password_file = "secrets/upstreams.0.password"'
    assert imported[line] == f"{written}     # the installer typed it here"
    assert (
        "hunter2" not in site_file.read_text() and "b4ckup" not in site_file.read_text()
    )
    assert mode(site_file) == 0o640

    secrets = gateway["etc"] / "secrets"
    assert mode(secrets) == 0o700
    assert (secrets / "upstreams.0.password").read_text() == "hunter2-not-real"
    assert (secrets / "backup").read_text() == "b4ckup"
    assert {mode(p) for p in secrets.iterdir()} == {0o600}

    # The agent loads it, and the password file is where the loader looks.
    site = load_site(site_file)
    assert site.upstreams[0].password_file == secrets / "upstreams.0.password"

    # The key exists, and its card is on the boot partition; the file with the secret
    # is gone from there.
    card = json.loads((gateway["boot"] / KEY_CARD_FILE).read_text())
    kept = json.loads((gateway["data"] / "keys" / "key-card.json").read_text())
    assert card == kept and card["gateway_id"] == "gw-test-0001"
    assert mode(gateway["data"] / "keys" / "log-key.pem") == 0o600
    assert not boot_file.exists()
    assert card["fingerprint"] in done.stdout


def test_imported_configuration_runs_and_its_log_verifies_against_the_boot_key_card(
    gateway: dict[str, Path],
) -> None:
    (gateway["boot"] / "ies-agent.toml").write_text(site_text(free_port()))
    assert firstboot(gateway).returncode == 0

    # Run the agent on the imported file until SIGTERM, as the service would.
    agent = subprocess.Popen(
        agent_cmd(
            "run",
            "--config",
            str(gateway["etc"] / "ies-agent.toml"),
            "--data-dir",
            str(gateway["data"]),
        ),
        env=agent_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log_file = gateway["data"] / "evidence.jsonl"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and agent.poll() is None:
        if log_file.exists() and '"ev":"source"' in log_file.read_text():
            break
        time.sleep(0.1)
    agent.send_signal(signal.SIGTERM)
    output, _ = agent.communicate(timeout=30)
    assert agent.returncode == 0, output

    kinds = [entry.get("ev") for entry in entries(gateway["data"])]
    assert kinds[0] == "boot" and "shutdown" in kinds
    verified = run_agent(
        "verify",
        str(gateway["data"]),
        "--key",
        str(gateway["boot"] / KEY_CARD_FILE),
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "not pinned" not in verified.stdout + verified.stderr


def test_broken_file_leaves_a_report_naming_the_lines_and_changes_nothing(
    gateway: dict[str, Path],
) -> None:
    # A gateway that was set up before...
    (gateway["boot"] / "ies-agent.toml").write_text(site_text(free_port()))
    assert firstboot(gateway).returncode == 0
    site_file = gateway["etc"] / "ies-agent.toml"
    before = site_file.read_bytes()
    card_before = (gateway["boot"] / KEY_CARD_FILE).read_bytes()

    # ... gets a file with two mistakes.
    broken = site_text(free_port()).replace('interval = "15m"', 'interval = "7m"')
    broken = broken.replace('template = "eastron-sdm630"', 'template = "sdm360"')
    boot_file = gateway["boot"] / "ies-agent.toml"
    boot_file.write_text(broken)

    done = firstboot(gateway)

    assert done.returncode == 1
    report = (gateway["boot"] / ERROR_FILE).read_text()
    assert "NOT imported" in report
    assert f"{boot_file}:3: gateway.interval: " in report
    template_line = broken.splitlines().index('template = "sdm360"') + 1
    assert (
        f"{boot_file}:{template_line}: devices[0].template: no template 'sdm360'"
        in (report)
    )
    assert "\r\n" in (gateway["boot"] / ERROR_FILE).read_bytes().decode()
    assert f"{boot_file}:3:" in done.stdout
    # The earlier configuration and key card stay; the file waits for the installer.
    assert site_file.read_bytes() == before
    assert (gateway["boot"] / KEY_CARD_FILE).read_bytes() == card_before
    assert boot_file.read_text() == broken
    assert not (gateway["etc"] / ".firstboot").exists()

    # Fixed and put back, it is imported and the report goes away.
    boot_file.write_text(site_text(free_port()))
    assert firstboot(gateway).returncode == 0
    assert not (gateway["boot"] / ERROR_FILE).exists()


def test_a_file_that_is_not_toml_is_reported_with_its_line(
    gateway: dict[str, Path],
) -> None:
    (gateway["boot"] / "ies-agent.toml").write_text('[gateway]\nid = "gw-1\n')
    assert firstboot(gateway).returncode == 1
    report = (gateway["boot"] / ERROR_FILE).read_text()
    assert "ies-agent.toml:2: not valid TOML" in report
    assert not (gateway["etc"] / "ies-agent.toml").exists()


def test_secret_that_cannot_be_moved_is_reported_with_the_other_problems(
    gateway: dict[str, Path],
) -> None:
    text = site_text(free_port(), extra='\n[secrets]\napi_token = """\nabc"""\n')
    text = text.replace('interval = "15m"', 'interval = "7m"')
    (gateway["boot"] / "ies-agent.toml").write_text(text)
    with pytest.raises(FirstBootError) as caught:
        import_site_file(
            gateway["boot"] / "ies-agent.toml",
            etc_dir=gateway["etc"],
            data_dir=gateway["data"],
        )
    messages = [str(p) for p in caught.value.problems]
    assert any(":3: gateway.interval" in m for m in messages)
    line = text.splitlines().index('api_token = """') + 1
    assert any(f":{line}: secrets.api_token: write the secret" in m for m in messages)
    assert caught.value.report == gateway["boot"] / ERROR_FILE


def test_data_dir_other_than_the_services_is_refused(gateway: dict[str, Path]) -> None:
    text = site_text(free_port()).replace(
        'interval = "15m"', 'interval = "15m"\ndata_dir = "/home/pi/evidence"'
    )
    (gateway["boot"] / "ies-agent.toml").write_text(text)
    assert firstboot(gateway).returncode == 1
    report = (gateway["boot"] / ERROR_FILE).read_text()
    assert "ies-agent.toml:4: gateway.data_dir: the service keeps its data in" in report


def test_windows_line_endings_and_dotted_quoted_secret_keys(tmp_path: Path) -> None:
    path = tmp_path / "ies-agent.toml"
    text = (
        '[gateway]\r\nid = "gw-1"\r\n\r\n[upstream]\r\n'
        'mqtt."password" = \'x y\'\r\nclient_secret = "s"  # note\r\n'
        "use_token = true\r\n"
    )
    path.write_bytes(text.encode())
    rewritten, secrets = split_secrets(path)
    assert (
        rewritten.split("\r\n")[4]
        == 'mqtt."password_file" = "secrets/upstream.mqtt.password"'
    )
    assert rewritten.split("\r\n")[5] == (
        'client_secret_file = "secrets/upstream.client_secret"  # note'
    )
    assert "use_token = true" in rewritten  # not a string: not a secret
    assert [(s.name, s.value) for s in secrets] == [
        ("upstream.mqtt.password", "x y"),
        ("upstream.client_secret", "s"),
    ]


def test_boot_partition_is_found_where_each_image_mounts_it(tmp_path: Path) -> None:
    firmware, legacy = tmp_path / "boot" / "firmware", tmp_path / "boot"
    firmware.mkdir(parents=True)
    assert find_boot_file([firmware, legacy]) is None
    (legacy / "ies-agent.toml").write_text("")
    assert find_boot_file([firmware, legacy]) == legacy / "ies-agent.toml"
    (firmware / "ies-agent.toml").write_text("")
    assert find_boot_file([firmware, legacy]) == firmware / "ies-agent.toml"


def test_nothing_to_import_is_not_an_error(gateway: dict[str, Path]) -> None:
    done = firstboot(gateway)
    assert done.returncode == 0
    assert "nothing to import" in done.stdout
    assert not gateway["etc"].exists()


@pytest.mark.skipif(
    os.geteuid() != 0, reason="giving files to the service user needs root"
)
def test_as_root_the_service_user_owns_key_and_secrets(
    gateway: dict[str, Path],
) -> None:
    # `nobody` stands in for the ies-agent user, which this machine may not have.
    import pwd

    nobody = pwd.getpwnam("nobody")
    (gateway["boot"] / "ies-agent.toml").write_text(
        site_text(free_port(), extra='\n[secrets]\nbroker = "x"\n')
    )
    result = import_site_file(
        gateway["boot"] / "ies-agent.toml",
        etc_dir=gateway["etc"],
        data_dir=gateway["data"],
        owner="nobody",
    )
    owned = [
        gateway["etc"] / "secrets",
        gateway["etc"] / "secrets" / "broker",
        gateway["data"] / "keys" / "log-key.pem",
        gateway["data"],
    ]
    assert {p.stat().st_uid for p in owned} == {nobody.pw_uid}
    assert result.site_file.stat().st_uid == 0
    assert result.site_file.stat().st_gid == nobody.pw_gid
