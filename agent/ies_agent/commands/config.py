"""``ies-agent config``: check a site file, list the device templates it may use.

``ies-agent config check FILE`` prints every problem as ``file:line: key: message`` and
exits 1, or prints what the site contains and exits 0. Things that depend on the
machine the file is checked on (a serial port that is not plugged in) are warnings,
not problems: the file may be prepared on a laptop for a gateway elsewhere.

``ies-agent config templates [--dir DIR ...]`` lists the templates a site can name.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ies_agent.config import Site


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``config`` actions and their arguments."""
    sub = parser.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = sub.add_parser(
        "check",
        help="validate a site file and its templates",
        description="Validate a site file and the templates it names; exit 1 on any "
        "problem.",
    )
    check.add_argument("file", help="site configuration (TOML)")
    templates = sub.add_parser(
        "templates",
        help="list the device templates a site can use",
        description="List device templates: the given directories, then the shipped "
        "ones.",
    )
    templates.add_argument(
        "--dir",
        action="append",
        default=[],
        metavar="DIR",
        help="a site template directory searched before the shipped one (repeatable)",
    )


def main(args: argparse.Namespace) -> int:
    """Run the chosen ``config`` action; return the exit status."""
    if args.config_command == "templates":
        return _templates(args.dir)
    return _check(args.file)


def _check(file: str) -> int:
    """Print the problems of ``file`` (status 1) or a summary of the site (status 0)."""
    from ies_agent.config import ConfigError, load_site

    try:
        site = load_site(file)
    except ConfigError as exc:
        inline = _check_as_boot_file(file)
        if inline is not None:
            return inline
        print(exc)
        count = len(exc.problems)
        print(f"{file}: {count} problem{'s' if count != 1 else ''}, not usable")
        return 1
    print(
        f"{file}: ok — gateway {site.gateway.id}, {len(site.buses)} buses, "
        f"{len(site.devices)} devices"
    )
    for line in summary(site):
        print(f"  {line}")
    for warning in warnings(site):
        print(f"warning: {warning}")
    return 0


def _check_as_boot_file(file: str) -> int | None:
    """Check ``file`` as first boot reads it when it holds inline secrets.

    Returns the exit status, or ``None`` when the file has no inline secrets (then
    the plain check's problems stand).
    """
    from pathlib import Path

    from ies_agent.config import ConfigError
    from ies_agent.firstboot import FirstBootError, check_boot_file, split_secrets

    try:
        _, secrets = split_secrets(Path(file))
    except FirstBootError:
        return None
    if not secrets:
        return None
    try:
        site, count = check_boot_file(Path(file))
    except ConfigError as exc:
        print(exc)
        problems = len(exc.problems)
        print(f"{file}: {problems} problem{'s' if problems != 1 else ''}, not usable")
        return 1
    print(
        f"{file}: ok as a boot-partition file — gateway {site.gateway.id}, "
        f"{len(site.devices)} devices; {count} inline secret"
        f"{'s' if count != 1 else ''} will be moved into files only the agent can "
        "read at first boot (ies-agent run itself takes secrets from *_file keys)"
    )
    return 0


def summary(site: Site) -> list[str]:
    """Return one line per gateway setting, bus and device, for installers to read."""
    gateway = site.gateway
    interval = (
        f"{gateway.interval_s // 60} min"
        if gateway.interval_s % 60 == 0
        else f"{gateway.interval_s} s"
    )
    lines = [
        f"gateway  {gateway.id}: time zone {gateway.timezone}, intervals of {interval}"
        f"{' (demo)' if gateway.demo else ''}, data in {gateway.data_dir}, "
        f"key {gateway.key_alg}"
    ]
    for bus in site.buses.values():
        line = f"bus      {bus.id}: {bus.kind} {bus.label}"
        if bus.kind == "rtu":
            line += f" at {bus.baudrate} {bus.bytesize}{bus.parity}{bus.stopbits}"
        lines.append(line)
    for device in site.devices.values():
        template = device.template
        state = "" if device.enabled else " (disabled)"
        if device.dlms is not None:
            dlms = device.dlms
            lines.append(
                f"device   {device.id}: bus {device.bus}, DLMS meter "
                f"{dlms.server_logical}/{dlms.server_physical}, client "
                f"{dlms.client_sap} ({dlms.auth}), profile {dlms.profile}, "
                f"every {device.poll_s:g} s{state}"
            )
            continue
        what = (
            "SunSpec, points found at start-up"
            if template.sunspec
            else f"{len(template.points)} points"
        )
        lines.append(
            f"device   {device.id}: bus {device.bus} unit {device.unit}, "
            f"{device.template_name} ({what}), every {device.poll_s:g} s{state}"
        )
    return lines


def warnings(site: Site) -> list[str]:
    """Return what may be wrong on this machine only, such as a missing serial port."""
    from pathlib import Path

    from ies_agent.dlms_config import DlmsSecretError, read_secret_file

    found = []
    for bus in site.buses.values():
        if bus.kind in ("rtu", "dlms-hdlc") and not Path(bus.serial_port).exists():
            found.append(
                f"bus {bus.id}: serial port {bus.serial_port} does not exist on this "
                "machine (fine if the file is for another gateway)"
            )
    for device in site.devices.values():
        dlms = device.dlms
        if dlms is None:
            continue
        for secret in (dlms.password_file, dlms.keys_file):
            if secret is None:
                continue
            try:
                read_secret_file(secret)
            except DlmsSecretError as exc:
                found.append(
                    f"device {device.id}: {exc} — the agent will leave this meter "
                    "out until it is fixed"
                )
    return found


def _templates(dirs: list[str]) -> int:
    """Print the templates found in ``dirs`` and the shipped directory."""
    from ies_drivers.errors import TemplateError
    from ies_drivers.templates import find_template_file, list_templates

    status = 0
    for name in list_templates(dirs):
        try:
            loaded = find_template_file(name, dirs)
        except TemplateError as exc:
            print(f"{name}: invalid\n{exc}")
            status = 1
            continue
        template = loaded.template
        print(
            f"{name}: {template.manufacturer} {template.model} ({template.kind}) "
            f"— {loaded.path}"
        )

    # DLMS/COSEM meter profiles, for devices on dlms-* buses.
    from ies_drivers.dlms.errors import DlmsError
    from ies_drivers.dlms.profiles import load_profile, profiles_dir

    for path in sorted(profiles_dir().glob("*.toml")):
        try:
            profile = load_profile(path)
        except DlmsError as exc:
            print(f"{path.stem}: invalid\n{exc}")
            status = 1
            continue
        print(
            f"{path.stem}: DLMS/COSEM meter profile, {profile.standard} "
            f"(for dlms-* buses) — {path}"
        )
    return status
