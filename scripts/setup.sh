#!/usr/bin/env bash
# Installs what Spillway needs on a Debian machine, idempotently: the apt packages used by the
# build, the tests, the demo and the benchmarks, then the npm dependencies, then the build.
# Re-running it installs nothing new and rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  # build of the native addon
  g++ make python3
  # real NBD peers: servers and clients nobody here wrote
  qemu-utils nbdkit libnbd-bin python3-libnbd nbd-server fio
  # VMs under TCG: kernel, tiny root filesystems, initramfs tools
  qemu-system-x86 linux-image-amd64 busybox-static e2fsprogs cpio kmod zstd xz-utils
  # PKI for TLS tests, socket activation
  openssl systemd curl
  # partition tables for the partition-table reader's tests (sfdisk, fdisk; sgdisk)
  fdisk gdisk
  # the management service: PostgreSQL for the shared control plane (its tests start one),
  # cloud-init NoCloud config drives (ISO 9660, volume label cidata)
  postgresql genisoimage
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing apt packages: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q -o DPkg::Lock::Timeout=600
  $SUDO apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=600 "${missing[@]}"
else
  echo "setup: apt packages present"
fi

# npm ci only when the lock file changed since the last install.
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "setup: npm ci"
  # Native modules (better-sqlite3) build from source against the installed Node's headers:
  # nothing is downloaded at install time, neither prebuilt binaries nor headers.
  d="$(dirname "$(dirname "$(command -v node)")")"
  [ -f "$d/include/node/node_api.h" ] && export npm_config_nodedir="$d"
  npm_config_build_from_source=true npm ci --no-fund --no-audit
else
  echo "setup: node_modules up to date"
fi
