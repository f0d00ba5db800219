"""Short versions of the benchmarks, so CI notices when one stops working.

They assert that each script runs and reports its figures, never a speed: speed is
measured by the full runs in ``bench/`` and recorded in ``bench/RESULTS.md``.
"""

from __future__ import annotations

import subprocess
import sys

from cli_helpers import agent_env
from conftest import ROOT


def bench(*args: str, timeout: float = 180) -> str:
    """Run ``bench/ARGS`` and return its standard output; fail on a non-zero exit."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=agent_env(),
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_polling_benchmark_reports_a_ratio() -> None:
    out = bench("bench_polling.py", "--seconds", "1", "--rounds", "1")
    assert "ratio" in out


def test_footprint_benchmark_reports_resident_memory() -> None:
    out = bench("bench_footprint.py", "--seconds", "6", "--devices", "3")
    assert "RSS" in out and "MiB" in out


def test_evidence_benchmark_reports_append_and_checkpoint() -> None:
    out = bench("bench_evidence.py", "--repeats", "2")
    assert "entries/s" in out


def test_verify_benchmark_reports_throughput() -> None:
    out = bench("bench_verify.py", "--entries", "5000", "--repeat", "1")
    assert "entries/s" in out
