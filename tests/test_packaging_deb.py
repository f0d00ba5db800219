"""The built Debian package: its files, permissions, maintainer scripts and units.

Inspects ``packaging/dist/ies-agent_<version>_amd64.deb`` (``.ci/run`` builds it
before the tests; a missing package is built here with ``packaging/build-deb.sh
--arch amd64``). Installing it into a Debian root is ``packaging/check-install.sh``.
"""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
import tarfile
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(
    shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian)"
)

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
SITE = "usr/lib/ies-agent/lib/python3.11/site-packages"
DEBIAN_PYTHON = Path("/usr/bin/python3.11")


@pytest.fixture(scope="module")
def deb() -> Path:
    """The amd64 package of this tree's version, built if it is not there yet."""
    path = ROOT / "packaging" / "dist" / f"ies-agent_{VERSION}-1_amd64.deb"
    if not path.exists():
        subprocess.run(
            ["packaging/build-deb.sh", "--arch", "amd64"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            timeout=600,
        )
    return path


@pytest.fixture(scope="module")
def members(
    deb: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tarfile.TarInfo]:
    """The package's data members by path (without the leading ``./``)."""
    out = tmp_path_factory.mktemp("data") / "data.tar"
    with out.open("wb") as handle:
        subprocess.run(
            ["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=handle, check=True
        )
    with tarfile.open(out) as archive:
        return {m.name.removeprefix("./").rstrip("/"): m for m in archive.getmembers()}


@pytest.fixture(scope="module")
def tree(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package unpacked (data and control) into a scratch directory."""
    path = tmp_path_factory.mktemp("tree")
    subprocess.run(["dpkg-deb", "--raw-extract", str(deb), str(path)], check=True)
    return path


def control(tree: Path) -> dict[str, str]:
    text = (tree / "DEBIAN" / "control").read_text()
    return dict(re.findall(r"^([A-Za-z-]+): (.*)$", text, flags=re.M))


def test_control_fields_name_version_architecture_and_dependencies(tree: Path) -> None:
    fields = control(tree)
    assert fields["Package"] == "ies-agent"
    assert fields["Version"] == f"{VERSION}-1"
    assert fields["Architecture"] == "amd64"
    depends = fields["Depends"]
    for needed in ("python3.11", "tzdata", "adduser"):
        assert needed in depends


def test_files_are_where_the_system_expects_them(
    members: dict[str, tarfile.TarInfo],
) -> None:
    for path in (
        "usr/bin/ies-agent",
        "lib/systemd/system/ies-agent.service",
        "lib/systemd/system/ies-agent-firstboot.service",
        "usr/lib/ies-agent/pyvenv.cfg",
        f"{SITE}/ies_agent/cli.py",
        f"{SITE}/ies_agent/signing/manifest.py",
        f"{SITE}/ies_drivers/__init__.py",
        f"{SITE}/ies_agent/_configs/devices/eastron-sdm630.toml",
        f"{SITE}/cryptography/__init__.py",
        f"{SITE}/pymodbus/__init__.py",
        "usr/share/doc/ies-agent/copyright",
        "usr/share/doc/ies-agent/changelog.Debian.gz",
        "usr/share/doc/ies-agent/examples/site.toml",
        "usr/share/man/man1/ies-agent.1.gz",
    ):
        assert path in members, path
    python = members["usr/lib/ies-agent/bin/python3"]
    assert python.issym() and python.linkname == "../../../bin/python3.11"
    # Configuration, state and keys come from the gateway, never from the package.
    assert not [p for p in members if p.startswith(("var/", "etc/ies-agent/ies-agent"))]
    assert not [p for p in members if "__pycache__" in p or p.endswith(".pyc")]


def test_everything_belongs_to_root_and_nothing_is_writable_by_others(
    members: dict[str, tarfile.TarInfo],
) -> None:
    assert {(m.uname, m.gname) for m in members.values()} == {("root", "root")}
    loose = [
        p
        for p, m in members.items()
        if not m.issym() and m.mode & (stat.S_IWGRP | stat.S_IWOTH)
    ]
    assert loose == []
    assert members["usr/bin/ies-agent"].mode & 0o777 == 0o755
    assert members["lib/systemd/system/ies-agent.service"].mode & 0o777 == 0o644
    programs = [
        p
        for p, m in members.items()
        if m.isfile() and m.mode & 0o111 and p.startswith("usr/lib")
    ]
    assert programs == []  # only /usr/bin/ies-agent is a program


def test_units_are_shipped_as_written(tree: Path) -> None:
    for unit in ("ies-agent.service", "ies-agent-firstboot.service"):
        shipped = (tree / "lib/systemd/system" / unit).read_bytes()
        assert shipped == (ROOT / "packaging/systemd" / unit).read_bytes()


def test_maintainer_scripts_keep_data_on_remove_and_delete_it_on_purge(
    tree: Path,
) -> None:
    scripts = tree / "DEBIAN"
    for name in ("postinst", "prerm", "postrm"):
        script = scripts / name
        assert script.stat().st_mode & 0o755 == 0o755
        subprocess.run(["sh", "-n", str(script)], check=True)
    postinst = (scripts / "postinst").read_text()
    assert "adduser --system --group" in postinst
    assert "adduser --quiet ies-agent dialout" in postinst
    postrm = (scripts / "postrm").read_text()
    remove = postrm.split("remove)", 1)[1].split(";;", 1)[0]
    purge = postrm.split("purge)", 1)[1].split(";;", 1)[0]
    assert "rm " not in remove and "kept /etc/ies-agent" in remove
    announce = purge.index("purging. Deleting /etc/ies-agent")
    delete = purge.index("rm -rf /etc/ies-agent /var/lib/ies-agent")
    assert announce < delete  # says so first
    md5sums = (scripts / "md5sums").read_text()
    assert "usr/bin/ies-agent\n" in md5sums


def test_copyright_names_every_bundled_distribution(tree: Path) -> None:
    copyright_text = (tree / "usr/share/doc/ies-agent/copyright").read_text()
    bundled = (tree / "usr/share/doc/ies-agent/bundled-wheels.txt").read_text().split()
    for entry in bundled:
        name, version = entry.rsplit("-", 1)
        if name != "ies_edge_agent":
            assert f"{version}\nLicense: " in copyright_text, entry
    assert "License: Apache-2.0" in copyright_text


@pytest.mark.skipif(not DEBIAN_PYTHON.exists(), reason="needs Debian's python3.11")
def test_private_environment_runs_on_debians_python(tree: Path) -> None:
    # usr/bin/python3.11 in the scratch tree is the system's, as on a gateway.
    (tree / "usr/bin/python3.11").symlink_to(DEBIAN_PYTHON)
    python = tree / "usr/lib/ies-agent/bin/python3"
    example = tree / "usr/share/doc/ies-agent/examples/site.toml"
    code = (
        "import sys, cryptography, pymodbus; from ies_agent.cli import main; "
        "print(sys.prefix); sys.exit(main(['config', 'check', sys.argv[1]]))"
    )
    done = subprocess.run(
        [str(python), "-I", "-c", code, str(example)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[0] == str(tree / "usr/lib/ies-agent")
    assert "ok — gateway gw-pune-0001" in done.stdout


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="needs systemd-analyze"
)
def test_units_verify_and_the_agents_exposure_is_under_3(tree: Path) -> None:
    units = ["ies-agent.service", "ies-agent-firstboot.service"]
    # The units they order against (sysinit.target, network-online.target...) come
    # from this machine's systemd, as they would from the gateway's.
    shipped = tree / "lib/systemd/system"
    for unit in Path("/lib/systemd/system").iterdir():
        if unit.is_file() and not (shipped / unit.name).exists():
            shutil.copyfile(unit, shipped / unit.name)
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={tree}", *units],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr
    for unit, limit in (
        ("ies-agent.service", 3.0),
        ("ies-agent-firstboot.service", 3.0),
    ):
        security = subprocess.run(
            ["systemd-analyze", "security", "--offline=true", f"--root={tree}", unit],
            capture_output=True,
            text=True,
            check=False,
        )
        found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
        assert found, security.stdout + security.stderr
        assert float(found.group(1)) < limit, security.stdout


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="needs systemd-analyze"
)
def test_firmware_bridge_unit_is_sandboxed_without_serial_ports_or_agent_keys(
    tmp_path: Path,
) -> None:
    text = (ROOT / "packaging/systemd/ies-firmware-bridge.service").read_text()
    assert "DeviceAllow" not in text and "dialout" not in text
    assert "PrivateDevices=yes" in text and "DynamicUser=yes" in text
    assert "InaccessiblePaths=-/var/lib/ies-agent -/etc/ies-agent/secrets" in text
    security = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=true",
            str(ROOT / "packaging/systemd/ies-firmware-bridge.service"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
    assert found and float(found.group(1)) < 3.0, security.stdout


@pytest.mark.skipif(shutil.which("lintian") is None, reason="needs lintian")
def test_lintian_has_nothing_left_to_say(deb: Path) -> None:
    done = subprocess.run(
        [
            "lintian",
            "--no-cfg",
            "-E",
            "-I",
            "--pedantic",
            "--fail-on",
            "info",
            str(deb),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    tags = [line for line in done.stdout.splitlines() if re.match(r"^[EWIPX]: ", line)]
    assert tags == [] and done.returncode == 0, done.stdout + done.stderr


def test_pi_gen_stage_copies_package_site_file_and_keys(tmp_path: Path) -> None:
    stage = ROOT / "packaging/pi-gen/stage-ies-agent"
    rootfs, files = tmp_path / "rootfs", tmp_path / "files"
    rootfs.mkdir()
    (files / "trust").mkdir(parents=True)
    (files / "ies-agent_0.1.0-1_arm64.deb").write_bytes(b"package")
    (files / "ies-agent_0.1.0-2_arm64.deb").write_bytes(b"newer package")
    (files / "ies-agent.toml").write_text('[gateway]\nid = "gw-1"\n')
    (files / "trust" / "publisher.pem").write_text("key")
    env = {
        "PATH": "/usr/bin:/bin",
        "ROOTFS_DIR": str(rootfs),
        "IES_AGENT_FILES": str(files),
    }

    # prerun.sh: the root exists, so pi-gen's copy_previous is not needed.
    subprocess.run(["bash", "-e", "./prerun.sh"], cwd=stage, env=env, check=True)
    subprocess.run(
        ["bash", "-e", "./00-run.sh"], cwd=stage / "00-ies-agent", env=env, check=True
    )

    copied = rootfs / "tmp/ies-agent-image/ies-agent_0.1.0-2_arm64.deb"
    assert copied.read_bytes() == b"newer package"
    assert (rootfs / "boot/firmware/ies-agent.toml").read_text().startswith("[gateway]")
    assert (rootfs / "etc/ies-agent/trust/publisher.pem").read_text() == "key"
    subprocess.run(
        ["bash", "-n", str(stage / "00-ies-agent/01-run-chroot.sh")], check=True
    )

    for deb in files.glob("*.deb"):
        deb.unlink()
    missing = subprocess.run(
        ["bash", "-e", "./00-run.sh"],
        cwd=stage / "00-ies-agent",
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert (
        missing.returncode == 1
        and "packaging/build-deb.sh --arch arm64" in missing.stderr
    )
