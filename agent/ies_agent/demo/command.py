"""``ies-agent demo``: a complete simulated site in one process, no hardware, no broker.

The site: a household with rooftop solar. A grid meter (Eastron SDM630 register map)
answers over Modbus TCP, a SunSpec inverter over Modbus TCP, and an RS-485 line — a
pair of pseudo-terminals joined by socat, or RTU over TCP where socat is missing —
carries a Rishabh panel meter on the house circuits and a second SDM630 on the EV
charger circuit. The agent reads them through its real code path and keeps its
evidence log in the data directory; run again on the same directory, it continues the
same site's log.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_DATA_DIR = "ies-demo-data"


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``demo`` arguments."""
    parser.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        help=f"where the evidence log and keys go (default ./{DEFAULT_DATA_DIR})",
    )
    parser.add_argument(
        "--for",
        dest="duration",
        type=float,
        default=None,
        metavar="SECONDS",
        help="exit cleanly after this many seconds (default: run until Ctrl-C)",
    )
    parser.add_argument(
        "--interval",
        type=int,
        default=5,
        metavar="SECONDS",
        help="evidence interval in seconds (default 5; must divide a day)",
    )
    parser.add_argument(
        "--mqtt",
        metavar="URL",
        help="also deliver the evidence to this MQTT broker (mqtt://host:port)",
    )
    parser.add_argument(
        "--ies-endpoint",
        metavar="URL",
        help="also post the evidence as IES MeterData to this Beckn endpoint",
    )
    parser.add_argument(
        "--csms",
        metavar="URL",
        help="bridge the simulated chargers to this OCPP CSMS (ws:// or wss:// base "
        "address; each charger's id is appended, each offers its own version)",
    )
    parser.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="serve the local web page and /metrics here (e.g. 127.0.0.1:8780); "
        "a one-time token to log in is printed and kept in the data directory",
    )
    parser.add_argument(
        "--upstream-wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="at the end, wait this long at most for upstreams to catch up "
        "(default 30)",
    )


def _check_arguments(args: argparse.Namespace) -> str | None:
    """Return what is wrong with the demo's arguments, or ``None``."""
    import math

    interval = args.interval
    if interval <= 0:
        return f"--interval {interval}: an interval is a positive number of seconds"
    if not (interval <= 60 and 86_400 % interval == 0) and interval not in (
        900,
        1800,
        3600,
    ):
        return (
            f"--interval {interval}: use 1-60 s that divide a day evenly "
            "(e.g. 5, 10, 30) or 900, 1800, 3600 (15, 30, 60 minutes, as on a site)"
        )
    if args.duration is not None and not (
        math.isfinite(args.duration) and args.duration > 0
    ):
        return "--for takes a positive, finite number of seconds"
    if not str(args.data_dir).strip():
        return "--data-dir must name a directory"
    if getattr(args, "http", None):
        from ies_agent.web.demo import parse_listen
        from ies_agent.web.errors import WebSetupError

        try:
            parse_listen(args.http)
        except WebSetupError as exc:
            return str(exc)
    return None


def main(args: argparse.Namespace) -> int:
    """Run the demo site; return 0 after a clean stop."""
    import asyncio

    from ies_agent.demo.site import DemoError, run_demo

    problem = _check_arguments(args)
    if problem:
        print(f"ies-agent demo: {problem}")
        return 2
    data_dir = Path(args.data_dir).resolve()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"ies-agent demo: cannot use {data_dir}: {exc.strerror}")
        return 1
    try:
        return asyncio.run(
            run_demo(
                data_dir,
                duration_s=args.duration,
                interval_s=args.interval,
                mqtt_url=args.mqtt,
                ies_endpoint=args.ies_endpoint,
                upstream_wait_s=args.upstream_wait,
                csms_url=args.csms,
                http=args.http,
            )
        )
    except DemoError as exc:
        print(f"ies-agent demo: {exc}")
        return 1
