#!/usr/bin/env bash
# The main job, as far as it goes today: build a sample disk, serve it with `spillway serve`,
# and show real NBD clients using it (nbdinfo, a map of its allocation, a write and read-back
# with qemu-io, a full copy with nbdcopy checked with cmp), then boot a VM from it.
set -euo pipefail
cd "$(dirname "$0")/.."
SPILLWAY="node dist/cli.js"
WORK=.work/demo
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
PORT=${SPILLWAY_DEMO_PORT:-10899}
URI="nbd://127.0.0.1:$PORT/"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "1. A sample disk: a 256 MiB ext4 filesystem with a few files and free space"
rm -rf "$WORK/tree" "$WORK/disk.img" "$WORK/copy.img"
mkdir -p "$WORK/tree/etc" "$WORK/tree/data"
printf 'PRETTY_NAME="Spillway demo"\nID=spillway\n' > "$WORK/tree/etc/os-release"
head -c 8M /dev/urandom > "$WORK/tree/data/random.bin"
yes 'compressible text line for the demo' | head -c 4M > "$WORK/tree/data/text.txt"
mkfs.ext4 -q -F -d "$WORK/tree" "$WORK/disk.img" 256M
ls -ls "$WORK/disk.img"

say "2. spillway serve $WORK/disk.img on $URI"
$SPILLWAY serve "$WORK/disk.img" --port "$PORT" --bind 127.0.0.1 --pid-file "$WORK/serve.pid" --description "demo disk" 2> "$WORK/serve.log" &
SERVE=$!
trap 'kill $SERVE 2>/dev/null || true; wait $SERVE 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -s "$WORK/serve.pid" ] && break; sleep 0.1; done
[ -s "$WORK/serve.pid" ] || { cat "$WORK/serve.log"; echo "demo: the server did not start" >&2; exit 1; }

say "3. nbdinfo: what a client negotiates"
nbdinfo "$URI"

say "4. nbdinfo --map: allocation seen through NBD block status (base:allocation)"
nbdinfo --map "$URI" | head -12
echo "   ... $(nbdinfo --map "$URI" | wc -l) extents in all"

say "5. qemu-io: write a pattern at 200 MiB, read it back and check it, then write zeroes"
qemu-io -f raw -c 'write -P 0x5a 200M 1M' -c 'read -P 0x5a 200M 1M' -c 'write -z 201M 1M' -c 'read -P 0 201M 1M' "$URI"

say "6. nbdcopy: copy the whole export out with 4 connections and compare with the file"
start=$(date +%s.%N)
nbdcopy --connections=4 "$URI" "$WORK/copy.img"
end=$(date +%s.%N)
cmp "$WORK/disk.img" "$WORK/copy.img" && echo "   copy is byte-identical to the served file ($(awk "BEGIN{printf \"%.2f\", $end-$start}") s)"

if [ "${SPILLWAY_DEMO_VM:-1}" = 1 ] && [ -x scripts/vm/build-vm.sh ]; then
  say "7. A VM boots with its root disk on the export (QEMU, TCG)"
  bash scripts/vm/build-vm.sh .work/vm >/dev/null
  cp .work/vm/root.img "$WORK/root.img"
  kill $SERVE; wait $SERVE 2>/dev/null || true
  $SPILLWAY serve "$WORK/root.img" --port "$PORT" --bind 127.0.0.1 2>> "$WORK/serve.log" &
  SERVE=$!
  for _ in $(seq 100); do nbdinfo "$URI" >/dev/null 2>&1 && break; sleep 0.1; done
  timeout 300 qemu-system-x86_64 -nographic -no-reboot -m 256 -accel tcg -kernel .work/vm/vmlinuz -initrd .work/vm/initramfs.cpio.gz \
    -append 'console=ttyS0 root=/dev/vda rw init=/init panic=-1 quiet spw.write=hello-from-the-demo' \
    -drive "file=$URI,format=raw,if=virtio,cache=none" -nic none | grep -E 'SPILLWAY|md5|data' || true
fi

say "Summary"
echo "   served $WORK/disk.img over NBD; nbdinfo, qemu-io and nbdcopy used it; server log: $WORK/serve.log"
echo "   next: spillway serve --help"
