"""``ies-agent verify PATH [--key FILE ...] [--checkpoint FILE ...] [--json]``.

Verifies an evidence log (data directory, the log file of one, or a directory like the
worked example) or a disclosure bundle offline and prints one line per finding, then a
summary. Exit status:

- 0: verified (warnings allowed);
- 1: an integrity failure, including a bundle file that is damaged (empty, cut short,
  not JSON, a field missing: "not a valid proof bundle: ..."), since a bundle is
  evidence too;
- 2: a usage error: PATH missing or unreadable, neither a log nor a bundle, a log file
  outside its data directory given without --checkpoint and --key, or a key or
  checkpoint file that cannot be used.

A ``*.json`` file (or one starting with ``{`` that is no log) is always read as a
bundle, never as a log, and nothing is taken from the directory it is in.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``verify`` to ``parser``."""
    parser.add_argument(
        "path",
        metavar="PATH",
        type=Path,
        help="data directory, evidence log file, or bundle from 'ies-agent prove'",
    )
    parser.add_argument(
        "--key",
        metavar="FILE",
        type=Path,
        action="append",
        default=[],
        help="trusted key: a signed-note verifier key (.vkey) or a key card; "
        "repeatable (default: the key card in the data directory, not pinned)",
    )
    parser.add_argument(
        "--checkpoint",
        metavar="FILE",
        type=Path,
        action="append",
        default=[],
        help="a checkpoint obtained earlier (signed note or checkpoints.jsonl), e.g. "
        "from upstream: the log must still hold what it signed (detects rollback)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the report as JSON instead"
    )


def main(args: argparse.Namespace) -> int:
    """Run ``verify``; return 0 (verified), 1 (integrity failure) or 2 (usage)."""
    import json
    import sys

    from ies_agent.evidence.verify import VerifyInputError, verify_path

    try:
        report = verify_path(args.path, keys=args.key, checkpoints=args.checkpoint)
    except VerifyInputError as exc:
        print(f"ies-agent verify: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_json(), indent=1, ensure_ascii=False))
    else:
        for finding in report.findings:
            print(finding.line(report.kind))
        print(report.summary())
    return 0 if report.ok else 1
