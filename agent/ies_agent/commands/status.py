"""``ies-agent status``: what the running agent sees, in the terminal.

The running agent rewrites ``status.json`` in its data directory every two seconds
(:mod:`ies_agent.web.service`) and holds the directory's ``lock`` file. This command
checks the lock is held (so the file belongs to a live agent), reads the file and
prints devices, buses, evidence and upstreams; ``--json`` prints the file as it is.

Exit status: 0 an agent runs and the file is fresh, 1 no agent runs (or its file is
missing or stale), 2 a usage error.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

STALE_AFTER_S = 30.0
"""A status file older than this (seconds) means the agent is stuck."""


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``status`` arguments."""
    parser.add_argument(
        "--data-dir",
        default=None,
        help="the agent's data directory (default /var/lib/ies-agent)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def agent_holds_lock(data_dir: Path) -> int | None:
    """Return the pid of the agent holding ``data_dir``'s lock, or None.

    Tries to take the lock without waiting: if that succeeds nobody holds it (the
    lock is released at once). Returns 0 when it is held but the pid is unknown.
    """
    import fcntl
    import os

    from ies_agent.evidence.log import LOCK_FILE

    path = data_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else 0
    finally:
        os.close(fd)
    return None


def read_status(data_dir: Path) -> dict[str, Any]:
    """Return the parsed status file; raise OSError or ValueError when unusable."""
    import json

    from ies_agent.web.service import STATUS_FILE

    data = json.loads((data_dir / STATUS_FILE).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError("the status file does not hold a JSON object")
    return data


def main(args: argparse.Namespace) -> int:
    """Print the running agent's status; return 1 when no agent runs."""
    import json
    import time

    from ies_agent.config import DEFAULT_DATA_DIR

    data_dir = Path(args.data_dir) if args.data_dir else DEFAULT_DATA_DIR
    pid = agent_holds_lock(data_dir)
    problem: str | None = None
    status: dict[str, Any] = {}
    if not data_dir.is_dir():
        problem = f"{data_dir} is not a directory: give the agent's --data-dir"
    elif pid is None:
        problem = f"no agent is running on {data_dir} (its lock is not held)"
    else:
        try:
            status = read_status(data_dir)
        except (OSError, ValueError) as exc:
            problem = f"an agent holds {data_dir} but its status file is bad: {exc}"
    age_s = None
    if status:
        age_s = time.time() - int(status.get("written_ms", 0)) / 1000
        if problem is None and age_s > STALE_AFTER_S:
            problem = (
                f"the agent (pid {pid}) has not updated its status for {age_s:.0f} s; "
                "it may be stuck (see journalctl -u ies-agent)"
            )
    if args.json:
        print(
            json.dumps(
                {"running": problem is None, "problem": problem, "status": status},
                indent=2,
                default=str,
            )
        )
    elif problem is not None:
        print(f"ies-agent status: {problem}")
    else:
        print(format_status(status, age_s or 0.0))
    return 0 if problem is None else 1


def format_status(status: dict[str, Any], age_s: float) -> str:
    """Return the status as lines for a terminal."""
    lines = [
        f"gateway {status.get('gateway')} (pid {status.get('pid')}), "
        f"status written {age_s:.0f} s ago"
    ]
    lines.append("devices:")
    for dev in status.get("devices", []):
        online = dev.get("online")
        state = "starting" if online is None else "online" if online else "NO ANSWER"
        errors = sum(dev.get("faults", {}).values())
        latency = dev.get("last_latency_s")
        shown = ", ".join(
            f"{name}={v['value']} {v['unit']}".rstrip()
            for name, v in list(dev.get("values", {}).items())[:3]
            if v.get("value") is not None
        )
        lines.append(
            f"  {dev['id']:<14} {state:<9} reads {dev.get('reads', 0)}, errors "
            f"{errors}, latency "
            + ("-" if latency is None else f"{latency * 1000:.0f} ms")
            + (f"; {shown}" if shown else "")
        )
        if dev.get("online") is False and dev.get("last_error"):
            lines.append(f"  {'':<14} last error: {dev['last_error']}")
    for bus in status.get("buses", []):
        link = "up" if bus.get("connected") else f"DOWN ({bus.get('last_error')})"
        lines.append(f"bus {bus['id']}: {bus.get('endpoint')} {link}")
    ev = status.get("evidence", {})
    age = ev.get("checkpoint_age_s")
    lines.append(
        f"evidence: {ev.get('entries')} entries, "
        + ("no checkpoint this run" if age is None else f"checkpoint {age:.0f} s ago")
        + f", key {str(ev.get('key_fingerprint', ''))[:16]}…"
    )
    ups = status.get("upstreams", [])
    if not ups:
        lines.append("upstreams: none configured")
    for up in ups:
        link = "connected" if up.get("connected") else "DOWN"
        lines.append(
            f"upstream {up['name']}: {link}, backlog {up.get('backlog_entries')} "
            "entries"
            + (f", last error: {up['last_error']}" if up.get("last_error") else "")
        )
    return "\n".join(lines)
