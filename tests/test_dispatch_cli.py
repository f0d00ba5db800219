"""The dispatch commands and the MQTT command path, through their real entry points."""

from __future__ import annotations

from pathlib import Path

from conftest import ROOT
from dispatch_fixtures import event_body, events, signed_event, soon, until
from ies_agent.cli import main
from ies_agent.dispatch.engine import mqtt_command_handler
from ies_agent.upstream.commands import CommandRegistry
from test_dispatch_pipeline import site

PACK = ROOT / "configs/policies/demo-site.pack.json"
TEST_TRUST = ROOT / "configs/trust/test"


def test_policy_check_accepts_the_demo_pack_with_the_test_key(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["policy", "check", str(PACK), "--trust", str(TEST_TRUST)]) == 0
    out = capsys.readouterr().out
    assert "valid policy pack demo-site@1" in out and "EV-MIN" in out


def test_policy_check_refuses_an_unpinned_or_altered_pack(
    tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    empty = tmp_path / "trust"
    empty.mkdir()
    assert main(["policy", "check", str(PACK), "--trust", str(empty)]) == 1
    assert "no trusted issuer keys" in capsys.readouterr().out
    altered = tmp_path / "pack.json"
    altered.write_bytes(PACK.read_bytes().replace(b'"min_a": "6"', b'"min_a": "2"'))
    assert main(["policy", "check", str(altered), "--trust", str(TEST_TRUST)]) == 1
    assert "does not verify" in capsys.readouterr().out


async def test_mqtt_command_and_cli_opt_out_reach_the_engine(tmp_path: Path) -> None:
    async with site(tmp_path) as s:
        registry = CommandRegistry(s.evidence.append_event)
        registry.register("dispatch", mqtt_command_handler(s.engine))
        body = event_body("evt-cmd", soon(0.1), [{"limit_pct": "50"}] * 20)
        await registry.dispatch(
            "dispatch", signed_event(body, s.issuer.key), upstream="broker"
        )
        await until(lambda: s.inverter.limit_pct == 50)
        assert main(
            ["dispatch", "optout", "evt-cmd", "--data-dir", str(s.data_dir),
             "--reason", "guests"]
        ) == 0  # fmt: skip
        assert await s.engine.wait_finished("evt-cmd", 5) == "reverted"
    assert events(s.data_dir, "command_received")[0]["handled"] is True
    assert events(s.data_dir, "dispatch_opt_out")[0]["reason"] == "guests"
