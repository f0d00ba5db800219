#!/usr/bin/env bash
# Build the ies-agent Debian packages (amd64 and arm64) into packaging/dist/.
#
#   packaging/build-deb.sh [--arch amd64|arm64] [--trust-key PUB.pem]... [--offline]
#
# Run from the repository root. The agent and its dependencies go into a private
# Python environment under /usr/lib/ies-agent, made from wheels: the agent's own wheel
# (built here) and its dependencies' wheels for the target (pip download --platform),
# so an arm64 package is built on an amd64 machine without emulation. The environment
# uses the target's /usr/bin/python3.11 (Debian 12, Raspberry Pi OS 12), hence the
# dependency on python3.11. Wheels are cached in packaging/.cache/wheels/; --offline
# builds from that cache only.
#
# --trust-key adds a publisher's public key (PEM) to /etc/ies-agent/trust/ as a
# conffile, so `ies-agent update apply` accepts manifests it signed.
#
# Needs: python3 (>= 3.11) with pip, dpkg-deb, gzip. Takes about a minute per
# architecture with a warm cache (measured figures in packaging/README.md).
set -euo pipefail

if [ ! -f pyproject.toml ] || [ ! -d packaging ]; then
    echo "build-deb.sh: run me from the repository root (packaging/build-deb.sh)" >&2
    exit 2
fi

ARCHES=(amd64 arm64)
TRUST_KEYS=()
OFFLINE=0
while [ $# -gt 0 ]; do
    case "$1" in
    --arch) ARCHES=("$2"); shift 2 ;;
    --trust-key) TRUST_KEYS+=("$2"); shift 2 ;;
    --offline) OFFLINE=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "build-deb.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
for arch in "${ARCHES[@]}"; do
    case "$arch" in
    amd64|arm64) ;;
    *) echo "build-deb.sh: no package for $arch (amd64 or arm64; no armhf:" \
        "cryptography ships no 32-bit ARM wheels)" >&2; exit 2 ;;
    esac
done

started=$(date +%s)
PACKAGE=ies-agent
PYTHON=${PYTHON:-python3}
TARGET_PY=3.11
ROOT=$(pwd)
OUT=$ROOT/packaging/dist
WORK=$ROOT/packaging/build
CACHE=$ROOT/packaging/.cache/wheels
MAINTAINER="IES Edge Agent developers <ies-edge-agent@example.org>"
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

# Version: the agent's own, as Debian spells pre-releases (0.2.0rc1 -> 0.2.0~rc1).
PY_VERSION=$($PYTHON -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
DEB_VERSION="$(echo "$PY_VERSION" | sed -E 's/(a|b|rc|\.dev)([0-9]+)$/~\1\2/')-1"
HAS_BRIDGE=$($PYTHON -c 'import tomllib; print(int("ies-firmware-bridge" in tomllib.load(open("pyproject.toml", "rb"))["project"].get("scripts", {})))')
echo "build-deb.sh: $PACKAGE $DEB_VERSION for ${ARCHES[*]}"

rm -rf "$WORK"
mkdir -p "$WORK" "$OUT"

# 1. The agent's own wheel (pure Python; configs/ inside as ies_agent/_configs).
$PYTHON -m pip wheel -q --no-deps --wheel-dir "$WORK/wheel" . >/dev/null
AGENT_WHEEL=$(ls "$WORK"/wheel/ies_edge_agent-*.whl)

platforms() {
    case "$1" in
    amd64) echo "--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64" ;;
    arm64) echo "--platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64" ;;
    esac
}

build_one() {
    local arch=$1
    local stage=$WORK/$arch/root
    local venv=$stage/usr/lib/$PACKAGE
    local site=$venv/lib/python$TARGET_PY/site-packages
    local cache=$CACHE/$arch
    local platform_args target_args
    read -ra platform_args <<<"$(platforms "$arch")"
    target_args=(--only-binary=:all: "${platform_args[@]}"
        --python-version "$TARGET_PY" --implementation cp --abi "cp${TARGET_PY/./}"
        --abi abi3 --abi none)
    mkdir -p "$stage" "$cache"

    # 2. Dependency wheels for the target, cached.
    if [ "$OFFLINE" = 0 ]; then
        $PYTHON -m pip download -q --dest "$cache" "${target_args[@]}" "$AGENT_WHEEL" \
            2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
        rm -f "$cache"/ies_edge_agent-*.whl
    fi

    # 3. The private environment: wheels unpacked into site-packages, and the layout
    #    `python -m venv` makes (pyvenv.cfg, bin/python3 -> the system interpreter).
    $PYTHON -m pip install -q --no-index --find-links "$cache" --target "$site" \
        --no-compile --no-warn-script-location "${target_args[@]}" "$AGENT_WHEEL" \
        2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
    [ -d "$site/ies_agent" ] || { echo "build-deb.sh: pip install failed" >&2; exit 1; }
    rm -rf "${site:?}/bin"
    find "$site" -name __pycache__ -type d -prune -exec rm -rf {} +
    find "$site" \( -name '*.pyc' -o -name 'RECORD' -o -name 'INSTALLER' \
        -o -name 'REQUESTED' -o -name 'direct_url.json' \) -delete
    mkdir -p "$venv/bin"
    cat >"$venv/pyvenv.cfg" <<EOF
home = /usr/bin
include-system-site-packages = false
version = $TARGET_PY
executable = /usr/bin/python$TARGET_PY
EOF
    ln -s "../../../bin/python$TARGET_PY" "$venv/bin/python3"
    ln -s python3 "$venv/bin/python"
    mkdir -p "$stage/usr/bin"
    write_launcher "$stage/usr/bin/ies-agent" ies-agent
    if [ "$HAS_BRIDGE" = 1 ]; then
        write_launcher "$stage/usr/bin/ies-firmware-bridge" ies-firmware-bridge
    fi

    # Tidy the third-party code as dh_python3 would: no test suites, no #! lines in
    # modules that are not programs, shared objects stripped of symbols.
    rm -rf "$site"/sunspec2/tests
    find "$site" -name '*.py' -exec sed -i '1{/^#!.*python/d}' {} +
    strip_objects "$arch" "$site"

    # 4. Units, documentation, manual page, trusted keys.
    install -D -m 0644 packaging/systemd/ies-agent.service \
        "$stage/lib/systemd/system/ies-agent.service"
    install -D -m 0644 packaging/systemd/ies-agent-firstboot.service \
        "$stage/lib/systemd/system/ies-agent-firstboot.service"
    if [ "$HAS_BRIDGE" = 1 ]; then
        install -D -m 0644 packaging/systemd/ies-firmware-bridge.service \
            "$stage/lib/systemd/system/ies-firmware-bridge.service"
    fi
    local doc=$stage/usr/share/doc/$PACKAGE
    install -D -m 0644 packaging/README.md "$doc/README.md"
    install -D -m 0644 configs/examples/site.toml "$doc/examples/site.toml"
    write_changelog | gzip -9n >"$doc/changelog.Debian.gz"
    write_copyright "$site" >"$doc/copyright"
    (cd "$site" && ls -d ./*.dist-info | sed 's|^\./||; s|\.dist-info$||') \
        >"$doc/bundled-wheels.txt"
    for page in ies-agent ies-firmware-bridge; do
        install -D -m 0644 "packaging/debian/$page.1" "$stage/usr/share/man/man1/$page.1"
        gzip -9n "$stage/usr/share/man/man1/$page.1"
    done
    install -D -m 0644 packaging/debian/lintian-overrides \
        "$stage/usr/share/lintian/overrides/$PACKAGE"
    local conffiles=()
    for key in "${TRUST_KEYS[@]+"${TRUST_KEYS[@]}"}"; do
        install -D -m 0644 "$key" "$stage/etc/ies-agent/trust/$(basename "$key")"
        conffiles+=("/etc/ies-agent/trust/$(basename "$key")")
    done

    # 5. Control files and maintainer scripts.
    mkdir -p "$stage/DEBIAN"
    for script in postinst prerm postrm; do
        install -m 0755 "packaging/debian/$script" "$stage/DEBIAN/$script"
    done
    if [ ${#conffiles[@]} -gt 0 ]; then
        printf '%s\n' "${conffiles[@]}" >"$stage/DEBIAN/conffiles"
    fi
    local size libraries
    size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
    libraries=$(library_depends "$site")
    cat >"$stage/DEBIAN/control" <<EOF
Package: $PACKAGE
Version: $DEB_VERSION
Architecture: $arch
Maintainer: $MAINTAINER
Installed-Size: $size
Depends: python$TARGET_PY, tzdata, adduser, $libraries
Suggests: socat
Section: net
Priority: optional
Description: edge agent of the India Energy Stack
 A daemon for Raspberry-Pi-class gateways beside smart meters, solar inverters
 and EV chargers. It reads meters and inverters over Modbus (TCP, RTU, RTU over
 TCP), SunSpec and DLMS/COSEM (IS 15959), bridges OCPP 1.6J and 2.0.1 chargers
 to their operator's central system, keeps every interval reading in a signed,
 append-only evidence log that anyone holding the gateway's public key can
 verify offline, answers demand-response dispatch, and forwards the evidence to
 MQTT brokers and IES endpoints.
 .
 The package brings its Python dependencies in a private environment under
 /usr/lib/ies-agent, a sandboxed systemd service with a watchdog, first-boot
 import of a site file from the boot partition, and signed self-update with
 rollback.
EOF

    # 6. Ownership root, modes normalised, times clamped: the same tree gives the same
    #    package.
    find "$stage" -type d -exec chmod 0755 {} +
    find "$stage" -type f -exec chmod 0644 {} +
    chmod 0755 "$stage"/DEBIAN/post* "$stage"/DEBIAN/prerm "$stage"/usr/bin/*
    find "$site" -name '*.so' -exec chmod 0644 {} +
    (cd "$stage" && find . -path ./DEBIAN -prune -o -type f -print | sed 's|^\./||' |
        LC_ALL=C sort | xargs -d '\n' md5sum >DEBIAN/md5sums)
    chmod 0644 "$stage/DEBIAN/md5sums"
    find "$stage" -newermt "@$SOURCE_DATE_EPOCH" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
    local deb=$OUT/${PACKAGE}_${DEB_VERSION}_${arch}.deb
    dpkg-deb -Zxz --root-owner-group --build "$stage" "$deb" >/dev/null
    (cd "$OUT" && sha256sum "$(basename "$deb")" >"$(basename "$deb").sha256")
    echo "build-deb.sh: $deb ($(du -h "$deb" | cut -f1))"
}

library_depends() {
    # The Debian packages behind the shared libraries the wheels' objects link to
    # (what dpkg-shlibdeps would find on the target). Libraries a wheel brings along
    # in its own *.libs directory need nothing. An unknown library stops the build:
    # add it here.
    local site=$1 soname deps=("libc6 (>= 2.28)")
    for soname in $(find "$site" -name '*.so*' -type f -exec readelf -d {} + 2>/dev/null |
        sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | sort -u); do
        if find "$site" -path '*.libs/*' -name "$soname" | grep -q .; then
            continue
        fi
        case "$soname" in
        libc.so.6|libm.so.6|libdl.so.2|libpthread.so.0|librt.so.1|libutil.so.1) ;;
        ld-linux-*.so.*) ;;
        libgcc_s.so.1) deps+=("libgcc-s1") ;;
        libstdc++.so.6) deps+=("libstdc++6") ;;
        libz.so.1) deps+=("zlib1g") ;;
        libssl.so.3|libcrypto.so.3) deps+=("libssl3") ;;
        libffi.so.8) deps+=("libffi8") ;;
        *) echo "build-deb.sh: a wheel needs $soname; map it to a Debian package in" \
            "library_depends" >&2; exit 1 ;;
        esac
    done
    printf '%s\n' "${deps[@]}" | awk '!seen[$0]++' | paste -sd, - | sed 's/,/, /g'
}

write_launcher() {
    # /usr/bin/NAME: runs the console script NAME of pyproject.toml in the private
    # environment (-I: no PYTHONPATH, no user site, no current directory).
    local path=$1 name=$2 entry module function
    entry=$($PYTHON -c 'import sys, tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["scripts"][sys.argv[1]])' "$name")
    module=${entry%%:*}
    function=${entry##*:}
    cat >"$path" <<EOF
#!/bin/sh
# $name: the $PACKAGE program, run in its private Python environment.
exec /usr/lib/$PACKAGE/bin/python3 -I -c 'import sys; sys.argv[0] = "$name"; from $module import $function; sys.exit($function())' "\$@"
EOF
}

strip_objects() {
    # Strip shared objects with the target's strip (binutils-aarch64-linux-gnu for
    # arm64 on an amd64 machine). Without it the package still works; lintian then
    # reports unstripped-binary-or-object.
    local arch=$1 site=$2 strip_cmd
    case "$arch" in
    amd64) strip_cmd=${STRIP_AMD64:-x86_64-linux-gnu-strip} ;;
    arm64) strip_cmd=${STRIP_ARM64:-aarch64-linux-gnu-strip} ;;
    esac
    if [ "$(dpkg --print-architecture)" = "$arch" ] && ! command -v "$strip_cmd" >/dev/null; then
        strip_cmd="strip"
    fi
    if ! command -v "$strip_cmd" >/dev/null; then
        echo "build-deb.sh: warning: no $strip_cmd; $arch shared objects left unstripped" >&2
        return 0
    fi
    find "$site" -name '*.so' -type f -exec "$strip_cmd" --strip-unneeded \
        --remove-section=.comment --remove-section=.note {} +
}

write_changelog() {
    cat <<EOF
$PACKAGE ($DEB_VERSION) unstable; urgency=medium

  * Release $PY_VERSION of the IES edge agent, built from the project's source
    tree with packaging/build-deb.sh.

 -- $MAINTAINER  $(date -u -R -d "@$SOURCE_DATE_EPOCH")
EOF
}

write_copyright() {
    # The agent's licence, then each bundled wheel with its licence as its own
    # metadata states it, and where its licence text is installed.
    $PYTHON - "$1" <<'EOF'
import sys
from email.parser import Parser
from pathlib import Path

site = Path(sys.argv[1])
print("IES edge agent")
print("")
import time, os
year = time.gmtime(int(os.environ["SOURCE_DATE_EPOCH"])).tm_year
print(f"Copyright {year} the IES Edge Agent developers")
print("License: Apache-2.0")
print(" The full text is in /usr/share/common-licenses/Apache-2.0.")
print("")
print("Bundled Python distributions in /usr/lib/ies-agent (unmodified wheels from")
print("PyPI). Each licence text ships in the distribution's .dist-info directory:")
for info in sorted(site.glob("*.dist-info")):
    meta = Parser().parsestr((info / "METADATA").read_text(encoding="utf-8"))
    if meta["Name"] == "ies-edge-agent":
        continue
    licence = meta.get("License-Expression") or meta.get("License") or ""
    licence = licence.splitlines()[0].strip() if licence.strip() else ""
    if not licence:
        classifiers = [c for c in meta.get_all("Classifier", []) if c.startswith("License ::")]
        licence = "; ".join(c.split(" :: ")[-1] for c in classifiers) or "see licence files"
    files = sorted(
        str(p.relative_to(site))
        for p in info.rglob("*")
        if p.is_file() and ("LICEN" in p.name.upper() or "COPYING" in p.name.upper())
    )
    print("")
    print(f"{meta['Name']} {meta['Version']}")
    print(f"License: {licence}")
    for name in files:
        print(f" /usr/lib/ies-agent/lib/python3.11/site-packages/{name}")
EOF
}

for arch in "${ARCHES[@]}"; do
    build_one "$arch"
done
echo "build-deb.sh: done in $(( $(date +%s) - started )) s"
