"""``ies-agent run --config FILE``: run the agent on a site until stopped."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``run`` arguments."""
    parser.add_argument("--config", required=True, help="site configuration (TOML)")
    parser.add_argument(
        "--data-dir", default=None, help="override the data directory of the site file"
    )


def main(args: argparse.Namespace) -> int:
    """Run until SIGTERM or SIGINT; return 0 after a clean shutdown, 1 on bad config."""
    import asyncio
    import signal
    from pathlib import Path

    from ies_agent.config import ConfigError, load_site
    from ies_agent.runtime import run_site

    try:
        site = load_site(args.config, skip_broken_devices=True)
    except ConfigError as exc:
        print(exc)
        return 1
    for problem in site.skipped:
        print(f"warning: device left out: {problem}")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        data_dir = Path(args.data_dir) if args.data_dir else None
        await run_site(site, stop, data_dir=data_dir)

    try:
        asyncio.run(run())
    except (Exception, BaseExceptionGroup) as exc:
        message = _setup_failure(exc)
        if message is None:
            raise
        print(f"ies-agent run: {message}")
        return 1
    return 0


# What keeps the agent from starting, by module: each can only be raised once its
# module is loaded, so checking needs no import (the agent loads only what it uses).
_SETUP_ERRORS = {
    "ies_agent.evidence.errors": "EvidenceError",
    "ies_agent.dlms_config": "DlmsSecretError",
    "ies_agent.ocpp.server": "OcppSetupError",
    "ies_agent.web.errors": "WebSetupError",
}


def _setup_failure(exc: BaseException) -> str | None:
    """Return the one-line message of a setup error in ``exc`` (or its group)."""
    import sys

    classes = tuple(
        getattr(sys.modules[module], name)
        for module, name in _SETUP_ERRORS.items()
        if module in sys.modules
    )
    while isinstance(exc, BaseExceptionGroup):
        found = exc.subgroup(classes) if classes else None
        if found is None:
            return None
        exc = found.exceptions[0]
    return str(exc) if isinstance(exc, classes) else None
