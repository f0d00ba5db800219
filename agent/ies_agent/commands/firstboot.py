"""``ies-agent firstboot``: import the site file left on the boot partition.

Run by ``ies-agent-firstboot.service`` (as root) before the agent starts; see
``ies_agent.firstboot`` for what it does and the secrets convention. Without
``--boot-dir`` it looks in ``/boot/firmware`` (Raspberry Pi OS 12 and later), then in
``/boot`` (older images).

Exit status: 0 imported or nothing to import, 1 the file has problems (listed on
standard output and in ``ies-agent-error.txt`` on the boot partition), 2 usage error.
"""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``firstboot`` arguments."""
    parser.add_argument(
        "--boot-dir",
        action="append",
        default=None,
        metavar="DIR",
        help="where the boot partition is (repeatable; default /boot/firmware, "
        "then /boot)",
    )
    parser.add_argument(
        "--etc-dir",
        default="/etc/ies-agent",
        help="where the configuration goes (default /etc/ies-agent)",
    )
    parser.add_argument(
        "--data-dir",
        default="/var/lib/ies-agent",
        help="the agent's data directory, for its key (default /var/lib/ies-agent)",
    )
    parser.add_argument(
        "--owner",
        default="ies-agent",
        help="service user that owns the key and secrets when run as root "
        "(default ies-agent)",
    )


def main(args: argparse.Namespace) -> int:
    """Import the boot partition's site file if there is one; return the status."""
    from pathlib import Path

    from ies_agent import firstboot

    boot_dirs = (
        [Path(d) for d in args.boot_dir] if args.boot_dir else firstboot.BOOT_DIRS
    )
    boot_file = firstboot.find_boot_file(boot_dirs)
    if boot_file is None:
        where = " or ".join(str(Path(d) / firstboot.BOOT_FILE) for d in boot_dirs)
        print(f"ies-agent firstboot: nothing to import (no {where})")
        return 0
    try:
        result = firstboot.import_site_file(
            boot_file,
            etc_dir=Path(args.etc_dir),
            data_dir=Path(args.data_dir),
            owner=args.owner or None,
        )
    except OSError as exc:
        print(
            f"ies-agent firstboot: cannot write {exc.filename or args.etc_dir}: "
            f"{exc.strerror} (run it as root, as its unit does)"
        )
        return 1
    except firstboot.FirstBootError as exc:
        print(f"ies-agent firstboot: {boot_file} NOT imported:")
        for problem in exc.problems:
            print(f"  {problem}")
        if exc.report is not None:
            print(f"report for the installer: {exc.report}")
        return 1
    print(f"ies-agent firstboot: imported {boot_file} as {result.site_file}")
    print(f"  gateway {result.gateway_id}, key fingerprint {result.fingerprint}")
    print(f"  key card for the utility: {result.key_card}")
    if result.secrets:
        names = ", ".join(result.secrets)
        print(f"  secrets moved to {result.site_file.parent / 'secrets'}: {names}")
    return 0
