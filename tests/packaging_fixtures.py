"""Peers for the packaging tests: real dpkg on a scratch root, and a stand-in agent.

Installing the real package needs root and a whole system (see
``packaging/check-install.sh``, which does that in a Debian root). Here the updater
works on a scratch dpkg root (``dpkg --root``) holding small packages named
``ies-agent`` whose program is a stand-in agent: a Python script that writes the
same health file the real agent's watchdog feeder writes, or, in a broken build, exits
at once. :class:`ProcessService` starts and stops it by pid, as systemd would the unit.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from ies_agent.signing.manifest import PrivateKey, sign_manifest

STAND_IN_AGENT = textwrap.dedent(
    '''\
    """Stand-in agent: reports healthy like the real one, unless built broken."""
    import json, os, signal, sys, time
    here = os.path.dirname(os.path.abspath(__file__))
    version = open(os.path.join(here, "VERSION")).read().strip()
    if os.path.exists(os.path.join(here, "BROKEN")):
        sys.exit("this build does not start")
    health = sys.argv[1]
    def leave(*_):
        if os.path.exists(health):
            os.unlink(health)
        sys.exit(0)
    signal.signal(signal.SIGTERM, leave)
    beats = 0
    while True:
        beats += 1
        record = {"version": version, "pid": os.getpid(), "beats": beats, "loops": 1}
        with open(health + ".tmp", "w") as out:
            json.dump(record, out)
        os.replace(health + ".tmp", health)
        time.sleep(0.05)
    '''
)


def make_root(path: Path) -> Path:
    """Create an empty dpkg database under ``path``; return ``path``."""
    for sub in ("var/lib/dpkg/updates", "var/lib/dpkg/info"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    (path / "var/lib/dpkg/status").touch()
    return path


def build_package(
    out_dir: Path, version: str, *, arch: str, broken: bool = False
) -> Path:
    """Build ``ies-agent_<version>_<arch>.deb`` holding the stand-in agent."""
    tree = out_dir / f"tree-{version}{'-broken' if broken else ''}"
    program = tree / "usr/lib/ies-agent"
    program.mkdir(parents=True)
    (program / "agent.py").write_text(STAND_IN_AGENT)
    (program / "VERSION").write_text(version.rsplit("-", 1)[0] + "\n")
    if broken:
        (program / "BROKEN").write_text("")
    (tree / "DEBIAN").mkdir()
    (tree / "DEBIAN/control").write_text(
        f"Package: ies-agent\nVersion: {version}\nArchitecture: {arch}\n"
        "Maintainer: Tests <tests@example.org>\nDescription: stand-in agent\n"
    )
    deb = out_dir / f"ies-agent_{version}_{arch}.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "--build", str(tree), str(deb)],
        check=True,
        capture_output=True,
    )
    return deb


def host_arch() -> str:
    """This machine's Debian architecture."""
    return subprocess.run(
        ["dpkg", "--print-architecture"], check=True, capture_output=True, text=True
    ).stdout.strip()


def write_manifest(
    deb: Path,
    keys: list[PrivateKey],
    *,
    name: str = "ies-agent",
    version: str | None = None,
    arch: str | None = None,
) -> Path:
    """Write a signed manifest for ``deb`` beside it; return its path."""
    import hashlib

    data = deb.read_bytes()
    parts = deb.name.removesuffix(".deb").split("_")
    body = {
        "name": name,
        "version": version or parts[1],
        "architecture": arch or parts[2],
        "file": deb.name,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    path = deb.with_suffix(".json")
    path.write_bytes(sign_manifest(body, keys))
    return path


def write_public_key(key: PrivateKey, path: Path) -> Path:
    """Write the public half of ``key`` as a trusted-key PEM file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
    )
    return path


def new_key(alg: str = "ed25519") -> PrivateKey:
    """A fresh publisher key."""
    if alg == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


class ProcessService:
    """Runs the stand-in agent installed in ``root`` like a service (by pid)."""

    def __init__(self, root: Path, health_file: Path) -> None:
        self.root = root
        self.health_file = health_file
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        """Start the installed program (returns at once, like systemctl --no-block)."""
        self.stop()
        self.starts += 1
        program = self.root / "usr/lib/ies-agent/agent.py"
        self.process = subprocess.Popen(
            [sys.executable, str(program), str(self.health_file)],
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        """Stop it (SIGTERM, then wait) if it runs."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    @property
    def running(self) -> bool:
        """Whether the program is running now."""
        return self.process is not None and self.process.poll() is None
