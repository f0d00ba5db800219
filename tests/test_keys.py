"""The log signing key: creation, permissions, key card, rotation, `keys` command."""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from evidence_log_fixtures import (
    check_log,
    entries,
    key_card,
    make_reading,
    spawn_writer,
)
from ies_agent.clock import OffsetClock
from ies_agent.evidence import keys, keys_command, note
from ies_agent.evidence.errors import KeyFileError, LogLockedError
from ies_agent.evidence.log import EvidenceLog


@pytest.fixture
def clock() -> OffsetClock:
    return OffsetClock(tq="S")


def open_log(data_dir: Path, clock: OffsetClock, **kwargs: Any) -> EvidenceLog:
    return EvidenceLog.open(data_dir, gateway_id="GW-7", clock=clock, **kwargs)


def run_keys(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="ies-agent keys")
    keys_command.configure(parser)
    return keys_command.main(parser.parse_args(list(argv)))


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(
    ("alg", "name", "type_byte"),
    [("ecdsa-p256", "ECDSA-P256-SHA256", 0x02), ("ed25519", "Ed25519", 0x01)],
)
def test_first_start_creates_a_private_key_and_card(
    tmp_path: Path, clock: OffsetClock, alg: str, name: str, type_byte: int
) -> None:
    with open_log(tmp_path, clock, key_alg=alg) as log:
        fingerprint = log.key_fingerprint
        vkey = log.vkey
    key_dir = tmp_path / "keys"
    assert mode_of(key_dir) == 0o700
    assert mode_of(key_dir / "log-key.pem") == 0o600
    assert (key_dir / "log-key.pem").read_bytes().startswith(b"-----BEGIN PRIVATE KEY")

    card = key_card(tmp_path)
    spki = base64.b64decode(card["public_key_spki_b64"])
    private = serialization.load_pem_private_key(
        (key_dir / "log-key.pem").read_bytes(), password=None
    )
    assert spki == private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert card["fingerprint"] == hashlib.sha256(spki).hexdigest() == fingerprint
    assert card["gateway_id"] == "GW-7" and card["alg"] == alg
    assert card["origin"] == "ies-agent/GW-7/log-1" and card["retired"] == []
    assert card["created"].endswith("Z")
    assert card["vkey"] == vkey == (key_dir / "log.vkey").read_text().strip()
    assert base64.b64decode(vkey.split("+", 2)[2])[0] == type_byte
    assert entries(tmp_path)[0]["keys"] == [{"alg": name, "vkey": vkey}]
    check_log(tmp_path)


def test_existing_key_is_kept(tmp_path: Path, clock: OffsetClock) -> None:
    with open_log(tmp_path, clock) as log:
        first = log.key_fingerprint
    created = key_card(tmp_path)["created"]
    with open_log(tmp_path, clock, key_alg="ed25519") as log:
        assert log.key_fingerprint == first
    assert key_card(tmp_path)["created"] == created


def test_missing_card_is_rewritten(tmp_path: Path, clock: OffsetClock) -> None:
    with open_log(tmp_path, clock):
        pass
    card = key_card(tmp_path)
    (tmp_path / "keys" / "key-card.json").unlink()
    (tmp_path / "keys" / "log.vkey").unlink()
    with open_log(tmp_path, clock):
        pass
    assert key_card(tmp_path)["fingerprint"] == card["fingerprint"]
    assert (tmp_path / "keys" / "log.vkey").read_text().strip() == card["vkey"]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_key_readable_by_others_is_refused(
    tmp_path: Path, clock: OffsetClock, mode: int
) -> None:
    with open_log(tmp_path, clock):
        pass
    key_file = tmp_path / "keys" / "log-key.pem"
    os.chmod(key_file, mode)
    size = (tmp_path / "evidence.jsonl").stat().st_size
    with pytest.raises(KeyFileError) as raised:
        open_log(tmp_path, clock)
    message = str(raised.value)
    assert str(key_file) in message
    assert f"mode {mode:04o}" in message
    assert f"chmod 600 {key_file}" in message
    # Refused before writing anything, and the lock is free again.
    assert (tmp_path / "evidence.jsonl").stat().st_size == size
    os.chmod(key_file, 0o600)
    with open_log(tmp_path, clock):
        pass


def test_malformed_or_missing_key_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    fd = os.open(bad, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"-----BEGIN PRIVATE KEY-----\nnot a key\n")
    os.close(fd)
    with pytest.raises(KeyFileError, match="does not hold an unencrypted PKCS8"):
        keys.load_private_key(bad)
    with pytest.raises(KeyFileError, match="does not exist"):
        keys.load_private_key(tmp_path / "absent.pem")


def test_key_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    keys.write_private_key(path, keys.generate_private_key())
    before = path.read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        keys.write_private_key(path, keys.generate_private_key())
    assert path.read_bytes() == before
    assert not (tmp_path / "k.pem.tmp").exists()
    with pytest.raises(ValueError, match="unknown key algorithm"):
        keys.generate_private_key("rsa")


def test_key_material_is_never_logged(
    tmp_path: Path, clock: OffsetClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with open_log(tmp_path, clock) as log:
        log.append_reading(make_reading(clock))
        old_pem = (tmp_path / "keys" / "log-key.pem").read_bytes()
        log.rotate_key()
    new_pem = (tmp_path / "keys" / "log-key.pem").read_bytes()
    text = caplog.text + (tmp_path / "evidence.jsonl").read_text()
    for pem in (old_pem, new_pem):
        body = b"".join(pem.splitlines()[1:-1]).decode()
        assert body[:40] not in text
        assert "PRIVATE KEY" not in text


def test_rotation_hands_over_under_both_keys(
    tmp_path: Path, clock: OffsetClock
) -> None:
    with open_log(tmp_path, clock) as log:
        log.append_reading(make_reading(clock))
        old_fp, old_vkey = log.key_fingerprint, log.vkey
    new = keys.rotate(tmp_path)
    with open_log(tmp_path, clock) as log:
        assert log.key_fingerprint == new.fingerprint != old_fp
        log.append_reading(make_reading(clock))
        log.checkpoint()

    card = key_card(tmp_path)
    assert card["fingerprint"] == new.fingerprint
    assert [r["fingerprint"] for r in card["retired"]] == [old_fp]
    assert card["retired"][0]["vkey"] == old_vkey
    retired = tmp_path / "keys" / "retired" / f"log-key-{old_fp[:16]}.pem"
    assert mode_of(retired) == 0o600
    assert keys.load_private_key(retired).fingerprint == old_fp
    assert not (tmp_path / "keys" / "log-key.pem.new").exists()

    found = check_log(tmp_path)
    rotation = next(e for e in found.entries if e.get("ev") == "key_rotation")
    assert rotation["old_vkey"] == old_vkey and rotation["new_vkey"] == card["vkey"]
    assert rotation["old_fingerprint"] == old_fp
    assert rotation["new_fingerprint"] == new.fingerprint
    old_label = note.parse_vkey(old_vkey).label
    new_label = note.parse_vkey(card["vkey"]).label
    sizes = [c["size"] for c in found.checkpoints]
    signers = dict(zip(sizes, found.signers_by_checkpoint, strict=True))
    after = [s for s in sizes if s > rotation["seq"]]
    # The rotation's own checkpoint: old key only; the next: both; then the new one.
    assert after[0] == rotation["seq"] + 2
    assert signers[after[0]] == [old_label]
    assert signers[after[1]] == [new_label, old_label]
    assert all(signers[s] == [new_label] for s in after[2:]) and len(after) >= 3
    assert all(signers[s] == [old_label] for s in sizes if s < rotation["seq"])
    boots = [e for e in found.entries if e.get("ev") == "boot"]
    assert boots[-1]["keys"][0]["vkey"] == card["vkey"]


def test_rotation_interrupted_before_switching_is_finished_on_open(
    tmp_path: Path, clock: OffsetClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fault injection: the process "dies" right after logging the rotation, before
    # the key files are switched.
    log = open_log(tmp_path, clock)
    old_fp = log.key_fingerprint

    def die(*args: object, **kwargs: object) -> None:
        raise SystemExit("killed")

    with monkeypatch.context() as patch:
        patch.setattr(keys, "commit_rotation", die)
        with pytest.raises(SystemExit):
            log.rotate_key()
    log._release()
    staged = keys.load_staged_key(tmp_path)
    assert staged is not None

    with open_log(tmp_path, clock) as log:
        assert log.key_fingerprint == staged.fingerprint != old_fp
    found = check_log(tmp_path)
    new_label = note.parse_vkey(key_card(tmp_path)["vkey"]).label
    both = [s for s in found.signers_by_checkpoint if len(s) == 2]
    assert len(both) == 1 and both[0][0] == new_label
    assert not (tmp_path / "keys" / "log-key.pem.new").exists()


def test_rotation_switched_but_not_cosigned_is_cosigned_on_open(
    tmp_path: Path, clock: OffsetClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = open_log(tmp_path, clock)
    log.rotate_key()
    log._release()  # dies before any checkpoint under the new key
    with open_log(tmp_path, clock) as log:
        log.checkpoint()
    found = check_log(tmp_path)
    assert [len(s) for s in found.signers_by_checkpoint] == [1, 2, 1]


def test_staged_key_never_logged_is_discarded(
    tmp_path: Path, clock: OffsetClock
) -> None:
    with open_log(tmp_path, clock) as log:
        fp = log.key_fingerprint
    keys.stage_new_key(tmp_path, "ecdsa-p256")
    with open_log(tmp_path, clock) as log:
        assert log.key_fingerprint == fp
    assert not (tmp_path / "keys" / "log-key.pem.new").exists()


def test_keys_show(
    tmp_path: Path, clock: OffsetClock, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_keys("show", "--data-dir", str(tmp_path)) == 1
    assert "no key in" in capsys.readouterr().err
    with open_log(tmp_path, clock) as log:
        fingerprint = log.key_fingerprint
    assert run_keys("show", "--data-dir", str(tmp_path)) == 0
    out = capsys.readouterr().out
    first, rest = out.split("\n", 1)
    assert first == f"fingerprint: {fingerprint}"
    assert json.loads(rest) == key_card(tmp_path)
    assert "PRIVATE" not in out


def test_keys_rotate_command(
    tmp_path: Path, clock: OffsetClock, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_keys("rotate", "--data-dir", str(tmp_path)) == 1
    assert "nothing to rotate" in capsys.readouterr().err
    with open_log(tmp_path, clock) as log:
        old = log.key_fingerprint
    assert run_keys("rotate", "--data-dir", str(tmp_path), "--alg", "ed25519") == 0
    assert key_card(tmp_path)["alg"] == "ed25519"
    assert key_card(tmp_path)["fingerprint"] != old
    assert "new fingerprint" in capsys.readouterr().out
    check_log(tmp_path)


def test_keys_rotate_refused_while_an_agent_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    peer = spawn_writer(tmp_path, "hold")
    try:
        assert peer.stdout is not None
        assert peer.stdout.readline().strip() == "ready"
        fingerprint = key_card(tmp_path)["fingerprint"]
        with pytest.raises(LogLockedError):
            keys.rotate(tmp_path)
        assert run_keys("rotate", "--data-dir", str(tmp_path)) == 1
        assert "in use by another process" in capsys.readouterr().err
        assert key_card(tmp_path)["fingerprint"] == fingerprint
        assert not (tmp_path / "keys" / "log-key.pem.new").exists()
    finally:
        peer.communicate(timeout=10)
    assert peer.returncode == 0
