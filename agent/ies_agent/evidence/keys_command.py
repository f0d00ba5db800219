"""``ies-agent keys``: show the gateway's signing key card, or rotate the key.

``ies-agent keys show [--data-dir DIR]`` prints the fingerprint and the key card (JSON)
the utility registers; it reads only public files, so it needs no access to the
private key. ``ies-agent keys rotate --data-dir DIR [--alg ALG]`` replaces the key; it
runs only while no agent holds the data directory, logs the rotation under the old key
and signs the next checkpoint with both keys.

Exit status: 0 done, 1 no key / the data directory is in use / a key file problem,
2 usage error.
"""

from __future__ import annotations

import argparse

DEFAULT_DATA_DIR = "/var/lib/ies-agent"


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``show`` and ``rotate`` subcommands to ``parser``."""
    sub = parser.add_subparsers(dest="keys_action", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="print the fingerprint and the key card")
    show.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        help=f"agent data directory (default {DEFAULT_DATA_DIR})",
    )
    rotate = sub.add_parser(
        "rotate", help="replace the signing key (the agent must be stopped)"
    )
    rotate.add_argument("--data-dir", required=True, help="agent data directory")
    rotate.add_argument(
        "--alg",
        choices=["ecdsa-p256", "ed25519"],
        default=None,
        help="algorithm of the new key (default: that of the current key)",
    )


def main(args: argparse.Namespace) -> int:
    """Run ``keys show`` or ``keys rotate``; return the exit status."""
    import json
    import sys
    from pathlib import Path

    from ies_agent.evidence import keys
    from ies_agent.evidence.errors import EvidenceError

    data_dir = Path(args.data_dir)
    if args.keys_action == "show":
        try:
            card = keys.read_key_card(data_dir)
        except EvidenceError as exc:
            print(f"ies-agent keys show: {exc}", file=sys.stderr)
            return 1
        if card is None:
            print(
                f"ies-agent keys show: no key in {keys.keys_dir(data_dir)}; the agent "
                f"creates one the first time it starts with --data-dir {data_dir}",
                file=sys.stderr,
            )
            return 1
        print(f"fingerprint: {card.get('fingerprint', '?')}")
        print(json.dumps(card, indent=2, sort_keys=True, ensure_ascii=False))
        return 0

    try:
        key = keys.rotate(data_dir, alg=args.alg)
    except EvidenceError as exc:
        print(f"ies-agent keys rotate: {exc}", file=sys.stderr)
        return 1
    print(f"new fingerprint: {key.fingerprint}")
    print(f"key card: {keys.keys_dir(data_dir) / keys.CARD_FILE}")
    return 0
