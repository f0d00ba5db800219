#!/usr/bin/env bash
# Install the amd64 package into a fresh Debian 12 root and use it as a gateway would.
#
#   packaging/check-install.sh [--deb packaging/dist/ies-agent_<v>_amd64.deb] [--keep]
#
# Run from the repository root, as root, after packaging/build-deb.sh. Needs
# debootstrap and a Debian mirror (deb.debian.org). Too slow for CI (a few minutes);
# its last result is recorded in packaging/README.md.
#
# The root is made with debootstrap (cached in packaging/.cache/) and gets the
# package through the pi-gen stage's own scripts, with `on_chroot` standing in for
# pi-gen's. systemd does not run inside a chroot, so:
#   - the agent is run as its service user with the environment systemd would give
#     it (RUNTIME_DIRECTORY, WATCHDOG_USEC), by a stand-in `systemctl` placed in
#     /usr/local/sbin, which the self-update calls to stop and start the agent;
#   - MemoryDenyWriteExecute= is emulated with the kernel's PR_SET_MDWE;
#   - the unit files are checked with the host's systemd-analyze --root.
# Everything else is real: apt, dpkg, maintainer scripts, the user, first boot,
# signed self-update with rollback, the evidence log and its verifier.
set -euo pipefail

if [ ! -f pyproject.toml ] || [ "$(id -u)" != 0 ]; then
    echo "check-install.sh: run from the repository root, as root" >&2
    exit 2
fi
DEB=""
KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
    --deb) DEB=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    *) echo "check-install.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
DEB=${DEB:-$(ls packaging/dist/ies-agent_*_amd64.deb 2>/dev/null | sort -V | tail -n 1)}
[ -f "$DEB" ] || { echo "check-install.sh: no package; run packaging/build-deb.sh" >&2; exit 2; }

started=$(date +%s)
REPO=$(pwd)
CACHE=$REPO/packaging/.cache
WORK=$(mktemp -d /var/tmp/ies-check-XXXXXX)
ROOT=$WORK/root
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PASSED=0

step() { printf '\n== %s\n' "$*"; }
ok() { PASSED=$((PASSED + 1)); printf '   ok: %s\n' "$*"; }
fail() { printf '   FAILED: %s\n' "$*" >&2; exit 1; }
# check DESCRIPTION CONDITION: CONDITION (shell text) must hold, else stop here.
check() { if eval "$2"; then ok "$1"; else fail "$1"; fi; }
in_root() {
    chroot "$ROOT" /usr/bin/env -i HOME=/root LANG=C.UTF-8 \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
}
as_agent() { in_root runuser -u ies-agent -- "$@"; }
owner_mode() { in_root stat -c '%U %a' "$1"; }  # a path inside the root
installed_version() { in_root dpkg-query -W -f='${Version}' ies-agent; }
below_3() { awk -v e="$1" 'BEGIN { exit !(e < 3.0) }'; }

cleanup() {
    in_root /usr/local/sbin/systemctl stop ies-agent.service >/dev/null 2>&1 || true
    for mount in dev/pts dev proc; do
        umount "$ROOT/$mount" 2>/dev/null || true
    done
    if [ "$KEEP" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# --- a fresh Debian 12 root -----------------------------------------------------------
step "Debian 12 root (debootstrap minbase + systemd, cached)"
mkdir -p "$CACHE"
tarball=$CACHE/debootstrap-bookworm-amd64.tar
if [ ! -f "$tarball" ]; then
    debootstrap --variant=minbase --include=systemd,ca-certificates \
        --make-tarball="$tarball" bookworm "$WORK/tarball-tmp" "$MIRROR" >/dev/null
    rm -rf "$WORK/tarball-tmp"
fi
debootstrap --variant=minbase --include=systemd,ca-certificates \
    --unpack-tarball="$tarball" bookworm "$ROOT" "$MIRROR" >/dev/null
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
mount -t proc proc "$ROOT/proc"
mount --bind /dev "$ROOT/dev"
mount --bind /dev/pts "$ROOT/dev/pts"
ok "root at $ROOT: $(in_root cat /etc/debian_version)"

# --- install with the pi-gen stage's scripts ------------------------------------------
step "install through the pi-gen stage (prerun.sh, 00-run.sh, 01-run-chroot.sh)"
files=$WORK/pi-gen-files
mkdir -p "$files"
cp "$DEB" "$files/"
stage=$REPO/packaging/pi-gen/stage-ies-agent
# shellcheck disable=SC2120  # pi-gen's on_chroot takes arguments too; ours reads stdin
on_chroot() { chroot "$ROOT" /usr/bin/env -i HOME=/root LANG=C.UTF-8 \
    PATH=/usr/sbin:/usr/bin:/sbin:/bin bash -e "$@"; }
copy_previous() { fail "prerun.sh asked for copy_previous although the root exists"; }
export -f on_chroot copy_previous fail
export ROOT
(cd "$stage" && ROOTFS_DIR=$ROOT bash -e ./prerun.sh)
(cd "$stage/00-ies-agent" && ROOTFS_DIR=$ROOT IES_AGENT_FILES=$files IES_AGENT_ARCH=amd64 \
    bash -e ./00-run.sh)
in_root apt-get update -qq >/dev/null
on_chroot <"$stage/00-ies-agent/01-run-chroot.sh" >"$WORK/apt.log" 2>&1 ||
    { tail -20 "$WORK/apt.log"; fail "01-run-chroot.sh"; }
version=$(installed_version)
ok "ies-agent $version installed with apt (dependencies from the mirror)"
check "user ies-agent in group dialout" \
    'in_root id -nG ies-agent | grep -qw dialout'
check "/var/lib/ies-agent owned by ies-agent, mode 750" \
    '[ "$(owner_mode "/var/lib/ies-agent")" = "ies-agent 750" ]'
check "ies-agent.service enabled" \
    '[ -L "$ROOT/etc/systemd/system/multi-user.target.wants/ies-agent.service" ]'
check "package kept as the rollback base" \
    '[ -f "$ROOT/var/lib/ies-agent/updates/packages/$(basename "$DEB")" ]'
check "ies-agent on PATH: $(in_root ies-agent --version)" \
    'in_root ies-agent --version | grep -q .'

# --- the installed copy works -------------------------------------------------------------
step "config check, demo, verify from the installed copy"
check "ies-agent config check (shipped example)" \
    'in_root ies-agent config check /usr/share/doc/ies-agent/examples/site.toml >/dev/null'
in_root install -d -o ies-agent -g ies-agent /tmp/demo
as_agent ies-agent demo --data-dir /tmp/demo --for 10 >"$WORK/demo.log" 2>&1 ||
    { tail -20 "$WORK/demo.log"; fail "demo"; }
ok "ies-agent demo --for 10, as user ies-agent"
as_agent ies-agent verify /tmp/demo >"$WORK/verify.log" 2>&1 ||
    { cat "$WORK/verify.log"; fail "verify"; }
ok "ies-agent verify: $(tail -n 1 "$WORK/verify.log" | cut -c1-90)"
cat >"$ROOT/tmp/mdwe.py" <<'EOF'
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit("PR_SET_MDWE refused: " + os.strerror(ctypes.get_errno()))
os.execv(sys.argv[1], sys.argv[1:])
EOF
in_root install -d -o ies-agent -g ies-agent /tmp/demo-mdwe
as_agent /usr/lib/ies-agent/bin/python3 /tmp/mdwe.py /usr/bin/ies-agent demo \
    --data-dir /tmp/demo-mdwe --for 5 >"$WORK/mdwe.log" 2>&1 ||
    { tail -20 "$WORK/mdwe.log"; fail "demo under MemoryDenyWriteExecute"; }
check "demo under PR_SET_MDWE (MemoryDenyWriteExecute=yes)" \
    'as_agent ies-agent verify /tmp/demo-mdwe >/dev/null'

# --- unit files ---------------------------------------------------------------------------
step "unit files as installed"
# --man=no: the host's man(1) cannot see the root's pages; checked separately.
systemd-analyze verify --man=no --root="$ROOT" ies-agent.service ies-agent-firstboot.service \
    >"$WORK/units.log" 2>&1 || { cat "$WORK/units.log"; fail "systemd-analyze verify"; }
check "systemd-analyze verify: no complaints; man page installed" \
    '[ ! -s "$WORK/units.log" ] && [ -f "$ROOT/usr/share/man/man1/ies-agent.1.gz" ]'
exposure=$(systemd-analyze security --offline=true --root="$ROOT" ies-agent.service 2>&1 |
    sed -n 's/.*Overall exposure level for ies-agent.service: \([0-9.]*\).*/\1/p')
check "exposure of ies-agent.service: $exposure" \
    'below_3 "$exposure"'

# --- first boot ---------------------------------------------------------------------------
step "first boot: a broken site file, then a good one"
boot=$ROOT/boot/firmware
mkdir -p "$boot"
cat >"$boot/ies-agent.toml" <<'EOF'
[gateway]
id = "gw-check-0001"
interval = "7m"
EOF
if in_root ies-agent firstboot >"$WORK/firstboot-bad.log" 2>&1; then
    fail "a broken file was imported"
fi
check "ies-agent-error.txt names line 3: $(grep -m1 ':3:' "$boot/ies-agent-error.txt" | cut -c1-70)" \
    'grep -q "ies-agent.toml:3: gateway.interval" "$boot/ies-agent-error.txt"'
check "nothing imported, the file stays for the installer" \
    '[ ! -e "$ROOT/etc/ies-agent/ies-agent.toml" ] && [ -f "$boot/ies-agent.toml" ]'
cat >"$boot/ies-agent.toml" <<'EOF'
[gateway]
id = "gw-check-0001"
interval = "15m"

[[buses]]
id = "lan"
kind = "tcp"
host = "127.0.0.1"
port = 1                       # nothing listens: reads fail fast, loops still beat

[[devices]]
id = "grid-meter"
bus = "lan"
unit = 1
template = "eastron-sdm630"
poll_s = 2

[secrets]
broker = "not-a-real-password"
EOF
in_root ies-agent firstboot >"$WORK/firstboot.log" 2>&1 || { cat "$WORK/firstboot.log"; fail "firstboot"; }
check "imported; key card on the boot partition" \
    '[ -f "$boot/ies-agent-key-card.json" ] && [ ! -e "$boot/ies-agent.toml" ] && [ ! -e "$boot/ies-agent-error.txt" ]'
check "secret split out: /etc/ies-agent/secrets/broker, ies-agent 600" \
    '[ "$(owner_mode "/etc/ies-agent/secrets/broker")" = "ies-agent 600" ]'
check "gateway key owned by ies-agent, mode 600" \
    '[ "$(owner_mode "/var/lib/ies-agent/keys/log-key.pem")" = "ies-agent 600" ]'
fingerprint=$(sed -n 's/.*"fingerprint": "\([0-9a-f]*\)".*/\1/p' "$boot/ies-agent-key-card.json")

# --- the agent runs; self-update ----------------------------------------------------------
step "the agent as a service; signed self-update with rollback"
cat >"$ROOT/usr/local/sbin/systemctl" <<'EOF'
#!/bin/sh
# Stand-in for systemctl in a chroot: runs the agent the way its unit does.
pidfile=/run/ies-agent-check.pid
case "$1" in
stop)
    if [ -f "$pidfile" ]; then
        pid=$(cat "$pidfile")
        kill -TERM "$pid" 2>/dev/null || true
        i=0
        while kill -0 "$pid" 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
        rm -f "$pidfile"
    fi
    ;;
start)
    install -d -o ies-agent -g ies-agent -m 0750 /run/ies-agent
    runuser -u ies-agent -- env RUNTIME_DIRECTORY=/run/ies-agent WATCHDOG_USEC=2000000 \
        ies-agent run --config /etc/ies-agent/ies-agent.toml >>/var/log/ies-agent-check.log 2>&1 &
    echo $! >"$pidfile"
    ;;
*) exit 0 ;;
esac
EOF
chmod 755 "$ROOT/usr/local/sbin/systemctl"
in_root systemctl start ies-agent.service
for _ in $(seq 1 50); do [ -f "$ROOT/run/ies-agent/health.json" ] && break; sleep 0.2; done
check "agent running, health: $(cat "$ROOT/run/ies-agent/health.json")" \
    '[ -f "$ROOT/run/ies-agent/health.json" ]'
# shellcheck disable=SC2034  # before and after are compared inside check's eval
before=$(cd "$ROOT" && sha256sum etc/ies-agent/ies-agent.toml etc/ies-agent/secrets/broker \
    var/lib/ies-agent/keys/log-key.pem)

# A publisher key, trusted by the gateway; versions 2 (good) and 3 (does not start).
pkgs=$WORK/pkgs
mkdir -p "$pkgs" "$ROOT/tmp/usb"
in_root /usr/lib/ies-agent/bin/python3 -c '
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
key = ed25519.Ed25519PrivateKey.generate()
open("/tmp/publisher.pem", "wb").write(key.private_bytes(serialization.Encoding.PEM,
    serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
open("/etc/ies-agent/trust/publisher.pem", "wb").write(key.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))'
repack() {  # repack VERSION [broken]
    local tree=$pkgs/tree-$1
    dpkg-deb -R "$DEB" "$tree"
    sed -i "s/^Version: .*/Version: $1/" "$tree/DEBIAN/control"
    if [ "${2:-}" = broken ]; then
        printf '#!/bin/sh\necho "this build is broken" >&2\nexit 1\n' >"$tree/usr/bin/ies-agent"
    fi
    dpkg-deb --root-owner-group -b "$tree" "$ROOT/tmp/usb/ies-agent_$1_amd64.deb" >/dev/null
    in_root ies-agent update sign --key /tmp/publisher.pem \
        -o "/tmp/usb/ies-agent-$1.json" "/tmp/usb/ies-agent_$1_amd64.deb" >/dev/null
}
repack 0.1.0-2
repack 0.1.0-3 broken

in_root ies-agent update apply /tmp/usb/ies-agent-0.1.0-2.json --timeout 60 \
    >"$WORK/update-2.log" 2>&1 || { cat "$WORK/update-2.log"; fail "update to 0.1.0-2"; }
check "update to 0.1.0-2: $(grep -m1 "update apply:" "$WORK/update-2.log" | cut -c25-100)" \
    '[ "$(installed_version)" = 0.1.0-2 ]'

cp "$ROOT/tmp/usb/ies-agent_0.1.0-3_amd64.deb" "$ROOT/tmp/usb/good.deb"
printf 'X' | dd of="$ROOT/tmp/usb/ies-agent_0.1.0-3_amd64.deb" bs=1 seek=2000 conv=notrunc 2>/dev/null
if in_root ies-agent update apply /tmp/usb/ies-agent-0.1.0-3.json >"$WORK/update-tampered.log" 2>&1; then
    fail "a tampered package was installed"
fi
check "tampered package rejected, 0.1.0-2 still installed" \
    'grep -q "SHA-256" "$WORK/update-tampered.log" && [ "$(installed_version)" = 0.1.0-2 ]'
mv "$ROOT/tmp/usb/good.deb" "$ROOT/tmp/usb/ies-agent_0.1.0-3_amd64.deb"

if in_root ies-agent update apply /tmp/usb/ies-agent-0.1.0-3.json --timeout 15 \
    >"$WORK/update-3.log" 2>&1; then
    fail "a version that does not start was kept"
fi
check "0.1.0-3 did not report healthy: rolled back to 0.1.0-2" \
    'grep -q "rolled-back" "$WORK/update-3.log" && [ "$(installed_version)" = 0.1.0-2 ]'
for _ in $(seq 1 50); do [ -f "$ROOT/run/ies-agent/health.json" ] && break; sleep 0.2; done
sleep 6  # the agent's journal drain runs every 5 s
in_root systemctl stop ies-agent.service
in_root ies-agent update record >/dev/null 2>&1 || true
steps=$(grep -o '"ev":"update"[^}]*"step":"[a-z_]*"' "$ROOT/var/lib/ies-agent/evidence.jsonl" |
    sed 's/.*"step":"\([a-z_]*\)"/\1/' | tr '\n' ' ')
echo "   update steps in the evidence log: $steps"
case "$steps" in
*verified*installed*healthy*rejected*verified*unhealthy*rolling_back*rolled_back*rollback_healthy*)
    ok "every update step recorded" ;;
*) fail "update steps missing from the evidence log" ;;
esac
# Pinned to the key card first boot wrote for the utility.
in_root ies-agent verify /var/lib/ies-agent --key /boot/firmware/ies-agent-key-card.json \
    >"$WORK/verify-gw.log" 2>&1 || { cat "$WORK/verify-gw.log"; fail "verify the gateway's log"; }
ok "gateway log verifies against the boot partition's key card: $(tail -n 1 "$WORK/verify-gw.log" | cut -c1-60)"
# shellcheck disable=SC2034
after=$(cd "$ROOT" && sha256sum etc/ies-agent/ies-agent.toml etc/ies-agent/secrets/broker \
    var/lib/ies-agent/keys/log-key.pem)
check "upgrades and rollback kept config, secret and key unchanged" \
    '[ "$before" = "$after" ]'

# --- remove and purge ---------------------------------------------------------------------
step "apt remove keeps the data, apt purge deletes it after saying so"
in_root apt-get remove -y ies-agent >"$WORK/remove.log" 2>&1 || { cat "$WORK/remove.log"; fail "remove"; }
check "removed: program gone; config, evidence log and key kept" \
    '[ -f "$ROOT/etc/ies-agent/ies-agent.toml" ] && [ -f "$ROOT/var/lib/ies-agent/evidence.jsonl" ] && [ -f "$ROOT/var/lib/ies-agent/keys/log-key.pem" ] && [ ! -e "$ROOT/usr/lib/ies-agent" ]'
in_root apt-get purge -y ies-agent >"$WORK/purge.log" 2>&1 || { cat "$WORK/purge.log"; fail "purge"; }
check "purged after saying so (and naming key ${fingerprint:0:16}… to retire)" \
    'grep -q "purging. Deleting /etc/ies-agent" "$WORK/purge.log" && grep -q "retire key $fingerprint" "$WORK/purge.log" && [ ! -e "$ROOT/etc/ies-agent" ] && [ ! -e "$ROOT/var/lib/ies-agent" ]'

printf '\ncheck-install.sh: %d checks passed in %d s (%s)\n' "$PASSED" \
    "$(( $(date +%s) - started ))" "$(basename "$DEB")"
