"""Helpers for evidence tests: the published test keys and a tiny log builder.

``LogBuilder`` writes a data directory in the layout of the evidence contract
(``evidence.jsonl``, ``checkpoints.jsonl``, ``keys/key-card.json``, ``keys/log.vkey``)
using only the primitives (canonical JSON, the Merkle frontier, signed notes), so the
verifier can be tested independently of the writer in ``ies_agent.evidence.log``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from ies_agent.evidence import canonical, merkle, note

VECTORS = Path(__file__).resolve().parent / "data" / "vectors"
EXAMPLE = VECTORS / "evidence_example"
EXAMPLE_ORIGIN = "evidence.example/agent/AGENT-0001/log-1"


def example_ed25519_key() -> ed25519.Ed25519PrivateKey:
    """The published Ed25519 test key: seed = SHA-256("meter-evidence test key v1")."""
    seed = hashlib.sha256(b"meter-evidence test key v1").digest()
    return ed25519.Ed25519PrivateKey.from_private_bytes(seed)


def example_p256_key() -> ec.EllipticCurvePrivateKey:
    """The published P-256 test key: private scalar 0x2a repeated 32 times."""
    return ec.derive_private_key(int.from_bytes(b"\x2a" * 32), ec.SECP256R1())


def example_ed25519_signer(origin: str = EXAMPLE_ORIGIN) -> note.Ed25519NoteSigner:
    """Note signer with the published Ed25519 test key."""
    return note.Ed25519NoteSigner(origin, example_ed25519_key())


def example_p256_signer(origin: str = EXAMPLE_ORIGIN) -> note.EcdsaP256NoteSigner:
    """Note signer with the published P-256 test key."""
    return note.EcdsaP256NoteSigner(origin, example_p256_key())


def iso_ms(t_ms: int) -> str:
    moment = datetime.fromtimestamp(t_ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t_ms % 1000:03d}Z"


T0_MS = 1_746_100_800_000
"""2025-05-01T12:00:00Z, the start of every built log."""


class LogBuilder:
    """Writes a well-formed evidence data directory entry by entry.

    Time is virtual: each entry advances ``t_ms`` and ``mono`` by ``step_ms`` unless
    the caller passes ``t_ms`` explicitly. Readings count ``sseq`` per source.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        signers: Sequence[note.NoteSigner] | None = None,
        origin: str = "ies-agent/GW-TEST/log-1",
        interval_s: int = 900,
        with_prev: bool = True,
    ) -> None:
        self.dir = data_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.origin = origin
        self.signers = list(signers or [example_p256_signer(origin)])
        self.interval_s = interval_s
        self.with_prev = with_prev
        self.lines: list[bytes] = []
        self.frontier = merkle.MerkleFrontier()
        self.sseq: dict[str, int] = {}
        self.t_ms = T0_MS
        self.mono = 5_000_000_000
        self.boot = 0
        self.notes: list[str] = []
        (self.dir / "evidence.jsonl").write_bytes(b"")
        (self.dir / "checkpoints.jsonl").write_bytes(b"")
        self.write_key_card()

    # --- keys -------------------------------------------------------------------------

    def write_key_card(self) -> None:
        """Write ``keys/key-card.json`` and ``keys/log.vkey`` for the first signer."""
        keys = self.dir / "keys"
        keys.mkdir(exist_ok=True)
        signer = self.signers[0]
        vkey = signer.vkey()
        body = base64.b64decode(vkey.split("+", 2)[2])
        # Same fields as ies_agent.evidence.keys.make_key_card writes.
        ecdsa = body[0] == note.ALG_ECDSA_P256
        card: dict[str, Any] = {
            "gateway_id": "GW-TEST",
            "origin": self.origin,
            "alg": "ECDSA-P256-SHA256" if ecdsa else "Ed25519",
            "vkey": vkey,
            "public_key": base64.b64encode(body[1:]).decode(),
            "fingerprint": hashlib.sha256(body[1:]).hexdigest(),
            "created": "2025-05-01T12:00:00Z",
            "retired": [],
        }
        (keys / "key-card.json").write_text(json.dumps(card, indent=1) + "\n")
        (keys / "log.vkey").write_text(vkey + "\n")

    def vkey_file(self, path: Path, index: int = 0) -> Path:
        """Write signer ``index``'s verifier key to ``path`` and return it."""
        path.write_text(self.signers[index].vkey() + "\n")
        return path

    # --- entries ----------------------------------------------------------------------

    def _append(self, entry: dict[str, Any], t_ms: int | None, step_ms: int) -> int:
        if t_ms is None:
            self.t_ms += step_ms
            self.mono += step_ms * 1_000_000
        else:
            self.mono += max(t_ms - self.t_ms, 0) * 1_000_000
            self.t_ms = t_ms
        seq = len(self.lines)
        base = {
            "v": 1,
            "seq": seq,
            "t": iso_ms(self.t_ms),
            "tq": "S",
            "mono": self.mono,
            "boot": self.boot,
        }
        if self.with_prev and self.lines:
            base["prev"] = base64.b64encode(
                hashlib.sha256(self.lines[-1]).digest()
            ).decode()
        line = canonical.canonical_bytes({**base, **entry})
        self.lines.append(line)
        self.frontier.append(merkle.leaf_hash(line))
        with (self.dir / "evidence.jsonl").open("ab") as stream:
            stream.write(line + b"\n")
        return seq

    def event(
        self, ev: str, *, t_ms: int | None = None, step_ms: int = 1000, **fields: Any
    ) -> int:
        """Append an event of kind ``ev`` with ``fields``; return its seq."""
        return self._append({"type": "event", "ev": ev, **fields}, t_ms, step_ms)

    def boot_event(self, *, prev_shutdown: str | None = None, **fields: Any) -> int:
        """Start a new boot (counter + 1, monotonic clock reset) and log it."""
        self.boot += 1
        self.mono = 1_000_000_000
        extra: dict[str, Any] = {
            "agent": {"id": "GW-TEST", "sw": "0.1.0", "cfg": "sha256:00"},
            "keys": [{"alg": "ECDSA-P256-SHA256", "vkey": self.signers[0].vkey()}],
            "interval_s": self.interval_s,
            "tz": "Asia/Kolkata",
        }
        if prev_shutdown is not None:
            extra["prev_shutdown"] = prev_shutdown
        extra.update(fields)
        return self.event("boot", step_ms=0, **extra)

    def reading(
        self,
        src: str,
        val: str | None,
        *,
        obis: str = "1-0:1.8.0*255",
        unit: str = "kWh",
        st: str = "G",
        cum: bool = True,
        t_ms: int | None = None,
        step_ms: int = 1000,
        **fields: Any,
    ) -> int:
        """Append a reading of ``src``; ``val=None`` leaves the value out."""
        sseq = self.sseq.get(src, 0)
        self.sseq[src] = sseq + 1
        entry: dict[str, Any] = {
            "type": "reading",
            "src": src,
            "sseq": sseq,
            "q": "import_energy",
            "obis": obis,
            "unit": unit,
            "st": st,
            "raw": f"modbus:fc03:0x5000:{sseq:016x}",
        }
        if val is not None:
            entry["val"] = val
        if cum:
            entry["cum"] = True
        entry.update(fields)
        return self._append(entry, t_ms, step_ms)

    def checkpoint(self, *, event: bool = True) -> str:
        """Append a ``checkpoint`` event (unless ``event=False``) and sign the tree."""
        if event:
            self.event("checkpoint", step_ms=10)
        text = note.checkpoint_text(
            self.origin, self.frontier.size, self.frontier.root()
        )
        signed = note.sign_note(text, self.signers)
        self.notes.append(signed)
        record = canonical.canonical_bytes({"note": signed, "size": self.frontier.size})
        with (self.dir / "checkpoints.jsonl").open("ab") as stream:
            stream.write(record + b"\n")
        return signed

    def boundary(self) -> int:
        """Return the next interval boundary (ms) after the current virtual time."""
        step = self.interval_s * 1000
        return (self.t_ms // step + 1) * step

    def interval_readings(
        self,
        sources: Sequence[str],
        values: Callable[[str, int], str],
        count: int,
        *,
        skip: Mapping[int, Sequence[str]] | None = None,
    ) -> list[int]:
        """Log ``count`` interval boundaries: one cumulative reading per source at each
        boundary (except the sources ``skip[k]`` names), then a checkpoint.
        ``values(src, k)`` gives the k-th value. Returns the boundaries (UTC ms)."""
        boundaries = []
        for k in range(count):
            boundary = self.boundary()
            boundaries.append(boundary)
            for index, src in enumerate(sources):
                if skip and src in skip.get(k, ()):
                    continue
                self.reading(src, values(src, k), t_ms=boundary + 50 * index)
            self.checkpoint()
        return boundaries

    def clock_step(self, delta_ms: int) -> None:
        """Step the gateway clock by ``delta_ms`` without the monotonic clock moving
        (as when NTP or a person sets the time)."""
        self.t_ms += delta_ms

    def rewrite(self, lines: Sequence[bytes]) -> None:
        """Replace ``evidence.jsonl`` with ``lines`` (each gets its newline back)."""
        (self.dir / "evidence.jsonl").write_bytes(b"".join(x + b"\n" for x in lines))


def standard_log(data_dir: Path, *, intervals: int = 4, **kwargs: Any) -> LogBuilder:
    """Build a clean log: boot, two sources, ``intervals`` boundaries, shutdown."""
    builder = LogBuilder(data_dir, **kwargs)
    builder.boot_event()
    for src in ("m1", "m2"):
        builder.event("source", src=src, dev={"mfr": "ACME", "model": "M-100"})
    builder.interval_readings(
        ["m1", "m2"], lambda src, k: f"{100 + k}.{len(src)}00", intervals
    )
    builder.event("shutdown")
    builder.checkpoint()
    return builder


def run_cli(
    capsys: pytest.CaptureFixture[str], command: str, *argv: object
) -> tuple[int, str, str]:
    """Run ``ies-agent <command> argv`` in-process; return (status, stdout, stderr).

    The parser is built from the command's own module (``configure`` + ``main``), as
    ``ies_agent.cli`` does, without needing every other command's module.
    """
    module = importlib.import_module(f"ies_agent.evidence.{command}_command")
    parser = argparse.ArgumentParser(prog=f"ies-agent {command}")
    module.configure(parser)
    args = parser.parse_args([str(a) for a in argv])
    status: int = module.main(args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err
