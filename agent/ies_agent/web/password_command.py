"""``ies-agent web-password FILE``: store the web page's password as a hash.

Reads the password twice from the terminal (or once from standard input when it is
not a terminal), writes its scrypt hash to FILE with mode 0600. Name FILE in the site
file as ``[http] password_file`` (or ``token_file``). The password itself is never
written anywhere.
"""

from __future__ import annotations

import argparse

MIN_LENGTH = 10


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``web-password`` arguments."""
    parser.add_argument("file", help="where to write the hash (mode 0600)")


def main(args: argparse.Namespace) -> int:
    """Ask for the password, write its hash; return 1 when it is unusable."""
    import getpass
    import sys
    from pathlib import Path

    from ies_agent.web.auth import write_secret_hash

    if sys.stdin.isatty():
        first = getpass.getpass("web page password: ")
        if getpass.getpass("again: ") != first:
            print("ies-agent web-password: the two entries differ; nothing written")
            return 1
    else:
        first = sys.stdin.readline().rstrip("\n")
    if len(first) < MIN_LENGTH:
        print(f"ies-agent web-password: use at least {MIN_LENGTH} characters")
        return 1
    path = Path(args.file)
    try:
        write_secret_hash(path, first)
    except OSError as exc:
        print(f"ies-agent web-password: cannot write {path}: {exc.strerror}")
        return 1
    print(f"wrote the password's hash to {path}; set [http] password_file to it")
    return 0
