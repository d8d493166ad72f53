#!/usr/bin/env bash
# The edge on its own, step by step (`make demo-edge`): build a sample disk, serve it with
# `spillway serve`, show real NBD clients using it, boot a VM from it, then stream it between two
# edges over the WAN emulator and write back to the origin. `make demo` is the main job.
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
awk 'BEGIN { for (i = 0; i < 120000; i++) print "compressible text line", i, "for the demo" }' > "$WORK/tree/data/text.txt"
mkfs.ext4 -q -F -d "$WORK/tree" "$WORK/disk.img" 256M
ls -ls "$WORK/disk.img"
echo "   spillway analyze reads its filesystem (what later steps use to plan prefetch and adapt instances):"
$SPILLWAY analyze --top 3 "$WORK/disk.img" | sed 's/^/   /'

say "2. spillway serve $WORK/disk.img on $URI"
$SPILLWAY serve "$WORK/disk.img" --port "$PORT" --bind 127.0.0.1 --pid-file "$WORK/serve.pid" --description "demo disk" 2> "$WORK/serve.log" &
SERVE=$!
trap 'kill $SERVE 2>/dev/null || true; wait $SERVE 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -s "$WORK/serve.pid" ] && break; sleep 0.1; done
[ -s "$WORK/serve.pid" ] || { cat "$WORK/serve.log"; echo "demo: the server did not start" >&2; exit 1; }

say "3. nbdinfo: what a client negotiates"
nbdinfo "$URI"

say "4. nbdinfo --map: allocation seen through NBD block status (base:allocation)"
nbdinfo --map "$URI" > "$WORK/map.txt"
head -12 "$WORK/map.txt"
echo "   ... $(wc -l < "$WORK/map.txt") extents in all"

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
    -drive "file=$URI,format=raw,if=virtio,cache=none" -nic none | sed -e 's/\x1b\[[0-9;?]*[A-Za-z]//g' -e 's/\x1bc//g' | grep -E 'SPILLWAY' || true
fi
kill $SERVE 2>/dev/null || true
wait $SERVE 2>/dev/null || true

say "8. Streaming: the disk stays at an on-prem edge; a cloud edge serves it over a 100 Mbit/s, 40 ms RTT link"
S="$WORK/stream"
rm -rf "$S"; mkdir -p "$S"
freeport() { node -e 'const s = require("net").createServer().listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close(); })'; }
LINK=$(freeport); WAN=$(freeport); NBD=$(freeport); MET=$(freeport)
$SPILLWAY pki init --dir "$S/pki" >/dev/null
$SPILLWAY pki issue --dir "$S/pki" onprem >/dev/null
$SPILLWAY pki issue --dir "$S/pki" cloud >/dev/null
cat > "$S/onprem.yaml" <<YAML
site: onprem
state: $S/state-onprem
tls: { ca: $S/pki/ca.pem, cert: $S/pki/onprem.pem, key: $S/pki/onprem.key }
link: { listen: "127.0.0.1:$LINK" }
volumes: [ { name: demo, source: $WORK/disk.img } ]
YAML
cat > "$S/cloud.yaml" <<YAML
site: cloud
state: $S/state-cloud
tls: { ca: $S/pki/ca.pem, cert: $S/pki/cloud.pem, key: $S/pki/cloud.key }
nbd: { listen: "127.0.0.1:$NBD" }
metrics: { listen: "127.0.0.1:$MET" }
cache: { dir: $S/cache, size: 1GiB }
peers: [ { name: onprem, address: "127.0.0.1:$WAN", connections: 2 } ]
volumes: [ { name: demo, peer: onprem, writes: origin, rpo: 10s } ]
YAML
$SPILLWAY edge --config "$S/onprem.yaml" 2> "$S/onprem.log" &
P1=$!
$SPILLWAY wanem --listen "127.0.0.1:$WAN" --target "127.0.0.1:$LINK" --delay-ms 20 --rate-mbit 100 --stats-file "$S/wanem.json" 2> "$S/wanem.log" &
P2=$!
$SPILLWAY edge --config "$S/cloud.yaml" 2> "$S/cloud.log" &
P3=$!
trap 'kill $P1 $P2 $P3 2>/dev/null || true; wait 2>/dev/null || true' EXIT
CLOUD="nbd://127.0.0.1:$NBD/demo"
for _ in $(seq 300); do nbdinfo --size "$CLOUD" >/dev/null 2>&1 && break; sleep 0.1; done
nbdinfo --size "$CLOUD" >/dev/null || { tail -n 5 "$S"/*.log; echo "demo: the cloud edge did not export the volume" >&2; exit 1; }
link_bytes() { sleep 1.2; node -e 'console.log(JSON.parse(require("fs").readFileSync(process.argv[1])).bytes.targetToClient)' "$S/wanem.json"; }
t0=$(date +%s.%N); nbdcopy "$CLOUD" "$S/cold.img"; t1=$(date +%s.%N)
cold=$(link_bytes)
nbdcopy "$CLOUD" "$S/warm.img"; t2=$(date +%s.%N)
warm=$(( $(link_bytes) - cold ))
cmp "$WORK/disk.img" "$S/cold.img" && cmp "$WORK/disk.img" "$S/warm.img" && echo "   both reads are byte-identical to the disk at the on-prem edge"
awk -v c="$cold" -v w="$warm" -v a="$t0" -v b="$t1" -v d="$t2" 'BEGIN {
  printf "   cold read of 256 MiB: %.1f s, %.1f MiB crossed the link (%.0f%% of the disk: zeros and compressible data are cheap)\n", b-a, c/1048576, 100*c/268435456;
  printf "   warm read from the encrypted cache: %.1f s, %d bytes crossed the link\n", d-b, w }'
curl -s "http://127.0.0.1:$MET/metrics" | grep -E '^spillway_remote_chunk_reads_total' | sed 's/^/   /'

say "9. Write-back: the cloud instance writes; the writes reach the on-prem disk in crash-consistent epochs"
qemu-io -f raw -c 'write -P 0x5a 1M 4M' -c 'write -P 0x5b 2M 64k' -c flush "$CLOUD" | grep -E '^wrote' | sed 's/^/   qemu-io: /'
$SPILLWAY volume status demo --config "$S/cloud.yaml" | sed 's/^/   /'
$SPILLWAY volume drain demo --config "$S/cloud.yaml" | sed 's/^/   /'
python3 - "$WORK/disk.img" <<'PY'
import sys
with open(sys.argv[1], 'rb') as f:
    f.seek(1 << 20); a = f.read(1 << 20); b = f.read(64 << 10); c = f.read((3 << 20) - (64 << 10))
ok = a == b'\x5a' * len(a) and b == b'\x5b' * len(b) and c == b'\x5a' * len(c)
print('   the on-prem disk holds both writes (the second overwrote part of the first):', 'yes' if ok else 'NO')
sys.exit(0 if ok else 1)
PY
curl -s "http://127.0.0.1:$MET/metrics" | grep -E '^spillway_writeback_(epochs_total|shipped_bytes_total|guest_bytes_total)' | sed 's/^/   /'
kill $P1 $P2 $P3 2>/dev/null || true
wait 2>/dev/null || true

say "Summary"
echo "   served $WORK/disk.img over NBD; nbdinfo, qemu-io, nbdcopy and a VM used it (log: $WORK/serve.log)"
echo "   streamed it between two edges over mutual TLS through an emulated WAN (logs: $WORK/stream/*.log)"
echo "   wrote through the cloud edge and shipped the writes back to the on-prem disk (spillway volume drain)"
echo "   next: spillway serve --help, spillway edge --help, spillway volume --help, spillway profile --help, spillway analyze --help; docs/edge.md, docs/writeback.md, docs/profiles.md"
