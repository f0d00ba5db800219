"""``ies-agent scan``: find Modbus unit ids on a bus and SunSpec models on a device.

For installers on site: point it at a serial line, a TCP device or a bus of the site
file; it lists the unit ids that answer, walks the SunSpec model chain of each, and
prints ``[[devices]]`` entries to paste into the site file.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ies_drivers.modbus.bus import ModbusBus


def parse_units(text: str) -> list[int]:
    """Parse ``"1-10,126,247"`` into unit ids; raise ``ValueError`` with the reason."""
    units: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(
                f"{part!r} is not a unit id or range: write e.g. 1-10,126,247"
            ) from None
        if not (0 <= first <= last <= 255):
            raise ValueError(f"unit range {part!r} is outside 0-255")
        units.extend(range(first, last + 1))
    if not units:
        raise ValueError("no unit ids given")
    return units


def parse_host_port(text: str, default_port: int = 502) -> tuple[str, int]:
    """Parse ``host``, ``host:port``, ``[v6]`` or ``[v6]:port``; raise ValueError."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r} is not [ADDRESS]:PORT")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""  # a bare name or IPv6 address
    if not host:
        raise ValueError(f"{text!r} names no host: write HOST:PORT, e.g. 10.0.0.5:502")
    try:
        number = int(port) if port else default_port
    except ValueError:
        raise ValueError(f"{text!r}: port {port!r} is not a number") from None
    if not 1 <= number <= 65535:
        raise ValueError(f"{text!r}: port {number} is outside 1-65535")
    return host, number


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``scan`` arguments."""
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--tcp", metavar="HOST[:PORT]", help="a Modbus TCP device")
    where.add_argument(
        "--rtu-over-tcp", metavar="HOST:PORT", help="a serial-to-Ethernet converter"
    )
    where.add_argument("--serial", metavar="PORT", help="an RS-485 line (/dev/ttyUSB0)")
    where.add_argument("--bus", metavar="BUS", help="a bus of the site file (--config)")
    parser.add_argument("--config", help="site configuration, with --bus")
    parser.add_argument("--baudrate", type=int, default=9600)
    parser.add_argument("--parity", choices=["N", "E", "O"], default="N")
    parser.add_argument(
        "--units", default=None, help="unit ids to try (default 1-247 serial, 1-10 TCP)"
    )
    parser.add_argument(
        "--timeout", type=float, default=0.3, help="answer deadline per id (s)"
    )
    parser.add_argument("--no-sunspec", action="store_true", help="skip SunSpec walk")


def main(args: argparse.Namespace) -> int:
    """Scan and print what answered; exit 1 if nothing did or the bus is unusable."""
    import asyncio

    from ies_drivers.errors import DriverError
    from ies_drivers.modbus.bus import BusSpec, ModbusBus

    # Which bus.
    if args.bus:
        if not args.config:
            print("ies-agent scan: --bus needs --config FILE")
            return 2
        from ies_agent.config import ConfigError, load_site

        try:
            site = load_site(args.config, allow_short_interval=True)
        except ConfigError as exc:
            print(exc)
            return 1
        if args.bus not in site.buses:
            print(
                f"{args.config}: no bus {args.bus!r} (buses: {', '.join(site.buses)})"
            )
            return 1
        spec = site.buses[args.bus].to_bus_spec()
    elif args.serial:
        spec = BusSpec(
            name="scan",
            kind="rtu",
            serial_port=args.serial,
            baudrate=args.baudrate,
            parity=args.parity,
        )
    else:
        target = args.tcp or args.rtu_over_tcp
        try:
            host, port_number = parse_host_port(target)
        except ValueError as exc:
            print(f"ies-agent scan: {exc}")
            return 2
        if args.tcp:
            spec = BusSpec(name="scan", kind="tcp", host=host, port=port_number)
        else:
            spec = BusSpec(
                name="scan", kind="rtu-over-tcp", host=host, port=port_number
            )
    try:
        default_units = "1-10" if spec.kind == "tcp" else "1-247"
        units = parse_units(args.units or default_units)
    except ValueError as exc:
        print(f"ies-agent scan: --units: {exc}")
        return 2

    async def scan() -> list[tuple[int, list[int]]]:
        bus = ModbusBus(spec)
        await bus.start()
        try:
            return await scan_bus(
                bus, units, timeout_s=args.timeout, sunspec=not args.no_sunspec
            )
        finally:
            await bus.close()

    print(f"scanning {spec.endpoint} for unit ids {args.units or default_units} …")
    try:
        found = asyncio.run(scan())
    except DriverError as exc:
        print(f"ies-agent scan: {exc}")
        return 1
    if not found:
        print("no device answered")
        return 1
    for unit, models in found:
        sunspec = f"SunSpec models {models}" if models else "no SunSpec marker"
        print(f"unit {unit}: answers; {sunspec}")
    if len(found) == len(units) > 1:
        print(
            "warning: every unit id asked answered. Some devices and gateways answer "
            "for any id; check the proposed entries by reading a register you know "
            "(ies-agent read) before adding them all."
        )
    print("\nProposed entries for the site file:")
    for entry in proposed_entries(found, args.bus or "<bus id>"):
        print("\n" + entry)
    return 0


async def scan_bus(
    bus: ModbusBus,
    units: list[int],
    *,
    timeout_s: float,
    sunspec: bool = True,
) -> list[tuple[int, list[int]]]:
    """Return ``(unit, SunSpec model ids)`` for each of ``units`` that answers.

    ``bus`` is started and stays open (the running agent's own bus owner may be
    passed, so a scan queues behind its reads). Raises the driver's
    :class:`~ies_drivers.errors.TransportError` when the bus is unreachable.
    """
    from ies_drivers.errors import DriverError
    from ies_drivers.modbus.scan import scan_units
    from ies_drivers.sunspec.discovery import SunSpecError, discover

    found: list[tuple[int, list[int]]] = []
    for unit in await scan_units(bus, units, timeout_s=timeout_s):
        models: list[int] = []
        if sunspec:
            try:
                models = [m.model_id for m in await discover(bus, unit)]
            except (SunSpecError, DriverError):
                models = []
        found.append((unit, models))
    return found


def proposed_entries(found: list[tuple[int, list[int]]], bus_id: str) -> list[str]:
    """Return one ``[[devices]]`` table (TOML text) per unit found by a scan."""
    entries: list[str] = []
    for unit, models in found:
        kind = "meter" if any(200 <= m < 300 for m in models) else "inverter"
        template = f"sunspec-{kind}" if models else "<template: see configs/devices>"
        entries.append(
            f'[[devices]]\nid = "unit{unit}"\nbus = "{bus_id}"\n'
            f'unit = {unit}\ntemplate = "{template}"'
        )
    return entries
