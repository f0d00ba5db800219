"""``ies-agent update``: signed self-update of the agent's package, with rollback.

``update apply MANIFEST`` (as root) verifies a signed manifest (a path, e.g. on a USB
stick, or an ``https://`` URL) and its package, installs it and restores the previous
version if the agent does not report healthy in time; every step goes into the
evidence log (``ies_agent.selfupdate``). ``update verify MANIFEST`` only checks the
signature and the package. ``update record`` copies steps still waiting in the update
journal into the evidence log while no agent runs. ``update sign`` is the publisher's
side: it writes a signed manifest for a package.

Exit status: 0 done (or nothing to do), 1 rejected, rolled back or failed, 2 usage.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

DEFAULT_DATA_DIR = "/var/lib/ies-agent"
DEFAULT_TRUST_DIR = "/etc/ies-agent/trust"


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``apply``, ``verify``, ``record`` and ``sign`` actions."""
    sub = parser.add_subparsers(dest="update_action", metavar="ACTION", required=True)

    apply = sub.add_parser(
        "apply", help="verify and install a signed update; roll back if unhealthy"
    )
    apply.add_argument("manifest", help="signed manifest: a file path or a URL")
    _package_and_trust(apply)
    apply.add_argument(
        "--timeout",
        type=float,
        default=180.0,
        metavar="S",
        help="seconds the new version has to report healthy (default 180)",
    )
    apply.add_argument(
        "--allow-downgrade",
        action="store_true",
        help="accept a manifest older than the installed version",
    )
    apply.add_argument(
        "--data-dir", default=DEFAULT_DATA_DIR, help="agent data directory"
    )
    apply.add_argument(
        "--health-file",
        default="/run/ies-agent/health.json",
        help="where the agent reports health (default /run/ies-agent/health.json)",
    )

    verify = sub.add_parser("verify", help="check a manifest and its package only")
    verify.add_argument("manifest", help="signed manifest: a file path")
    _package_and_trust(verify)

    record = sub.add_parser(
        "record", help="record waiting update steps in the evidence log (agent stopped)"
    )
    record.add_argument(
        "--data-dir", default=DEFAULT_DATA_DIR, help="agent data directory"
    )

    sign = sub.add_parser("sign", help="write a signed manifest for a package")
    sign.add_argument("package", help="the .deb to describe")
    sign.add_argument(
        "--key",
        action="append",
        required=True,
        metavar="PEM",
        help="publisher private key, PKCS8 PEM, Ed25519 or P-256 (repeatable)",
    )
    sign.add_argument(
        "-o", "--output", default=None, help="manifest file (default PACKAGE.json)"
    )


def _package_and_trust(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--package",
        default=None,
        help="the package file (default: the manifest's 'file' beside the manifest)",
    )
    parser.add_argument(
        "--trust-dir",
        action="append",
        default=None,
        metavar="DIR",
        help=f"directory of trusted publisher keys (default {DEFAULT_TRUST_DIR})",
    )


def main(args: argparse.Namespace) -> int:
    """Run the chosen ``update`` action; return the exit status."""
    action = {
        "apply": _apply,
        "verify": _verify,
        "record": _record,
        "sign": _sign,
    }[args.update_action]
    return action(args)


def _trust_dirs(args: argparse.Namespace) -> tuple[Path, ...]:
    from pathlib import Path

    return tuple(Path(d) for d in (args.trust_dir or [DEFAULT_TRUST_DIR]))


def _apply(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from ies_agent import selfupdate

    if os.geteuid() != 0:
        print("ies-agent update apply: run as root (sudo): it installs a package")
        return 1
    settings = selfupdate.UpdateSettings(
        trust_dirs=_trust_dirs(args),
        data_dir=Path(args.data_dir),
        health_timeout_s=args.timeout,
        allow_downgrade=args.allow_downgrade,
    )
    updater = selfupdate.Updater(
        settings, health=selfupdate.HealthFileProbe(Path(args.health_file))
    )
    package = Path(args.package) if args.package else None
    try:
        result = updater.apply(args.manifest, package)
    except selfupdate.UpdateError as exc:
        print(f"ies-agent update apply: rejected, nothing changed: {exc}")
        return 1
    print(f"ies-agent update apply: {result.outcome}: {result.message}")
    print(f"  update id {result.update_id}; steps: {' '.join(result.steps)}")
    if not result.recorded:
        print("  the agent records these steps in its evidence log when it runs")
    return 0 if result.ok else 1


def _verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ies_agent.signing import manifest as signed

    source = Path(args.manifest)
    try:
        trust = signed.TrustStore.load(_trust_dirs(args))
        found = signed.verify_manifest(source.read_bytes(), trust, source=str(source))
        package = Path(args.package) if args.package else source.parent / found.file
        signed.verify_payload(found, package)
    except signed.ManifestError as exc:
        print(f"ies-agent update verify: NOT valid: {exc}")
        return 1
    except OSError as exc:
        print(f"ies-agent update verify: cannot read {source}: {exc.strerror}")
        return 1
    print(
        f"ies-agent update verify: ok — {found.name} {found.version} "
        f"({found.architecture or 'any'}), {package} matches, signed by key "
        f"{found.signed_by}"
    )
    return 0


def _record(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ies_agent import selfupdate
    from ies_agent.evidence.errors import EvidenceError

    data_dir = Path(args.data_dir)
    journal = selfupdate.UpdateJournal(data_dir / selfupdate.UPDATES_DIR)
    try:
        count = selfupdate.record_now(data_dir, journal)
    except (EvidenceError, OSError) as exc:
        print(f"ies-agent update record: {exc}")
        return 1
    if count is None:
        print(
            "ies-agent update record: the agent holds the log (it records the steps "
            "itself) or has never run here"
        )
        return 1
    print(f"ies-agent update record: {count} step{'s' if count != 1 else ''} recorded")
    return 0


def _sign(args: argparse.Namespace) -> int:
    import hashlib
    import subprocess
    import time
    from pathlib import Path

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    from ies_agent.signing import manifest as signed

    package = Path(args.package)
    try:
        shown = "--showformat=${Package}\n${Version}\n${Architecture}\n"
        fields = subprocess.run(
            ["dpkg-deb", "--show", shown, str(package)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
        data = package.read_bytes()
        private_keys: list[signed.PrivateKey] = []
        for key_file in args.key:
            key = serialization.load_pem_private_key(
                Path(key_file).read_bytes(), password=None
            )
            if not isinstance(
                key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
            ):
                raise TypeError(f"{key_file} is neither Ed25519 nor ECDSA")
            signed.key_alg(key)
            private_keys.append(key)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"ies-agent update sign: {exc}")
        return 1
    except (ValueError, TypeError, signed.ManifestError) as exc:
        print(f"ies-agent update sign: unusable key: {exc}")
        return 1
    body = {
        "name": fields[0],
        "version": fields[1],
        "architecture": fields[2],
        "file": package.name,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "published": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    document = signed.sign_manifest(body, private_keys)
    output = Path(args.output or f"{package}.json")
    output.write_bytes(document)
    print(f"ies-agent update sign: wrote {output} for {fields[0]} {fields[1]}")
    return 0
