"""``ies-agent read --config FILE DEVICE``: read one device now and print a table."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``read`` arguments."""
    parser.add_argument("--config", required=True, help="site configuration (TOML)")
    parser.add_argument("device", metavar="DEVICE", help="device id from the site file")
    parser.add_argument("--json", action="store_true", help="print JSON instead")


def main(args: argparse.Namespace) -> int:
    """Read the device once; exit 1 if it does not answer or the config is wrong."""
    import asyncio
    import dataclasses
    import json
    import logging

    from ies_agent.clock import SystemClock
    from ies_agent.config import ConfigError, load_site
    from ies_agent.dlms_config import DlmsSecretError
    from ies_agent.runtime import build_devices
    from ies_drivers.errors import DriverError
    from ies_drivers.reading import Reading

    # One shot: the error printed below says it all; no separate outage log line.
    logging.getLogger("ies_drivers").setLevel(logging.ERROR)
    try:
        site = load_site(args.config, allow_short_interval=True)
    except ConfigError as exc:
        print(exc)
        return 1
    if args.device not in site.devices:
        known = ", ".join(site.devices) or "none"
        print(f"{args.config}: no device {args.device!r} (devices: {known})")
        return 2
    one = {args.device: site.devices[args.device]}
    try:
        buses, devices = build_devices(dataclasses.replace(site, devices=one))
    except DlmsSecretError as exc:
        print(f"{args.device}: {exc}")
        return 1
    device = devices[0]

    async def read() -> tuple[dict[str, str], list[Reading]]:
        bus = buses.get(site.devices[args.device].bus)  # None: the device owns its link
        if bus is not None:
            await bus.start()
        try:
            identity = await device.open()
            readings = await device.read(SystemClock())
        finally:
            if bus is not None:
                await bus.close()
            close = getattr(device, "close", None)
            if close is not None:
                await close()
        return identity, readings

    try:
        identity, readings = asyncio.run(read())
    except DriverError as exc:
        print(f"{args.device}: {exc}")
        return 1
    if args.json:
        rows = [
            {
                "quantity": r.quantity,
                "value": r.value,
                "unit": r.unit,
                "obis": r.obis,
                "state": r.state.name.lower(),
            }
            for r in readings
        ]
        print(json.dumps({"device": args.device, "identity": identity, "values": rows}))
        return 0
    ident = ", ".join(f"{k}={v}" for k, v in identity.items())
    print(f"{args.device}: {ident}")
    table = [("quantity", "value", "unit", "OBIS", "state")]
    for r in readings:
        shown = r.value if r.value is not None else _STATE_TEXT.get(r.state.name, "-")
        table.append((r.quantity, shown, r.unit, r.obis or "", r.state.name.lower()))
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    return 0


_STATE_TEXT = {
    "NOT_IMPLEMENTED": "not implemented",
    "TIMEOUT": "timeout",
    "ERROR": "error",
}
