"""The ``[http]`` table of a site file: where the local web page listens, who may act.

::

    [http]
    listen = "127.0.0.1"          # default: loopback only
    port = 8780
    password_file = "web-password" # a hash written by `ies-agent web-password`
    token_file = "web-token"       # the same hash format, for scripts (Bearer)
    session_s = 3600               # a login lasts this long at most

On loopback the page and ``/metrics`` need no login; every ``POST`` under ``/api/``
does. On any other address a password or token file is required, and the JSON API and
metrics need a login or the token too. Secret files hold hashes only, never the plain
secret (see :mod:`ies_agent.web.auth`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ies_drivers.tomlsource import KeyPath, ProblemCollector

HTTP_KEYS = {"listen", "port", "password_file", "token_file", "session_s"}
DEFAULT_PORT = 8780
DEFAULT_SESSION_S = 3600.0


@dataclass(frozen=True)
class HttpConfig:
    """Where the page listens and which hashed secrets unlock it.

    ``session_s`` is the absolute lifetime of a login in seconds.
    """

    listen: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    password_file: Path | None = None
    token_file: Path | None = None
    session_s: float = DEFAULT_SESSION_S

    @property
    def loopback(self) -> bool:
        """Whether only this machine can reach the page."""
        return is_loopback(self.listen)

    @property
    def url(self) -> str:
        """The page's address, e.g. ``http://127.0.0.1:8780/``."""
        host = f"[{self.listen}]" if ":" in self.listen else self.listen
        return f"http://{host}:{self.port}/"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is reachable from this machine
    only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_http(
    check: ProblemCollector,
    data: Mapping[str, Any],
    resolve: Callable[[str], Path],
) -> HttpConfig | None:
    """Return the ``[http]`` table of a site (``None`` when absent); record problems.

    ``resolve`` turns a path written in the file into a path relative to the file.
    An address other than loopback without a password or token file is a problem.
    """
    table = check.table(data, ("http",))
    if table is None:
        return None
    at: KeyPath = ("http",)
    check.unknown_keys(table, HTTP_KEYS, at)
    listen = check.string(table, (*at, "listen"), default="127.0.0.1")
    port = check.integer(table, (*at, "port"), default=DEFAULT_PORT, low=1, high=65535)
    password = check.string(table, (*at, "password_file"))
    token = check.string(table, (*at, "token_file"))
    session = check.number(
        table, (*at, "session_s"), default=DEFAULT_SESSION_S, low=60, high=7 * 86_400
    )
    if listen is not None and not _is_address(listen):
        check.add(
            (*at, "listen"),
            f"{listen!r} is not an IP address: write 127.0.0.1 (this machine only), "
            "0.0.0.0 (every interface) or one interface's address",
        )
        listen = None
    if listen is not None and not is_loopback(listen) and not (password or token):
        check.add(
            (*at, "listen"),
            f"{listen} is reachable from the network, so the page needs a secret: "
            "set password_file or token_file (create one with "
            "`ies-agent web-password FILE`), or listen on 127.0.0.1",
        )
        listen = None
    if listen is None or port is None or session is None:
        return None
    return HttpConfig(
        listen=listen,
        port=port,
        password_file=resolve(password) if password else None,
        token_file=resolve(token) if token else None,
        session_s=session,
    )


def _is_address(text: str) -> bool:
    if text == "localhost":
        return True
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
