"""Signed self-update: verification, installation with real dpkg, rollback, evidence.

dpkg works on a scratch root (``dpkg --root``) holding small ``ies-agent`` packages
with a stand-in agent (``packaging_fixtures``), because installing the real package
into this machine is not possible in a test; ``packaging/check-install.sh`` does the
same with the real package in a Debian root. Everything else is real: signatures,
dpkg, the health file, the processes, the evidence log and its verifier.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli_helpers import entries, run_agent
from conftest import free_port
from ies_agent.evidence.log import EvidenceLog
from ies_agent.selfupdate import (
    Dpkg,
    HealthFileProbe,
    UpdateJournal,
    Updater,
    UpdateRejected,
    UpdateSettings,
    drain_journal,
    record_pending,
    upstream_version,
)
from ies_agent.signing.manifest import (
    ManifestFormatError,
    PayloadMismatchError,
    TrustStore,
    TrustStoreError,
    UntrustedManifestError,
    parse_manifest,
    sign_manifest,
    verify_manifest,
    verify_payload,
)
from packaging_fixtures import (
    ProcessService,
    build_package,
    host_arch,
    make_root,
    new_key,
    write_manifest,
    write_public_key,
)

pytestmark = pytest.mark.skipif(
    shutil.which("dpkg") is None, reason="needs dpkg (Debian)"
)

ARCH = host_arch() if shutil.which("dpkg") else "amd64"


# --- the manifest verifier ------------------------------------------------------------


def body(**changes: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "name": "ies-agent",
        "version": "1.1-1",
        "architecture": "arm64",
        "file": "ies-agent_1.1-1_arm64.deb",
        "size": 3,
        "sha256": hashlib.sha256(b"deb").hexdigest(),
    }
    fields.update(changes)
    return fields


@pytest.mark.parametrize("alg", ["ed25519", "ecdsa-p256"])
def test_manifest_signed_by_a_trusted_key_verifies(tmp_path: Path, alg: str) -> None:
    key = new_key(alg)
    trust = TrustStore.load(
        [write_public_key(key, tmp_path / "trust" / "p.pem").parent]
    )
    manifest = verify_manifest(sign_manifest(body(), [key]), trust, source="m.json")
    assert (manifest.name, manifest.version, manifest.size) == ("ies-agent", "1.1-1", 3)
    assert manifest.signed_by == next(iter(trust.keys))


def test_manifest_altered_after_signing_does_not_verify(tmp_path: Path) -> None:
    key = new_key()
    trust = TrustStore.load([write_public_key(key, tmp_path / "t" / "p.pem").parent])
    document = json.loads(sign_manifest(body(), [key]))
    document["manifest"]["version"] = "9.9-1"
    with pytest.raises(UntrustedManifestError, match="does not verify"):
        verify_manifest(json.dumps(document).encode(), trust, source="m.json")


def test_manifest_signed_by_an_unknown_key_is_untrusted(tmp_path: Path) -> None:
    trusted, stranger = new_key(), new_key("ecdsa-p256")
    trust = TrustStore.load(
        [write_public_key(trusted, tmp_path / "t" / "p.pem").parent]
    )
    with pytest.raises(UntrustedManifestError, match="not signed by a trusted"):
        verify_manifest(sign_manifest(body(), [stranger]), trust, source="m.json")
    # Signed by both during a key change: the trusted signature is enough.
    both = sign_manifest(body(), [stranger, trusted])
    assert verify_manifest(both, trust, source="m.json").version == "1.1-1"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (b"not json", "not a JSON manifest"),
        (b'{"manifest": {}, "signatures": []}', "non-empty list"),
        (json.dumps({"manifest": body(), "signatures": [{}]}).encode(), "key_id"),
        (b'{"manifest": {"size": 1.5}, "signatures": [1]}', "floats are not allowed"),
    ],
)
def test_malformed_manifests_say_what_is_wrong(document: bytes, message: str) -> None:
    with pytest.raises(ManifestFormatError, match=message):
        parse_manifest(document, source="m.json")


def test_manifest_fields_are_checked_before_signing() -> None:
    key = new_key()
    with pytest.raises(ManifestFormatError, match="bare file name"):
        sign_manifest(body(file="../../etc/passwd"), [key])
    with pytest.raises(ManifestFormatError, match="64 lowercase hex"):
        sign_manifest(body(sha256="ABC"), [key])
    with pytest.raises(ManifestFormatError, match="lacks 'version'"):
        sign_manifest({k: v for k, v in body().items() if k != "version"}, [key])


def test_payload_must_have_the_signed_size_and_hash(tmp_path: Path) -> None:
    key = new_key()
    trust = TrustStore.load([write_public_key(key, tmp_path / "t" / "p.pem").parent])
    manifest = verify_manifest(sign_manifest(body(), [key]), trust, source="m")
    good = tmp_path / "good.deb"
    good.write_bytes(b"deb")
    verify_payload(manifest, good)
    (tmp_path / "long.deb").write_bytes(b"debX")
    with pytest.raises(PayloadMismatchError, match="larger than"):
        verify_payload(manifest, tmp_path / "long.deb")
    (tmp_path / "other.deb").write_bytes(b"DEB")
    with pytest.raises(PayloadMismatchError, match="SHA-256"):
        verify_payload(manifest, tmp_path / "other.deb")


def test_trust_store_refuses_unusable_keys(tmp_path: Path) -> None:
    with pytest.raises(TrustStoreError, match="no trusted publisher keys"):
        TrustStore.load([tmp_path / "missing"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.pem").write_text("hello")
    with pytest.raises(TrustStoreError, match="not a PEM public key"):
        TrustStore.load([tmp_path / "bad"])


def test_debian_versions_compare_with_the_agents_own() -> None:
    assert upstream_version("0.2.0-1") == "0.2.0"
    assert upstream_version("1:0.2.0~rc1-3") == "0.2.0rc1"
    assert upstream_version("0.2.0") == "0.2.0"


# --- updates on a scratch dpkg root ---------------------------------------------------


class Site:
    """A scratch gateway: dpkg root, data dir with a log, trust, packages, service."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root = make_root(tmp / "root")
        self.data = tmp / "data"
        self.trust = tmp / "trust"
        self.usb = tmp / "usb"
        self.usb.mkdir()
        self.key = new_key()
        write_public_key(self.key, self.trust / "publisher.pem")
        self.health = tmp / "health.json"
        self.service = ProcessService(self.root, self.health)
        self.dpkg = Dpkg(self.root)
        # The gateway's evidence log exists (first boot made its key).
        EvidenceLog.open(self.data, gateway_id="gw-update-test").close()

    def package(self, version: str, *, broken: bool = False) -> Path:
        return build_package(self.usb, version, arch=ARCH, broken=broken)

    def updater(self, *, timeout_s: float = 5.0, **settings: object) -> Updater:
        return Updater(
            UpdateSettings(
                trust_dirs=(self.trust,),
                data_dir=self.data,
                health_timeout_s=timeout_s,
                **settings,  # type: ignore[arg-type]
            ),
            dpkg=self.dpkg,
            service=self.service,
            health=HealthFileProbe(self.health, beats_needed=2, poll_s=0.05),
        )

    def installed(self) -> str | None:
        return self.dpkg.installed_version("ies-agent")

    def update_events(self) -> list[dict[str, object]]:
        return [e for e in entries(self.data) if e.get("ev") == "update"]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    gateway = Site(tmp_path)
    gateway.dpkg.install(gateway.package("1.0-1"))
    gateway.service.start()
    yield gateway
    gateway.service.stop()


def test_good_manifest_installs_and_every_step_is_in_the_evidence_log(
    site: Site,
) -> None:
    manifest = write_manifest(site.package("1.1-1"), [site.key])

    result = site.updater().apply(str(manifest))

    assert result.outcome == "installed" and result.ok, result.message
    assert site.installed() == "1.1-1"
    assert site.service.running
    assert json.loads(site.health.read_text())["version"] == "1.1"
    assert result.steps == [
        "verified",
        "saved_previous",
        "installing",
        "installed",
        "healthy",
    ]
    # No cached 1.0-1 package: it was rebuilt from the dpkg database for rollback.
    events = site.update_events()
    assert [e["step"] for e in events] == result.steps
    saved = events[1]
    assert saved["how"] == "rebuilt from the dpkg database"
    assert events[0]["key"] == next(iter(TrustStore.load([site.trust]).keys))
    assert len({e["id"] for e in events}) == len(events)
    cache = site.data / "updates" / "packages"
    assert sorted(p.name for p in cache.iterdir()) == [
        f"ies-agent_1.0-1_{ARCH}.deb",
        f"ies-agent_1.1-1_{ARCH}.deb",
    ]
    assert run_agent("verify", str(site.data)).returncode == 0


def test_tampered_package_is_rejected_and_nothing_changes(site: Site) -> None:
    deb = site.package("1.1-1")
    manifest = write_manifest(deb, [site.key])
    data = bytearray(deb.read_bytes())
    data[len(data) // 2] ^= 0x01
    deb.write_bytes(bytes(data))
    starts = site.service.starts

    with pytest.raises(UpdateRejected, match="SHA-256"):
        site.updater().apply(str(manifest))

    assert site.installed() == "1.0-1"
    assert site.service.starts == starts and site.service.running
    (event,) = site.update_events()
    assert event["step"] == "rejected" and "SHA-256" in str(event["reason"])


def test_manifest_with_a_wrong_signature_is_rejected(site: Site) -> None:
    deb = site.package("1.1-1")
    stranger = write_manifest(deb, [new_key()])
    with pytest.raises(UpdateRejected, match="not signed by a trusted publisher"):
        site.updater().apply(str(stranger))
    assert site.installed() == "1.0-1"

    # Signed by the right key, then edited to name another package.
    document = json.loads(write_manifest(deb, [site.key]).read_bytes())
    document["manifest"]["name"] = "ies-agent-evil"
    stranger.write_text(json.dumps(document))
    with pytest.raises(UpdateRejected, match="does not verify"):
        site.updater().apply(str(stranger))
    assert [e["step"] for e in site.update_events()] == ["rejected", "rejected"]


def test_unhealthy_version_is_rolled_back(site: Site) -> None:
    manifest = write_manifest(site.package("1.1-1", broken=True), [site.key])

    result = site.updater(timeout_s=2.0).apply(str(manifest))

    assert result.outcome == "rolled-back" and not result.ok
    assert "did not report healthy within 2 s" in result.message
    assert site.installed() == "1.0-1"
    assert site.service.running
    assert json.loads(site.health.read_text())["version"] == "1.0"
    assert result.steps[-5:] == [
        "installed",
        "unhealthy",
        "rolling_back",
        "rolled_back",
        "rollback_healthy",
    ]
    assert [e["step"] for e in site.update_events()] == result.steps


def test_older_version_is_refused_unless_allowed(site: Site) -> None:
    site.updater().apply(str(write_manifest(site.package("1.1-1"), [site.key])))
    old = write_manifest(site.usb / f"ies-agent_1.0-1_{ARCH}.deb", [site.key])
    with pytest.raises(UpdateRejected, match=r"older than the installed 1\.1-1"):
        site.updater().apply(str(old))
    assert site.installed() == "1.1-1"

    result = site.updater(allow_downgrade=True).apply(str(old))
    assert result.outcome == "installed" and site.installed() == "1.0-1"
    assert result.steps[1] == "saved_previous"


def test_package_for_another_machine_or_mislabelled_is_refused(site: Site) -> None:
    other_arch = "arm64" if ARCH != "arm64" else "amd64"
    deb = site.package("1.1-1")
    wrong_arch = write_manifest(deb, [site.key], arch=other_arch)
    with pytest.raises(UpdateRejected, match=f"architecture {other_arch}"):
        site.updater().apply(str(wrong_arch))
    mislabelled = write_manifest(deb, [site.key], version="1.2-1")
    with pytest.raises(UpdateRejected, match=r"says Version: 1\.1-1"):
        site.updater().apply(str(mislabelled))
    assert site.installed() == "1.0-1"


def test_same_version_again_changes_nothing(site: Site) -> None:
    installed = site.usb / f"ies-agent_1.0-1_{ARCH}.deb"
    result = site.updater().apply(str(write_manifest(installed, [site.key])))
    assert result.outcome == "unchanged" and result.ok
    assert result.steps == ["verified", "already_installed"]


def test_manifest_and_package_are_fetched_from_an_upstream_url(site: Site) -> None:
    write_manifest(site.package("1.1-1"), [site.key])
    handler = _quiet_handler(site.usb)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, name="update-server")
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/ies-agent_1.1-1_{ARCH}.json"
        result = site.updater().apply(url)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert result.outcome == "installed" and site.installed() == "1.1-1"
    assert (site.data / "updates" / "incoming" / f"ies-agent_1.1-1_{ARCH}.deb").exists()


def _quiet_handler(directory: Path) -> type[http.server.SimpleHTTPRequestHandler]:
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(directory), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


# --- the journal ----------------------------------------------------------------------


def test_journal_skips_a_torn_line_and_records_each_step_once(tmp_path: Path) -> None:
    journal = UpdateJournal(tmp_path / "updates")
    journal.append("verified", "u1/1", {"version": "1.1-1"})
    journal.append("installing", "u1/2", {"version": "1.1-1"})
    with journal.path.open("ab") as torn:
        torn.write(b'{"step": "insta')  # power cut in the middle of a write
    assert [s["step"] for s in journal.pending()] == ["verified", "installing"]

    with EvidenceLog.open(tmp_path / "data", gateway_id="gw-1") as log:
        assert record_pending(log, journal) == 2
        assert record_pending(log, journal) == 0
    events = [e for e in entries(tmp_path / "data") if e.get("ev") == "update"]
    assert [(e["step"], e["id"]) for e in events] == [
        ("verified", "u1/1"),
        ("installing", "u1/2"),
    ]


async def test_running_agent_drains_the_journal_into_its_log(tmp_path: Path) -> None:
    data = tmp_path / "data"
    journal = UpdateJournal(data / "updates")
    stop = asyncio.Event()
    with EvidenceLog.open(data, gateway_id="gw-1") as log:
        drain = asyncio.create_task(
            drain_journal(log, data, stop, every_s=0.05), name="drain"
        )
        journal.append("healthy", "u2/5", {"version": "1.1-1", "waited_s": 12})
        for _ in range(100):
            if not journal.pending():
                break
            await asyncio.sleep(0.02)
        stop.set()
        await drain
    events = [e for e in entries(data) if e.get("ev") == "update"]
    assert [(e["step"], e["waited_s"]) for e in events] == [("healthy", 12)]


# --- the command line -----------------------------------------------------------------


def test_sign_then_verify_from_the_command_line(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = new_key("ecdsa-p256")
    pem = tmp_path / "publisher.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    trust = write_public_key(key, tmp_path / "trust" / "publisher.pem").parent
    deb = build_package(tmp_path, "2.0-1", arch="arm64")

    signed = run_agent("update", "sign", str(deb), "--key", str(pem))
    assert signed.returncode == 0, signed.stdout
    manifest = Path(f"{deb}.json")
    assert parse_manifest(manifest.read_bytes(), source="m").architecture == "arm64"

    ok = run_agent("update", "verify", str(manifest), "--trust-dir", str(trust))
    assert ok.returncode == 0 and "ok — ies-agent 2.0-1 (arm64)" in ok.stdout
    deb.write_bytes(deb.read_bytes() + b"\0")
    bad = run_agent("update", "verify", str(manifest), "--trust-dir", str(trust))
    assert bad.returncode == 1 and "NOT valid" in bad.stdout
