"""``ies-agent dispatch optout EVENT_ID``: the consumer opts out of a dispatch event.

The request is left in the agent's data directory; the running agent reverts the
devices, records ``dispatch_opt_out`` and tells the issuer (``dispatch_ack`` with
status ``opted_out``) within a second, if the policy pack allows opt-out.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``optout EVENT_ID`` with ``--data-dir`` and ``--reason``."""
    sub = parser.add_subparsers(dest="action", required=True)
    optout = sub.add_parser("optout", help="opt out of a dispatch event")
    optout.add_argument("event_id", help="the event's id (see the local page or log)")
    optout.add_argument(
        "--data-dir",
        type=Path,
        default=Path("/var/lib/ies-agent"),
        help="the running agent's data directory (default /var/lib/ies-agent)",
    )
    optout.add_argument("--reason", default="consumer", help="recorded and reported")


def main(args: argparse.Namespace) -> int:
    """Leave the opt-out request for the agent; return 0 when written."""
    from ies_agent.dispatch.engine import request_opt_out

    if not args.data_dir.is_dir():
        print(f"ies-agent dispatch: no data directory {args.data_dir}")
        return 1
    try:
        path = request_opt_out(args.data_dir, args.event_id, args.reason)
    except OSError as exc:
        print(f"ies-agent dispatch: cannot write the request: {exc.strerror}")
        return 1
    print(f"opt-out of {args.event_id} requested ({path.name})")

    # Say plainly when nothing will act on it soon.
    import json

    from ies_agent.commands.status import agent_holds_lock
    from ies_agent.dispatch.engine import STATE_FILE

    if agent_holds_lock(args.data_dir) is None:
        print(
            "warning: no agent is running on this data directory; the request waits "
            "until one starts (an event that has ended by then is not affected)"
        )
        return 0
    try:
        active = json.loads((args.data_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        active = None
    known = json.dumps(active) if active is not None else ""
    if args.event_id not in known:
        print(
            f"warning: {args.event_id} is not an active event of the running agent; "
            "check the id (ies-agent status, or the local page's dispatch list)"
        )
    else:
        print("the running agent takes it within a second")
    return 0
