"""Verify throughput of the evidence log verifier (entries per second, one core).

Builds a data directory with the primitives alone (canonical JSON, Merkle frontier,
signed notes), shaped like the agent's: one boot, ``--sources`` meters each giving
``--points`` readings per one-minute boundary (the first a cumulative energy
register, the rest power/voltage/current), a checkpoint (event + ECDSA P-256 signed
note) after every boundary, until ``--entries`` entries. Then times ``verify_path``
on it (best of ``--repeat`` runs) with the key pinned. Every checkpoint signature is
verified, so the figure depends on readings per checkpoint: ``--points 1`` is the
worst case. Target (issue 3): >= 50,000 entries/s.

    python bench/bench_verify.py [--entries 100000] [--sources 10] [--points 4]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import resource
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from ies_agent.evidence import canonical, merkle, note
from ies_agent.evidence.verify import verify_path

T0_MS = 1_746_100_800_000  # 2025-05-01T12:00:00Z, a 15-minute boundary
INTERVAL_MS = 60_000
# One-minute intervals keep 10^6 entries within 104 days of monotonic nanoseconds
# (2**53 ns), the largest integer an entry may hold.


def _iso(t_ms: int) -> str:
    seconds, millis = divmod(t_ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


POINTS = [
    ("import_energy", "1-0:1.8.0*255", "kWh"),
    ("active_power", "1-0:16.7.0*255", "W"),
    ("voltage_l1", "1-0:32.7.0*255", "V"),
    ("current_l1", "1-0:31.7.0*255", "A"),
    ("export_energy", "1-0:2.8.0*255", "kWh"),
    ("frequency", "1-0:14.7.0*255", "Hz"),
]


def build_log(
    directory: Path, entries: int, sources: int, points: int = 4
) -> note.EcdsaP256NoteSigner:
    """Write ``evidence.jsonl`` + ``checkpoints.jsonl`` with about ``entries``
    entries; return the signer (its vkey verifies the log)."""
    origin = "ies-agent/BENCH/log-1"
    signer = note.EcdsaP256NoteSigner(
        origin, ec.derive_private_key(int.from_bytes(b"\x2a" * 32), ec.SECP256R1())
    )
    frontier = merkle.MerkleFrontier()
    log = (directory / "evidence.jsonl").open("wb")
    checkpoints = (directory / "checkpoints.jsonl").open("wb")
    prev: str | None = None
    sseq = [0] * sources

    def append(fields: dict[str, object], t_ms: int) -> None:
        nonlocal prev
        entry: dict[str, object] = {
            "v": 1,
            "seq": frontier.size,
            "t": _iso(t_ms),
            "tq": "S",
            "mono": 1_000_000_000 + (t_ms - T0_MS) * 1_000_000,
            "boot": 1,
            **fields,
        }
        if prev is not None:
            entry["prev"] = prev
        line = canonical.canonical_bytes(entry)
        log.write(line + b"\n")
        frontier.append(merkle.leaf_hash(line))
        prev = base64.b64encode(hashlib.sha256(line).digest()).decode()

    append(
        {
            "type": "event",
            "ev": "boot",
            "agent": {"id": "BENCH", "sw": "0.1.0", "cfg": ""},
            "keys": [{"alg": "ECDSA-P256-SHA256", "vkey": signer.vkey()}],
            "interval_s": INTERVAL_MS // 1000,
            "tz": "Asia/Kolkata",
        },
        T0_MS,
    )
    for index in range(sources):
        append(
            {"type": "event", "ev": "source", "src": f"m{index}", "dev": {"ser": "X"}},
            T0_MS + 10 + index,
        )
    boundary = T0_MS
    while frontier.size < entries:
        boundary += INTERVAL_MS
        for index in range(sources):
            for number, (quantity, obis, unit) in enumerate(POINTS[:points]):
                value = 1_000_000 + sseq[index] * 250 + index
                fields: dict[str, object] = {
                    "type": "reading",
                    "src": f"m{index}",
                    "sseq": sseq[index],
                    "q": quantity,
                    "obis": obis,
                    "val": f"{value // 1000}.{value % 1000:03d}",
                    "unit": unit,
                    "st": "G",
                    "raw": f"modbus:fc03:0x{0x5000 + 4 * number:04x}:{value:016x}",
                }
                if quantity.endswith("_energy"):
                    fields["cum"] = True
                append(fields, boundary + 40 + index)
                sseq[index] += 1
        append({"type": "event", "ev": "checkpoint"}, boundary + 500)
        text = note.checkpoint_text(origin, frontier.size, frontier.root())
        signed = note.sign_note(text, [signer])
        record = canonical.canonical_bytes({"note": signed, "size": frontier.size})
        checkpoints.write(record + b"\n")
    log.close()
    checkpoints.close()
    return signer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--sources", type=int, default=10)
    parser.add_argument("--points", type=int, default=4, choices=range(1, 7))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        started = time.perf_counter()
        signer = build_log(directory, args.entries, args.sources, args.points)
        built_s = time.perf_counter() - started
        key = directory / "log.vkey"
        key.write_text(signer.vkey() + "\n")
        checkpoints = len((directory / "checkpoints.jsonl").read_bytes().splitlines())
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        best = best_cpu = float("inf")
        for _ in range(args.repeat):
            started, started_cpu = time.perf_counter(), time.process_time()
            report = verify_path(directory, keys=[key])
            best = min(best, time.perf_counter() - started)
            best_cpu = min(best_cpu, time.process_time() - started_cpu)
        assert report.ok and not report.findings, report.findings[:5]
        size_mb = (directory / "evidence.jsonl").stat().st_size / 1e6
        print(
            f"built {report.entries} entries ({size_mb:.1f} MB), {checkpoints} "
            f"checkpoints ({args.sources} sources x {args.points} points per "
            f"checkpoint) in {built_s:.1f} s"
        )
        # CPU time is the fairer figure on a shared machine (other processes
        # take the core now and then); both are printed.
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(
            f"peak memory {rss_after / 1024:.0f} MB "
            f"({(rss_after - rss_before) / 1024:.0f} MB more than before verifying)"
        )
        print(
            f"verify: {best:.3f} s wall, {best_cpu:.3f} s CPU, best of "
            f"{args.repeat} -> {report.entries / best:,.0f} entries/s wall, "
            f"{report.entries / best_cpu:,.0f} entries/s CPU (target >= 50,000)"
        )


if __name__ == "__main__":
    main()
