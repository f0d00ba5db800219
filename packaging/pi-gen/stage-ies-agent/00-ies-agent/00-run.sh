#!/bin/bash -e
# pi-gen, on the build host: copy the ies-agent package into the image, and optionally
# a site file for the boot partition and trusted publisher keys.
#
# Files come from files/ beside this script (or $IES_AGENT_FILES):
#   ies-agent_<version>_arm64.deb   required: packaging/build-deb.sh --arch arm64
#   ies-agent.toml                  optional: a site file imported at first boot
#   trust/*.pem                     optional: publishers whose updates are accepted
files=${IES_AGENT_FILES:-files}
arch=${IES_AGENT_ARCH:-arm64}

deb=$(find "${files}" -maxdepth 1 -name "ies-agent_*_${arch}.deb" | sort -V | tail -n 1)
if [ -z "${deb}" ]; then
    echo "ies-agent stage: no ies-agent_*_${arch}.deb in ${files};" \
        "build one with packaging/build-deb.sh --arch ${arch}" >&2
    exit 1
fi
install -D -m 0644 "${deb}" "${ROOTFS_DIR}/tmp/ies-agent-image/$(basename "${deb}")"

if [ -f "${files}/ies-agent.toml" ]; then
    install -D -m 0644 "${files}/ies-agent.toml" "${ROOTFS_DIR}/boot/firmware/ies-agent.toml"
fi
for key in "${files}"/trust/*.pem; do
    [ -e "${key}" ] || continue
    install -D -m 0644 "${key}" "${ROOTFS_DIR}/etc/ies-agent/trust/$(basename "${key}")"
done
