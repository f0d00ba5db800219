"""A serial line for tests: two linked pseudo-terminals made by socat.

What is written to one end comes out of the other, like the two ends of a null modem
cable; the Modbus and DLMS tests put a device server on one end and the client on the
other. The socat process is started and stopped by its pid.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path


class SocatPair:
    """Two linked pseudo-terminals (``socat pty,raw,echo=0 pty,raw,echo=0``).

    What is written to ``a`` comes out of ``b`` and back, like the two ends of a null
    modem cable. The socat process is stopped by its pid.
    """

    def __init__(self, directory: Path, prefix: str = "tty") -> None:
        self.a = str(directory / f"{prefix}-a")
        self.b = str(directory / f"{prefix}-b")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> SocatPair:
        """Start socat and wait until both links exist."""
        socat = shutil.which("socat")
        if socat is None:
            raise RuntimeError("socat is not installed: apt-get install -y socat")
        self.process = subprocess.Popen(
            [
                socat,
                f"pty,raw,echo=0,link={self.a}",
                f"pty,raw,echo=0,link={self.b}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while not (os.path.exists(self.a) and os.path.exists(self.b)):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError("socat did not create the pty pair")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop the socat process by its pid."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
