"""Run ``ies-agent`` as a user would: a child process, its output and exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import ROOT


def agent_env() -> dict[str, str]:
    """Environment for a child ``ies-agent``: the source roots on its path."""
    env = dict(os.environ)
    roots = [str(ROOT / "agent"), str(ROOT / "drivers"), str(ROOT / "firmware-bridge")]
    env["PYTHONPATH"] = os.pathsep.join([*roots, env.get("PYTHONPATH", "")])
    return env


def agent_cmd(*args: str) -> list[str]:
    """Return the argv that runs ``ies-agent ARGS`` with this interpreter."""
    return [sys.executable, "-m", "ies_agent.cli", *args]


def run_agent(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``ies-agent ARGS`` to completion; return its output and status."""
    return subprocess.run(
        agent_cmd(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=agent_env(),
        check=False,
    )


def entries(data_dir: Path) -> list[dict[str, Any]]:
    """Return the evidence log of ``data_dir`` as parsed entries."""
    lines = (data_dir / "evidence.jsonl").read_bytes().splitlines()
    return [json.loads(line) for line in lines]
