"""``ies-agent firmware list``: the firmware bridge's cache and recent transfers.

Asks the running ``ies-firmware-bridge`` over its socket (``--socket``, else the
``[firmware] socket`` of ``--config``, else ``/run/ies-firmware-bridge/bridge.sock``)
and prints the verified files it holds (hash, size, name, how it was verified) and the
last transfers (charger, action, state, OCPP status, reason). ``--json`` prints the
bridge's answer as it is.

Exit status: 0 shown, 1 the bridge cannot be reached or the config is unusable,
2 a usage error.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``firmware`` arguments."""
    sub = parser.add_subparsers(dest="firmware_command", metavar="ACTION")
    listing = sub.add_parser("list", help="show the cache and recent transfers")
    # The same options before or after ACTION; the subparser's defaults must not
    # overwrite what was given before it, hence SUPPRESS there.
    for target, default in ((parser, None), (listing, argparse.SUPPRESS)):
        target.add_argument(
            "--socket", type=Path, default=default, help="bridge socket"
        )
        target.add_argument("--config", type=Path, default=default, help="site file")
        target.add_argument(
            "--json",
            action="store_true",
            default=False if default is None else default,
            help="print JSON",
        )


def main(args: argparse.Namespace) -> int:
    """Run ``ies-agent firmware list``."""
    import asyncio
    import json
    import sys

    from ies_agent.firmware_client import DEFAULT_SOCKET, FirmwareBridgeError, query

    if args.firmware_command not in (None, "list"):
        print("usage: ies-agent firmware list", file=sys.stderr)
        return 2
    socket = args.socket
    if socket is None and args.config is not None:
        from ies_agent.config import ConfigError, load_site

        try:
            site = load_site(args.config)
        except ConfigError as exc:
            print(f"ies-agent firmware: {exc}", file=sys.stderr)
            return 1
        if site.firmware is not None:
            socket = site.firmware.socket
    try:
        answer = asyncio.run(query(socket or DEFAULT_SOCKET, "list"))
    except FirmwareBridgeError as exc:
        print(f"ies-agent firmware: {exc}", file=sys.stderr)
        return 1
    if args.json:
        answer.pop("id", None)
        answer.pop("ok", None)
        print(json.dumps(answer, indent=2, sort_keys=True))
        return 0
    print(render(answer))
    return 0


def render(answer: dict[str, Any]) -> str:
    """The bridge's ``list`` answer as text for a terminal."""
    used = int(answer.get("used_bytes", 0))
    quota = int(answer.get("quota_bytes", 0)) or 1
    lines = [f"cache: {_size(used)} of {_size(quota)} ({100 * used // quota}%)"]
    files = answer.get("cache") or []
    if not files:
        lines.append("  (no verified files)")
    for item in files:
        lines.append(
            f"  {item['sha256'][:16]}  {_size(int(item['size'])):>9}  "
            f"{item['name']}  verified by {item['verified_by']}"
        )
    lines.append("recent transfers:")
    transfers = answer.get("transfers") or []
    if not transfers:
        lines.append("  (none)")
    for item in transfers:
        status = item.get("charger_status") or item.get("status") or "-"
        line = (
            f"  {item['id']}  {item['charger']:<14} {item['action']:<20} "
            f"{item['state']:<11} {status}"
        )
        if item.get("reason"):
            line += f"  ({item['reason'][:100]})"
        lines.append(line)
    return "\n".join(lines)


def _size(count: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if count < 1024:
            return f"{count} {unit}"
        count //= 1024
    return f"{count} GiB"
