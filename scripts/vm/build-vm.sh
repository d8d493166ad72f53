#!/usr/bin/env bash
# Build a tiny, reproducible VM from Debian's installed packages only (no network):
#   OUTDIR/vmlinuz            the kernel, copied from /boot/vmlinuz-<version> (linux-image-amd64)
#   OUTDIR/initramfs.cpio.gz  static busybox + the virtio/ext4 modules of that same kernel; its
#                             /init loads them, waits for the root disk, mounts it, switch_roots
#   OUTDIR/root.img           ext4 root filesystem made with mkfs.ext4 -d from OUTDIR/rootfs/:
#                             busybox, data files, and an /init that prints SPILLWAY-VM-READY,
#                             checksums the files, optionally writes /data.txt (spw.write=TEXT),
#                             prints SPILLWAY-VM-DONE and powers off
#   OUTDIR/rootfs/            the source directory of root.img (tests hash files from here)
# With --guest (use its own OUTDIR) the same kernel and initramfs code builds the long-running
# sample guest instead: the initramfs also loads cdrom/isofs and virtio_net (with failover), and
# root.img's /init reads a cloud-init NoCloud config drive (label cidata), prints
# SPILLWAY-GUEST <identity> and SPILLWAY-GUEST-READY, and serves a shell on the serial console
# forever. Without --guest the outputs are byte for byte what they were before --guest existed.
# Outputs are rebuilt only when missing, older than this script, or built with other options.
# See docs/vm-images.md.
set -euo pipefail

usage() {
  cat >&2 <<USAGE
usage: $0 OUTDIR [--guest] [--size 64M] [--kernel VERSION] [--force]
  --guest    build the long-running sample guest (config drive, console shell) instead of the
             check-and-power-off VM; give it its own OUTDIR
  --size     size of root.img as understood by mkfs.ext4 (default 64M)
  --kernel   kernel version under /boot and /lib/modules (default: the newest installed)
  --force    rebuild even if the outputs are up to date
USAGE
  exit 2
}

die() {
  echo "build-vm: error: $*" >&2
  exit 1
}

OUTDIR=""
SIZE="64M"
KVER=""
FORCE=0
GUEST=0
while [ $# -gt 0 ]; do
  case "$1" in
    --size) [ $# -ge 2 ] || usage; SIZE="$2"; shift 2 ;;
    --size=*) SIZE="${1#--size=}"; shift ;;
    --kernel) [ $# -ge 2 ] || usage; KVER="$2"; shift 2 ;;
    --kernel=*) KVER="${1#--kernel=}"; shift ;;
    --force) FORCE=1; shift ;;
    --guest) GUEST=1; shift ;;
    -h|--help) usage ;;
    -*) echo "build-vm: unknown option $1" >&2; usage ;;
    *) [ -z "$OUTDIR" ] || usage; OUTDIR="$1"; shift ;;
  esac
done
[ -n "$OUTDIR" ] || usage
[[ "$SIZE" =~ ^[0-9]+[KMG]?$ ]] || die "--size must look like 64M (got '$SIZE')"

# Modules the initramfs loads, in this order (dependencies first). Built-in ones are skipped.
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk
  crc32c_generic crc16 mbcache jbd2 ext4)
# The guest also reads an ISO 9660 config drive (isofs needs cdrom) and has a virtio NIC.
if [ "$GUEST" = 1 ]; then
  MODULES+=(cdrom isofs failover net_failover virtio_net)
fi
# Every timestamp inside the images, so that two builds are byte-for-byte identical.
EPOCH="${SOURCE_DATE_EPOCH:-1704067200}"
# Fixed filesystem UUID and directory hash seed, for the same reason.
FS_UUID="5b111a7e-0000-4000-8000-00000000f00d"
ROOT_LABEL="spillway-root"
if [ "$GUEST" = 1 ]; then
  FS_UUID="5b111a7e-0000-4000-8000-00000000f00e"
  ROOT_LABEL="spillway-guest"
fi

export PATH="$PATH:/usr/sbin:/sbin"
export LC_ALL=C

# need COMMAND APT-PACKAGE: fail with the package to install when COMMAND is missing.
need() {
  command -v "$1" >/dev/null 2>&1 ||
    die "'$1' not found; install it with: apt-get install -y --no-install-recommends $2"
}
need busybox busybox-static
need mkfs.ext4 e2fsprogs
need debugfs e2fsprogs
need cpio cpio
need gzip gzip
need flock util-linux

BUSYBOX="$(command -v busybox)"
# A dynamically linked busybox (Debian's "busybox" package) cannot run without its libraries.
if [[ "$(ldd "$BUSYBOX" 2>&1 || true)" != *"not a dynamic executable"* ]]; then
  die "$BUSYBOX is dynamically linked; install the static one: apt-get install -y --no-install-recommends busybox-static"
fi

if [ -z "$KVER" ]; then
  KVER="$(for k in /boot/vmlinuz-*; do
    v="${k#/boot/vmlinuz-}"
    if [ -e "$k" ] && [ -d "/lib/modules/$v" ]; then echo "$v"; fi
  done | sort -V | tail -n 1)"
  [ -n "$KVER" ] || die "no kernel with modules in /boot and /lib/modules; install it with: apt-get install -y --no-install-recommends linux-image-amd64"
fi
[ -r "/boot/vmlinuz-$KVER" ] || die "/boot/vmlinuz-$KVER is missing or unreadable; install it with: apt-get install -y --no-install-recommends linux-image-amd64"
MODDIR="/lib/modules/$KVER"
[ -d "$MODDIR" ] || die "$MODDIR is missing; install it with: apt-get install -y --no-install-recommends linux-image-amd64"

SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
OUTPUTS=("$OUTDIR/vmlinuz" "$OUTDIR/initramfs.cpio.gz" "$OUTDIR/root.img")
PARAMS="kernel=$KVER size=$SIZE epoch=$EPOCH busybox=$(md5sum < "$BUSYBOX" | cut -d' ' -f1)"
[ "$GUEST" = 0 ] || PARAMS="$PARAMS mode=guest"

# One build at a time per OUTDIR (test files run in parallel processes).
exec 9> "$OUTDIR/.build.lock"
flock 9

up_to_date() {
  local f
  [ "$FORCE" = 0 ] || return 1
  [ -f "$OUTDIR/.build-params" ] || return 1
  [ "$(cat "$OUTDIR/.build-params")" = "$PARAMS" ] || return 1
  [ -f "$OUTDIR/rootfs/init" ] || return 1
  for f in "${OUTPUTS[@]}"; do
    [ -f "$f" ] || return 1
    [ "$f" -nt "$SCRIPT" ] || return 1
  done
}

report() {
  local f
  echo "build-vm: $1 in $OUTDIR (kernel $KVER, root.img $SIZE):"
  for f in "${OUTPUTS[@]}"; do
    printf '  %-20s %10s bytes  md5 %s\n' "${f##*/}" "$(stat -c %s "$f")" "$(md5sum < "$f" | cut -d' ' -f1)"
  done
  echo "  rootfs/              source of root.img ($(find "$OUTDIR/rootfs" -type f | wc -l) files)"
}

if up_to_date; then
  report "up to date"
  exit 0
fi

STAGE="$(mktemp -d "$OUTDIR/.stage.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT

# Install static busybox into DIR/bin with one symlink per applet (sorted, for reproducibility).
install_busybox() {
  local dir="$1" applet
  mkdir -p "$dir/bin"
  cp "$BUSYBOX" "$dir/bin/busybox"
  chmod 0755 "$dir/bin/busybox"
  for applet in $("$BUSYBOX" --list | sort); do
    [ "$applet" = busybox ] || ln -sf busybox "$dir/bin/$applet"
  done
}

# Set every timestamp under DIR to EPOCH (symlinks themselves included).
clamp_times() {
  find "$1" -exec touch -h -d "@$EPOCH" {} +
}

# ---------------------------------------------------------------------------------------------
# initramfs
INITRD_DIR="$STAGE/initramfs"
install_busybox "$INITRD_DIR"
mkdir -p "$INITRD_DIR"/{dev,proc,sys,newroot,etc,lib/modules}
: > "$INITRD_DIR/etc/modules.order"
for m in "${MODULES[@]}"; do
  src="$(find "$MODDIR/kernel" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" | sort | head -n 1)"
  if [ -z "$src" ]; then
    if grep -q "/$m\.ko\$" "$MODDIR/modules.builtin" 2>/dev/null; then
      echo "build-vm: $m is built into $KVER, not loading it"
      continue
    fi
    die "module $m not found in $MODDIR (neither a file nor built in); reinstall linux-image-$KVER"
  fi
  dst="$INITRD_DIR/lib/modules/$m.ko"
  case "$src" in
    *.ko) cp "$src" "$dst" ;;
    *.ko.xz) need xz xz-utils; xz -dc "$src" > "$dst" ;;
    *.ko.zst) need zstd zstd; zstd -qdc "$src" > "$dst" ;;
    *.ko.gz) gzip -dc "$src" > "$dst" ;;
  esac
  echo "$m" >> "$INITRD_DIR/etc/modules.order"
done

cat > "$INITRD_DIR/init" <<'INIT'
#!/bin/sh
# Spillway tiny VM, initramfs stage: load virtio + ext4, mount the root disk, switch_root to it.
export PATH=/bin
fail() {
  echo "SPILLWAY-VM-FAIL: initramfs: $*"
  sleep 1
  poweroff -f
}
mount -t devtmpfs devtmpfs /dev || fail "cannot mount devtmpfs"
mount -t proc proc /proc || fail "cannot mount /proc"
mount -t sysfs sysfs /sys || fail "cannot mount /sys"
while read -r m; do
  insmod "/lib/modules/$m.ko" || fail "insmod $m failed"
done < /etc/modules.order
root=/dev/vda
init=/init
mode=rw
set -f
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    root=/dev/*) root="${arg#root=}" ;;
    init=*) init="${arg#init=}" ;;
    ro) mode=ro ;;
    rw) mode=rw ;;
  esac
done
set +f
i=0
while [ ! -b "$root" ]; do
  i=$((i + 1))
  [ "$i" -le 600 ] || fail "$root did not appear within 60 s"
  sleep 0.1
done
mount -t ext4 -o "$mode" "$root" /newroot || fail "cannot mount $root"
[ -x "/newroot$init" ] || fail "$init is not an executable on $root"
umount /sys /proc
umount /dev
exec switch_root /newroot "$init"
INIT
chmod 0755 "$INITRD_DIR/init"
clamp_times "$INITRD_DIR"
(cd "$INITRD_DIR" && find . | sort | cpio --quiet -o -H newc -R 0:0 --reproducible) |
  gzip -n -9 > "$STAGE/initramfs.cpio.gz"

# ---------------------------------------------------------------------------------------------
# root filesystem
ROOT_DIR="$STAGE/rootfs"
install_busybox "$ROOT_DIR"

# The check-and-power-off VM (the default): data files the guest reads in full, their list,
# an /init that runs /etc/spillway/run.sh and powers off.
check_vm_rootfs() {
  mkdir -p "$ROOT_DIR"/{dev,proc,sys,tmp,etc/spillway,data}
  # Data the guest reads in full: text, dense high-entropy bytes, and a sparse file with data
  # between holes. All deterministic.
  seq 1 400000 > "$ROOT_DIR/data/numbers.txt"
  seq 1 1000000 | gzip -n -9 > "$ROOT_DIR/data/dense.bin"
  truncate -s 8M "$ROOT_DIR/data/sparse.bin"
  for off in 0 3 5 7; do
    head -c 262144 "$ROOT_DIR/data/dense.bin" |
      dd of="$ROOT_DIR/data/sparse.bin" bs=1M seek="$off" conv=notrunc status=none
  done
  # Files the guest checksums, one path per line.
  {
    echo /bin/busybox
    (cd "$ROOT_DIR" && find data -type f | sort | sed 's|^|/|')
  } > "$ROOT_DIR/etc/spillway/checksum.list"

  cat > "$ROOT_DIR/init" <<'INIT'
#!/bin/sh
# Spillway tiny VM, root filesystem stage (PID 1): report, run the check script, power off.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
# From here on only emergencies (panics) reach the console, so that no kernel message can land in
# the middle of a marker line; on failure the kernel log is printed instead.
dmesg -n 1
echo "SPILLWAY-VM-READY $(uname -r)"
if /etc/spillway/run.sh; then
  echo "SPILLWAY-VM-DONE"
else
  status=$?
  dmesg | tail -n 40
  echo "SPILLWAY-VM-FAIL: run.sh exited $status"
fi
poweroff -f
INIT

  cat > "$ROOT_DIR/etc/spillway/run.sh" <<'RUN'
#!/bin/sh
# Read every file of /etc/spillway/checksum.list in full and print its md5; write /data.txt when
# the kernel command line has spw.write=TEXT; leave the filesystem clean (remounted read-only).
set -e
if [ -f /data.txt ]; then
  echo "SPILLWAY-VM-DATA $(cat /data.txt)"
fi
while read -r f; do
  sum="$(md5sum "$f")" || { echo "spillway: cannot read $f"; exit 1; }
  echo "SPILLWAY-VM-MD5 $sum"
done < /etc/spillway/checksum.list
text=""
set -f
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    spw.write=*) text="${arg#spw.write=}" ;;
  esac
done
set +f
if [ -n "$text" ]; then
  printf '%s\n' "$text" > /data.txt
  sync
  echo "SPILLWAY-VM-WROTE /data.txt"
fi
# Remounting read-only flushes the ext4 journal, so the image is clean for debugfs/e2fsck.
mount -o remount,ro /
sync
RUN
  chmod 0755 "$ROOT_DIR/init" "$ROOT_DIR/etc/spillway/run.sh"
}

# The long-running sample guest (--guest): identity from a NoCloud config drive, a counter, and a
# shell on the serial console forever. A fixed machine id and host name when there is no drive.
guest_rootfs() {
  mkdir -p "$ROOT_DIR"/{dev,proc,sys,tmp,run,etc,data}
  chmod 1777 "$ROOT_DIR/tmp" "$ROOT_DIR/data"
  echo spillway-guest > "$ROOT_DIR/etc/hostname"
  # What `spillway analyze` and the management service's analyse step report as the OS.
  printf 'PRETTY_NAME="Spillway sample guest (busybox)"\nNAME="Spillway sample guest"\nID=spillway-guest\nVERSION_ID=1\n' > "$ROOT_DIR/etc/os-release"
  printf '%s' spillway-guest | md5sum | cut -d' ' -f1 > "$ROOT_DIR/etc/machine-id"

  cat > "$ROOT_DIR/init" <<'INIT'
#!/bin/sh
# Spillway long-running sample guest (PID 1): identity from a cloud-init NoCloud config drive
# (an ISO 9660 disk labelled cidata) when one is attached, a counter in /run/counter, then a shell
# on the serial console, respawned forever. It never powers off by itself. See docs/vm-images.md.
export PATH=/bin HOME=/
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -o remount,rw /
mount -t tmpfs -o mode=0755 tmpfs /run
# Only emergencies (panics) reach the console, so that no kernel message can split a marker line
# or the output of a command typed on the console.
dmesg -n 1

hostname="$(cat /etc/hostname)"
machine_id="$(cat /etc/machine-id)"
user_data=""

# meta KEY: the value of the first "KEY: value" line of the drive's meta-data, unquoted.
meta() {
  sed -n "s/^$1:[[:space:]]*//p" /run/cidata/meta-data | head -n 1 | tr -d '\r' |
    sed -e 's/[[:space:]]*$//' -e 's/^"\(.*\)"$/\1/' -e "s/^'\(.*\)'\$/\1/"
}

# The config drive: busybox findfs, else any disk holding an ISO 9660 volume labelled cidata.
cidata="$(findfs LABEL=cidata 2>/dev/null)" || cidata=""
if [ -z "$cidata" ]; then
  for d in /sys/block/*; do
    d="/dev/${d##*/}"
    [ "$(dd if="$d" bs=1 skip=32769 count=5 2>/dev/null)" = CD001 ] || continue
    case "$(dd if="$d" bs=1 skip=32808 count=32 2>/dev/null | tr -d ' ')" in
      cidata|CIDATA) cidata="$d"; break ;;
    esac
  done
fi
if [ -n "$cidata" ] && mkdir -p /run/cidata && mount -t iso9660 -o ro "$cidata" /run/cidata; then
  if [ -f /run/cidata/meta-data ]; then
    v="$(meta instance-id)"
    if [ -n "$v" ]; then
      # A machine id is 32 lowercase hex digits: an instance-id of that form is used as it is,
      # any other is hashed (md5 of the instance-id, no newline).
      if printf '%s\n' "$v" | grep -qxE '[0-9a-f]{32}'; then
        machine_id="$v"
      else
        machine_id="$(printf '%s' "$v" | md5sum | cut -d' ' -f1)"
      fi
    fi
    v="$(meta local-hostname)"
    [ -z "$v" ] || hostname="$v"
  fi
  if [ "$(head -c 2 /run/cidata/user-data 2>/dev/null)" = '#!' ]; then
    user_data=/run/user-data
    cp /run/cidata/user-data "$user_data" && chmod 0755 "$user_data" || user_data=""
  fi
fi
printf '%s\n' "$machine_id" > /run/machine-id
mount -o bind /run/machine-id /etc/machine-id
hostname "$hostname"

ip link set lo up
mac=none
if [ -e /sys/class/net/eth0 ]; then
  ip link set eth0 up
  mac="$(cat /sys/class/net/eth0/address)"
fi
if [ -n "$user_data" ]; then
  setsid "$user_data" < /dev/null > /run/user-data.log 2>&1 &
fi
echo "SPILLWAY-GUEST hostname=$hostname machine-id=$machine_id mac=$mac boot-id=$(cat /proc/sys/kernel/random/boot_id)"
(
  i=0
  while :; do i=$((i + 1)); echo $i > /run/counter; sleep 1; done
) < /dev/null > /dev/null 2>&1 &
echo "SPILLWAY-GUEST-READY"
export PS1='\h# '
while :; do
  setsid cttyhack sh
  sleep 1
done
INIT
  chmod 0755 "$ROOT_DIR/init"
}

if [ "$GUEST" = 1 ]; then
  guest_rootfs
else
  check_vm_rootfs
fi
clamp_times "$ROOT_DIR"

E2FSPROGS_FAKE_TIME="$EPOCH" mkfs.ext4 -q -F -L "$ROOT_LABEL" -U "$FS_UUID" \
  -E "hash_seed=$FS_UUID,root_owner=0:0" -d "$ROOT_DIR" "$STAGE/root.img" "$SIZE" > /dev/null ||
  die "mkfs.ext4 failed (is --size $SIZE big enough for $(du -sh "$ROOT_DIR" | cut -f1)?)"
# mkfs.ext4 -d copies each file's ctime, which touch cannot set: pin it with debugfs.
(cd "$ROOT_DIR" && find . | sort | while read -r p; do
  p="${p#.}"
  echo "sif \"${p:-/}\" ctime @$EPOCH"
done) > "$STAGE/ctimes.debugfs"
E2FSPROGS_FAKE_TIME="$EPOCH" debugfs -w -f "$STAGE/ctimes.debugfs" "$STAGE/root.img" > /dev/null 2> "$STAGE/debugfs.log" ||
  die "debugfs failed: $(cat "$STAGE/debugfs.log")"

cp "/boot/vmlinuz-$KVER" "$STAGE/vmlinuz"

# ---------------------------------------------------------------------------------------------
# Move into place (same filesystem: each rename is atomic), the parameters stamp last.
rm -f "$OUTDIR/.build-params"
rm -rf "$OUTDIR/rootfs"
mv "$ROOT_DIR" "$OUTDIR/rootfs"
for f in vmlinuz initramfs.cpio.gz root.img; do
  mv -f "$STAGE/$f" "$OUTDIR/$f"
done
echo "$PARAMS" > "$OUTDIR/.build-params"
report "built"
