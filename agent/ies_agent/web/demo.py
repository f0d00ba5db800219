"""The ``[http]`` table of ``ies-agent demo --http HOST:PORT``, with a fresh token.

The demo makes a one-time token, keeps it for the user in ``web-token.txt`` (mode
0600) in the data directory, stores only its hash in ``web-token.hash`` for the agent,
and prints the page's address and the token.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from ies_agent.web.auth import write_secret_hash
from ies_agent.web.config import is_loopback
from ies_agent.web.errors import WebSetupError

TOKEN_TEXT_FILE = "web-token.txt"
TOKEN_HASH_FILE = "web-token.hash"


def parse_listen(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` for IPv6); raise :class:`WebSetupError`."""
    from ies_agent.commands.scan import parse_host_port

    if ":" not in text:
        raise WebSetupError(f"--http {text!r}: write HOST:PORT, e.g. 127.0.0.1:8780")
    try:
        return parse_host_port(text)
    except ValueError as exc:
        raise WebSetupError(f"--http: {exc}") from None


def demo_http_table(data_dir: Path, listen: str) -> str:
    """Return the ``[http]`` TOML table for ``listen``; write and print the token."""
    host, port = parse_listen(listen)
    token = secrets.token_urlsafe(18)
    text_path = data_dir / TOKEN_TEXT_FILE
    fd = os.open(text_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    os.chmod(text_path, 0o600)
    write_secret_hash(data_dir / TOKEN_HASH_FILE, token)
    shown = f"[{host}]" if ":" in host else host
    where = "this machine only" if is_loopback(host) else "reachable from the network"
    print(
        f"  web page     http://{shown}:{port}/ ({where}); metrics at /metrics\n"
        f"  web token    {token}  (log in with it to verify or scan; also in "
        f"{text_path})",
        flush=True,
    )
    return (
        f'\n[http]\nlisten = "{host}"\nport = {port}\n'
        f'token_file = "{TOKEN_HASH_FILE}"\n'
    )
