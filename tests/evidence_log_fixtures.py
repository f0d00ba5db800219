"""Helpers for the evidence log writer tests: readings, file access, integrity checks.

``check_log`` re-derives everything a verifier checks from the files alone (canonical
bytes, contiguous ``seq``, the ``prev`` chain, per-source ``sseq``, every checkpoint's
signature and root, sizes never shrinking), using only the primitives; when the product
verifier (``ies_agent.evidence.verify``) is present, ``check_log`` runs it as well.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ies_agent.clock import Clock
from ies_agent.evidence import canonical, merkle, note
from ies_drivers.reading import Reading, ReadingState

PEERS = Path(__file__).resolve().parent / "peers"
WRITER_PEER = PEERS / "evidence_writer.py"


def make_reading(
    clock: Clock,
    *,
    src: str = "m1",
    value: str | None = "12345.678",
    state: ReadingState = ReadingState.OK,
    quantity: str = "import_energy",
    obis: str | None = "1-0:1.8.0*255",
    unit: str = "kWh",
    cumulative: bool = True,
    raw: str = "modbus:fc03:0x5000:0000000000bc614e",
    **extra: Any,
) -> Reading:
    """Return a Reading stamped now by ``clock``."""
    stamp = clock.now()
    return Reading(
        source=src,
        quantity=quantity,
        obis=obis,
        value=value,
        unit=unit,
        state=state,
        raw=raw,
        t_ms=stamp.t_ms,
        tq=stamp.tq,
        mono_ns=stamp.mono_ns,
        cumulative=cumulative,
        **extra,
    )


def log_lines(data_dir: Path) -> list[bytes]:
    """Return the entry lines of ``evidence.jsonl`` (without newlines)."""
    data = (data_dir / "evidence.jsonl").read_bytes()
    assert data.endswith(b"\n") or not data
    return data.split(b"\n")[:-1]


def entries(data_dir: Path) -> list[dict[str, Any]]:
    """Return the parsed entries (each checked canonical)."""
    return [canonical.parse_entry(line) for line in log_lines(data_dir)]


def checkpoint_lines(data_dir: Path) -> list[dict[str, Any]]:
    """Return the parsed lines of ``checkpoints.jsonl``."""
    path = data_dir / "checkpoints.jsonl"
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def key_card(data_dir: Path) -> dict[str, Any]:
    """Return the key card of ``data_dir``."""
    card: dict[str, Any] = json.loads((data_dir / "keys" / "key-card.json").read_text())
    return card


def b64_sha256(line: bytes) -> str:
    """Base64 SHA-256 of ``line``: the ``prev`` of the entry after it."""
    return base64.b64encode(hashlib.sha256(line).digest()).decode()


def forge(data_dir: Path, old: bytes, new: bytes) -> int:
    """Replace ``old`` by ``new`` in the first entry holding it and recompute every
    later ``prev``, as a forger without the key would; return the altered seq."""
    lines = log_lines(data_dir)
    target = next(i for i, line in enumerate(lines) if old in line)
    lines[target] = lines[target].replace(old, new, 1)
    for index in range(target + 1, len(lines)):
        entry = canonical.parse_entry(lines[index])
        entry["prev"] = b64_sha256(lines[index - 1])
        lines[index] = canonical.canonical_bytes(entry)
    (data_dir / "evidence.jsonl").write_bytes(b"".join(x + b"\n" for x in lines))
    return target


def cut_checkpoints(data_dir: Path, count: int) -> None:
    """Remove the last ``count`` lines of ``checkpoints.jsonl``."""
    path = data_dir / "checkpoints.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-count]))


@dataclass
class LogCheck:
    """What ``check_log`` found in a data directory."""

    entries: list[dict[str, Any]]
    checkpoints: list[dict[str, Any]]
    signers_by_checkpoint: list[list[str]]


def all_vkeys(data_dir: Path) -> list[str]:
    """Every verifier key the card and the log's events name (current and retired)."""
    card = key_card(data_dir)
    found = [card["vkey"], *(item["vkey"] for item in card.get("retired", []))]
    for entry in entries(data_dir):
        if entry.get("ev") == "key_rotation":
            found += [entry["old_vkey"], entry["new_vkey"]]
    return list(dict.fromkeys(found))


def check_log(data_dir: Path, *, run_verifier: bool = True) -> LogCheck:
    """Check every integrity property of the log in ``data_dir``; fail on any breach."""
    lines = log_lines(data_dir)
    parsed = [canonical.parse_entry(line) for line in lines]
    sseq: dict[str, int] = {}
    for index, entry in enumerate(parsed):
        assert entry["seq"] == index, f"seq {entry['seq']} at line {index}"
        assert entry["v"] == 1
        if index:
            assert entry["prev"] == b64_sha256(lines[index - 1]), f"prev of {index}"
        else:
            assert "prev" not in entry
        if entry["type"] == "reading":
            expected = sseq.get(entry["src"], 0)
            assert entry["sseq"] == expected, f"sseq of seq {index}"
            sseq[entry["src"]] = expected + 1
    # Roots at every checkpointed size, in one pass over the leaves.
    sizes = sorted({item["size"] for item in checkpoint_lines(data_dir)})
    roots: dict[int, bytes] = {}
    frontier = merkle.MerkleFrontier()
    wanted = iter(sizes)
    next_size = next(wanted, None)
    for line in lines:
        if next_size is None:
            break
        frontier.append(merkle.leaf_hash(line))
        while next_size == frontier.size:
            roots[next_size] = frontier.root()
            next_size = next(wanted, None)
    verifiers = [note.parse_vkey(vkey) for vkey in all_vkeys(data_dir)]
    checkpoints = checkpoint_lines(data_dir)
    signers: list[list[str]] = []
    last_size = 0
    for item in checkpoints:
        size = item["size"]
        assert size >= last_size, "checkpoint sizes shrink"
        assert size <= len(lines), f"checkpoint of {size} beyond the log"
        last_size = size
        opened = note.open_note(item["note"], verifiers)
        assert opened.verified_by, "checkpoint signed by no known key"
        assert opened.unknown_sigs == 0
        body = note.parse_checkpoint(opened.text)
        assert body.size == size
        assert body.root == roots[size]
        assert parsed[size - 1]["ev"] == "checkpoint"
        signers.append(opened.verified_by)
    if run_verifier:
        run_product_verifier(data_dir)
    return LogCheck(parsed, checkpoints, signers)


def product_verifier_present() -> bool:
    """Tell whether ``ies_agent.evidence.verify`` (the product verifier) exists."""
    return importlib.util.find_spec("ies_agent.evidence.verify") is not None


def run_product_verifier(data_dir: Path) -> None:
    """Run the product verifier on ``data_dir`` when present: no integrity error."""
    if not product_verifier_present():
        return
    from ies_agent.evidence import verify

    report = verify.verify_path(data_dir, keys=[data_dir / "keys" / "key-card.json"])
    errors = [f for f in report.findings if f.severity == "error"]
    assert not errors, "\n".join(f"{f.seq} {f.code} {f.message}" for f in errors)


def spawn_writer(data_dir: Path, *args: str) -> subprocess.Popen[str]:
    """Start the writer peer (``tests/peers/evidence_writer.py``) on ``data_dir``."""
    env = dict(os.environ)
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(
        [str(root / "agent"), str(root / "drivers"), env.get("PYTHONPATH", "")]
    )
    return subprocess.Popen(
        [sys.executable, str(WRITER_PEER), str(data_dir), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
