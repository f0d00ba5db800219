#!/bin/bash -e
# pi-gen, inside the image: install the package with its dependencies, keep a copy of
# it as the rollback base for the first self-update, enable the units.
deb=$(find /tmp/ies-agent-image -maxdepth 1 -name 'ies-agent_*.deb' | sort -V | tail -n 1)
export DEBIAN_FRONTEND=noninteractive
apt-get install -y --no-install-recommends "${deb}"

# `ies-agent update apply` restores this package if a new version is not healthy.
cache=/var/lib/ies-agent/updates/packages
install -d -m 0750 -o ies-agent -g ies-agent /var/lib/ies-agent/updates "${cache}"
install -m 0644 "${deb}" "${cache}/$(basename "${deb}")"

# postinst enabled them already; say it again in case a policy kept it from it.
systemctl enable ies-agent.service ies-agent-firstboot.service
rm -rf /tmp/ies-agent-image
