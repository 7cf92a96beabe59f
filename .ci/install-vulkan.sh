#!/usr/bin/env bash
# Installs Mesa's software Vulkan driver (lavapipe, adapter "llvmpipe") from
# bookworm-backports (Mesa 25, Vulkan 1.4), closer to wgpu's own CI than
# bookworm's Mesa 22.3. Idempotent: does nothing when the ICD is present.
set -euo pipefail
if ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
  echo "install-vulkan: lavapipe already installed"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if [ -r /etc/os-release ] && grep -q 'VERSION_CODENAME=bookworm' /etc/os-release; then
  if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
    cat > /etc/apt/sources.list.d/bookworm-backports.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
  apt-get update -qq
  apt-get install -y -qq -t bookworm-backports mesa-vulkan-drivers libvulkan1 >/dev/null
else
  apt-get update -qq
  apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
fi
dpkg-query -W -f='install-vulkan: ${Package} ${Version}\n' mesa-vulkan-drivers
