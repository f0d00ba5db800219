"""``ies-firmware-bridge``: run the firmware and file bridge (a systemd notify service).

Settings come from ``--config`` (default ``/etc/ies-firmware-bridge/bridge.toml`` when
it exists) and flags, which win. Under systemd it reports ``READY=1`` once both
servers listen, pets the watchdog while its loop runs, and stops cleanly on SIGTERM
(downloads in progress keep their ``.part`` file and resume at the next start).

Exit status: 0 stopped on request, 1 cannot start (settings, ports, socket path).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ies_firmware_bridge.config import (
    DEFAULT_CONFIG,
    BridgeConfigError,
    load_config,
)

if TYPE_CHECKING:
    from ies_agent.systemd import Notifier
    from ies_firmware_bridge.service import Bridge

log = logging.getLogger("ies_firmware_bridge")


def build_parser() -> argparse.ArgumentParser:
    """The command line: a config file and flags overriding its keys."""
    parser = argparse.ArgumentParser(
        prog="ies-firmware-bridge",
        description="Serve verified firmware to site devices; carry their log files "
        "upstream.",
    )
    parser.add_argument(
        "--config", type=Path, help=f"settings (default {DEFAULT_CONFIG})"
    )
    parser.add_argument("--state-dir", type=Path, help="transfer records, event outbox")
    parser.add_argument("--cache-dir", type=Path, help="verified files and downloads")
    parser.add_argument("--socket", type=Path, help="unix socket the agent talks to")
    parser.add_argument("--listen", help="address chargers fetch from (site LAN)")
    parser.add_argument("--port", type=int, help="HTTP(S) port for chargers (0: any)")
    parser.add_argument("--public-url", help="base URL chargers are given")
    parser.add_argument("--quota-mb", type=int, help="disk the cache may use, MiB")
    parser.add_argument("--max-file-mb", type=int, help="largest file accepted, MiB")
    parser.add_argument(
        "--trust-dir",
        type=Path,
        action="append",
        dest="trust_dirs",
        help="directory of publisher keys and CA certificates (repeatable)",
    )
    parser.add_argument("--connect-timeout-s", type=float)
    parser.add_argument("--read-timeout-s", type=float)
    parser.add_argument("--retries", type=int)
    parser.add_argument("--hold-s", type=float)
    parser.add_argument("--upstream-ca-file", type=Path)
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bridge until SIGTERM/SIGINT; return the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(levelname)s %(name)s: %(message)s"
    )
    path = args.config
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    overrides = {
        key: getattr(args, key)
        for key in (
            "state_dir",
            "cache_dir",
            "socket",
            "listen",
            "port",
            "public_url",
            "quota_mb",
            "max_file_mb",
            "trust_dirs",
            "connect_timeout_s",
            "read_timeout_s",
            "retries",
            "hold_s",
            "upstream_ca_file",
        )
    }
    try:
        config = load_config(path, overrides)
    except BridgeConfigError as exc:
        print(f"ies-firmware-bridge: {exc}", file=sys.stderr)
        return 1
    from ies_firmware_bridge.service import Bridge

    try:
        return asyncio.run(_run(Bridge(config)))
    except OSError as exc:
        print(f"ies-firmware-bridge: cannot start: {exc}", file=sys.stderr)
        return 1


async def _run(bridge: Bridge) -> int:
    from ies_agent.systemd import Notifier, watchdog_interval_s

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    notifier = Notifier.from_env()
    await bridge.start()
    notifier.ready(f"serving on {bridge.base_url}")
    print(f"bridge ready {bridge.base_url}", flush=True)
    interval = watchdog_interval_s()
    pet: asyncio.Task[None] | None = None
    if interval is not None:
        pet = asyncio.create_task(_pet(notifier, interval), name="bridge:watchdog")
    try:
        await bridge.serve(stop)
    finally:
        notifier.stopping("stopping")
        if pet is not None:
            pet.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pet
        notifier.close()
    return 0


async def _pet(notifier: Notifier, interval_s: float) -> None:
    """Pet systemd's watchdog while the event loop turns."""
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval_s)


if __name__ == "__main__":
    sys.exit(main())
