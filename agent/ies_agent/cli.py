"""``ies-agent``: the command line of the edge agent.

Each subcommand lives in its own module exposing ``configure(parser)`` and
``main(args) -> int``; this module only routes, and imports a command's module when that
command runs, so ``ies-agent verify`` never pays for Modbus and ``ies-agent read`` never
pays for the web page.

Exit status: 0 success, 1 the command ran and found a problem (a failed verification, a
config error, a bad CRC), 2 a usage error.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("ies_agent.demo.command", "run a complete simulated site (no hardware)"),
    "run": ("ies_agent.commands.run", "run the agent on a site configuration"),
    "read": ("ies_agent.commands.read", "read one device now and print its values"),
    "scan": ("ies_agent.commands.scan", "find Modbus unit ids and SunSpec models"),
    "decode": ("ies_agent.commands.decode", "decode a captured frame given in hex"),
    "config": ("ies_agent.commands.config", "check a site configuration file"),
    "verify": ("ies_agent.evidence.verify_command", "verify an evidence log offline"),
    "prove": ("ies_agent.evidence.prove_command", "disclose one entry with its proof"),
    "keys": ("ies_agent.evidence.keys_command", "show the gateway's signing key"),
    "export": ("ies_agent.evidence.export_command", "export evidence (OCMF, ...)"),
    "firstboot": (
        "ies_agent.commands.firstboot",
        "import the site file left on the boot partition",
    ),
    "update": (
        "ies_agent.commands.update",
        "apply a signed update of the agent, with rollback",
    ),
    "status": ("ies_agent.commands.status", "show what the running agent sees"),
    "firmware": (
        "ies_agent.commands.firmware",
        "show the firmware bridge's cache and recent transfers",
    ),
    "web-password": (
        "ies_agent.web.password_command",
        "store the web page's password as a hash",
    ),
    "policy": ("ies_agent.commands.policy", "check a signed dispatch policy pack"),
    "dispatch": ("ies_agent.commands.dispatch", "opt out of a dispatch event"),
}


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every subcommand configured."""
    parser = argparse.ArgumentParser(
        prog="ies-agent",
        description="Edge agent of the India Energy Stack.",
    )
    from ies_agent import __version__

    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log verbosity (default INFO)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        command_parser.set_defaults(_module=module_name)
        _configure(module_name, command_parser)
    return parser


def _configure(module_name: str, parser: argparse.ArgumentParser) -> None:
    """Let the command's module add its arguments.

    Command modules keep their top-level imports light (argparse and typing only) and
    import what they need inside ``main``, so building the parser stays cheap.
    """
    importlib.import_module(module_name).configure(parser)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ies-agent`` with ``argv`` (default ``sys.argv[1:]``); return the status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from ies_agent.logs import setup_logging

    setup_logging(args.log_level)
    module = importlib.import_module(args._module)
    try:
        status: int = module.main(args)
        sys.stdout.flush()
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`ies-agent export … | head`): stop quietly, as cat does.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    return status


if __name__ == "__main__":
    sys.exit(main())
