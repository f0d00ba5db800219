"""Errors of the local web page (kept apart so callers need not import aiohttp).

::

    WebSetupError   the page cannot start: a secret file is unusable, the address
                    is in use, or a --http argument is malformed
"""

from __future__ import annotations


class WebSetupError(Exception):
    """Raised when the web page cannot start; the message says what to change."""
