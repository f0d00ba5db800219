"""Shared fixtures: free loopback ports and helpers to start real peers.

Peers (pymodbus servers, socat pseudo-terminal pairs, Mosquitto) are started by the
fixtures on free loopback ports and stopped by their own process ids.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
for src in ("agent", "drivers", "firmware-bridge"):
    path = str(ROOT / src)
    if path not in sys.path:
        sys.path.insert(0, path)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
