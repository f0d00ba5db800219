"""``ies-agent prove PATH --seq N [--out FILE]``: disclose one entry with its proof.

Prints (or writes) a JSON bundle holding entry ``N``, its inclusion proof and the
smallest checkpoint covering it; check it with ``ies-agent verify bundle.json --key
FILE``. Exit status: 0 written, 1 no bundle possible (entry not yet covered by a
checkpoint, log damaged), 2 usage error (no log at PATH).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``prove`` to ``parser``."""
    parser.add_argument(
        "path", metavar="PATH", type=Path, help="data directory or evidence log file"
    )
    parser.add_argument(
        "--seq", type=int, required=True, help="seq of the entry to disclose"
    )
    parser.add_argument(
        "--out",
        metavar="FILE",
        type=Path,
        help="write the bundle here (default stdout)",
    )


def main(args: argparse.Namespace) -> int:
    """Run ``prove``; return 0, 1 (no bundle possible) or 2 (usage)."""
    import json
    import sys

    from ies_agent.evidence.errors import ProofError
    from ies_agent.evidence.prove import build_bundle
    from ies_agent.evidence.verify import VerifyInputError

    try:
        bundle = build_bundle(args.path, args.seq)
    except VerifyInputError as exc:
        print(f"ies-agent prove: {exc}", file=sys.stderr)
        return 2
    except ProofError as exc:
        print(f"ies-agent prove: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(bundle, indent=1, ensure_ascii=False) + "\n"
    if args.out is None:
        sys.stdout.write(text)
    else:
        try:
            args.out.write_text(text, encoding="utf-8")
        except OSError as exc:
            print(f"ies-agent prove: cannot write {args.out}: {exc}", file=sys.stderr)
            return 2
    return 0
