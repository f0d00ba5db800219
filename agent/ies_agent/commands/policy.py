"""``ies-agent policy check FILE``: validate a policy pack's structure and signature.

The pack must be signed by a key pinned in the trust directory (``configs/trust/`` by
default, ``--trust DIR`` to name others). Prints the pack's id, version, effective
period, signer and clauses; exits 0 when valid, 1 otherwise with the reason.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``check FILE`` and ``--trust``."""
    sub = parser.add_subparsers(dest="action", required=True)
    check = sub.add_parser(
        "check", help="validate a policy pack (structure, signature)"
    )
    check.add_argument("file", type=Path, help="the signed pack (JSON)")
    check.add_argument(
        "--trust",
        type=Path,
        action="append",
        metavar="DIR",
        help="trusted signer keys (PEM); default configs/trust/",
    )


def main(args: argparse.Namespace) -> int:
    """Check the pack; return 0 when valid."""
    from ies_agent.dispatch.auth import DEFAULT_TRUST_DIR, load_trust
    from ies_agent.dispatch.errors import AuthenticationError, PolicyPackError
    from ies_agent.dispatch.model import format_utc
    from ies_agent.dispatch.policy import load_pack

    directories = args.trust or [DEFAULT_TRUST_DIR]
    try:
        pack = load_pack(args.file, load_trust(directories))
    except (PolicyPackError, AuthenticationError) as exc:
        print(f"ies-agent policy check: {exc}")
        if not args.trust:
            print(
                "hint: the packs shipped in configs/policies/ are signed with the "
                "clearly labelled test key: add --trust configs/trust/test"
            )
        return 1
    until = format_utc(pack.effective_until) if pack.effective_until else "open-ended"
    print(
        f"{args.file}: valid policy pack {pack.label}, signed by "
        f"{pack.signed_by[:16]}, effective {format_utc(pack.effective_from)} to {until}"
    )
    for clause in pack.clauses:
        params = ", ".join(f"{k}={v}" for k, v in sorted(clause.params.items()))
        print(f"  {clause.clause_id:<16} {clause.kind:<20} {params}")
    return 0
