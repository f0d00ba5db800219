"""``ies-agent export PATH --format FORMAT [--out FILE]``: export evidence.

Formats are a table of handlers, ``FORMATS``: name -> (module, function). A handler
is called as ``handler(path, out, args)`` with the data directory, a text stream and
the parsed arguments, writes its records to ``out`` and returns how many it wrote;
it raises an ``EvidenceError`` (or ``OSError``) when it cannot export. Modules are
imported only when their format is chosen, so adding one costs nothing here.

Exit status: 0 exported, 1 the export failed (log does not verify, key unusable),
2 usage error (no log at PATH, output not writable).
"""

from __future__ import annotations

import argparse
from pathlib import Path

FORMATS: dict[str, tuple[str, str]] = {
    "ocmf": ("ies_agent.evidence.ocmf", "write_export"),
    "ies-meterdata": ("ies_agent.upstream.meterdata", "write_export"),
}
"""Export format name -> (module, handler function)."""


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``export`` to ``parser``."""
    parser.add_argument("path", metavar="PATH", type=Path, help="data directory")
    parser.add_argument(
        "--format",
        required=True,
        choices=sorted(FORMATS),
        help="what to export: ocmf (one signed OCMF record per cumulative reading)",
    )
    parser.add_argument(
        "--out",
        metavar="FILE",
        type=Path,
        help="write to FILE instead of stdout (one record per line)",
    )


def main(args: argparse.Namespace) -> int:
    """Run ``export``; return 0, 1 (export failed) or 2 (usage)."""
    import importlib
    import io
    import sys

    from ies_agent.evidence.errors import EvidenceError
    from ies_agent.evidence.verify import VerifyInputError

    module_name, function_name = FORMATS[args.format]
    handler = getattr(importlib.import_module(module_name), function_name)
    buffer = io.StringIO()
    try:
        count = handler(args.path, buffer, args)
    except VerifyInputError as exc:
        print(f"ies-agent export: {exc}", file=sys.stderr)
        return 2
    except EvidenceError as exc:
        print(f"ies-agent export: {exc}", file=sys.stderr)
        return 1
    # Written only when complete, so a failed export never leaves half a file.
    if args.out is None:
        sys.stdout.write(buffer.getvalue())
    else:
        try:
            args.out.write_text(buffer.getvalue(), encoding="utf-8")
        except OSError as exc:
            print(f"ies-agent export: cannot write {args.out}: {exc}", file=sys.stderr)
            return 2
    print(f"ies-agent export: {count} {args.format} record(s)", file=sys.stderr)
    return 0
