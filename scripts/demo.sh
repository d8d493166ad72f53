#!/usr/bin/env bash
# The main job (`make demo`): a running VM bursts to the cloud site while its disk stays at the
# origin, writes there, and comes back with its writes.
#   1. builds the sample guest (scripts/vm/build-vm.sh --guest) and a PKI;
#   2. starts the on-prem edge, the WAN emulator (20 Mbit/s, 30 ms), the cloud edge (empty cache)
#      and the management service, as daemons with pid files under .work/demo;
#   3. starts the VM at the origin, then `spillway burst` with live progress;
#   4. the VM writes a file in the cloud; `spillway bring-back`; the file is read at the origin;
#   5. prints a summary with the API's URL and token. Everything keeps running for you to try;
#      `bash scripts/demo.sh stop` stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
SPILLWAY="node dist/cli.js"
WORK=.work/demo
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

stop_all() {
  # VMs first (they hold the edges' exports), then the service and the edges.
  for d in "$WORK"/svc/vms/*/; do
    [ -f "$d/qemu.pid" ] && kill -9 "$(cat "$d/qemu.pid")" 2>/dev/null || true
  done
  for p in service cloud-edge dc-edge wanem; do
    if [ -f "$WORK/$p.pid" ]; then
      pid=$(cat "$WORK/$p.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$WORK/$p.pid"
    fi
  done
}

if [ "${1:-}" = stop ]; then
  stop_all
  echo "demo: stopped"
  exit 0
fi
stop_all

freeport() { node -e 'const s = require("net").createServer().listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close(); })'; }
# daemon NAME CMD...: start in its own session (survives this script), log and pid file in $WORK.
daemon() {
  local name=$1
  shift
  setsid "$@" > "$WORK/$name.log" 2>&1 < /dev/null &
  echo $! > "$WORK/$name.pid"
}
wait_for() { # what, test command
  local what=$1
  shift
  for _ in $(seq 300); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "demo: $what did not come up; its log:" >&2
  tail -20 "$WORK/$what.log" >&2 || true
  exit 1
}
# link_bytes DIRECTION: bytes the WAN relay carried so far (targetToClient: origin → cloud).
link_bytes() { sleep 1.2; node -e 'console.log(JSON.parse(require("fs").readFileSync(process.argv[1])).bytes[process.argv[2]])' "$WORK/wanem.json" "${1:-targetToClient}"; }

say "1. The sample VM (kernel, initramfs, ext4 root; it reads a cloud-init NoCloud drive) and a PKI"
bash scripts/vm/build-vm.sh .work/vm-guest --guest > /dev/null
rm -rf "$WORK/svc" "$WORK/dc-edge" "$WORK/cloud-edge" "$WORK/cache" "$WORK/pki" "$WORK/wanem.json"
cp .work/vm-guest/root.img "$WORK/web-root.img"
$SPILLWAY pki init --dir "$WORK/pki" > /dev/null
for n in dc-edge cloud-edge; do $SPILLWAY pki issue --dir "$WORK/pki" "$n" > /dev/null; done
echo "   root disk $WORK/web-root.img ($(du -h --apparent-size "$WORK/web-root.img" | cut -f1)); certificates in $WORK/pki"

LINK=$(freeport); WAN=$(freeport); NBD=$(freeport); MET=$(freeport); API=${SPILLWAY_DEMO_API_PORT:-7080}
cat > "$WORK/dc-edge.yaml" <<EOF
site: dc
name: dc-edge
state: $WORK/dc-edge
tls: { ca: $WORK/pki/ca.pem, cert: $WORK/pki/dc-edge.pem, key: $WORK/pki/dc-edge.key }
link: { listen: "127.0.0.1:$LINK" }
EOF
cat > "$WORK/cloud-edge.yaml" <<EOF
site: cloud
name: cloud-edge
state: $WORK/cloud-edge
tls: { ca: $WORK/pki/ca.pem, cert: $WORK/pki/cloud-edge.pem, key: $WORK/pki/cloud-edge.key }
nbd: { listen: "127.0.0.1:$NBD" }
metrics: { listen: "127.0.0.1:$MET" }
cache: { dir: $WORK/cache, size: 1GiB }
peers: [ { name: dc-edge, address: "127.0.0.1:$WAN" } ]
EOF
cat > "$WORK/control.yaml" <<EOF
listen: 127.0.0.1:$API
state: $WORK/svc
inventory:
  sites:
    - { name: dc, kind: onprem, region: eu }
    - { name: cloud, kind: cloud, region: eu, tags: [eu] }
  edges:
    - { name: dc-edge, site: dc, control: $WORK/dc-edge/control.sock, link: "127.0.0.1:$LINK" }
    - { name: cloud-edge, site: cloud, control: $WORK/cloud-edge/control.sock, nbd: "127.0.0.1:$NBD" }
  hosts:
    - { name: dc-1, site: dc, vcpus: 8, ramMiB: 8192, edge: dc-edge }
    - { name: cloud-1, site: cloud, vcpus: 16, ramMiB: 32768, edge: cloud-edge, pricePerHour: 0.42 }
    - { name: cloud-2, site: cloud, vcpus: 16, ramMiB: 32768, edge: cloud-edge, pricePerHour: 0.55 }
  instances:
    - name: web
      origin: dc
      host: dc-1
      spec: { kernel: $(pwd)/.work/vm-guest/vmlinuz, initrd: $(pwd)/.work/vm-guest/initramfs.cpio.gz, append: "console=ttyS0 root=/dev/vda rw init=/init panic=-1", memoryMiB: 256, vcpus: 1, mac: "52:54:00:d5:00:01" }
      identity: { hostname: web, machineId: "5b11a7e0000040008000000000000001" }
      volumes: [ { name: web-root, path: $WORK/web-root.img, family: web, policy: origin } ]
EOF

say "2. On-prem edge, WAN emulator (20 Mbit/s, 30 ms each way), cloud edge, management service"
daemon dc-edge $SPILLWAY edge --config "$WORK/dc-edge.yaml"
wait_for dc-edge test -S "$WORK/dc-edge/control.sock"
daemon wanem $SPILLWAY wanem --listen "127.0.0.1:$WAN" --target "127.0.0.1:$LINK" --delay-ms 30 --rate-mbit 20 --stats-file "$WORK/wanem.json"
wait_for wanem bash -c "echo > /dev/tcp/127.0.0.1/$WAN"
daemon cloud-edge $SPILLWAY edge --config "$WORK/cloud-edge.yaml"
wait_for cloud-edge test -S "$WORK/cloud-edge/control.sock"
daemon service $SPILLWAY service run --config "$WORK/control.yaml"
wait_for service test -s "$WORK/svc/operator.token"
export SPILLWAY_API="http://127.0.0.1:$API" SPILLWAY_TOKEN_FILE="$WORK/svc/operator.token"
wait_for service curl -sf "$SPILLWAY_API/healthz"
$SPILLWAY inventory hosts list

say "3. The VM runs at its origin (dc-1, straight from its disk file)"
$SPILLWAY start web

say "4. Burst: stop it at the origin, stream its disk to the cloud edge, adapt, place, boot on cloud-1"
BYTES0=$(link_bytes)
$SPILLWAY burst web
BURST=$($SPILLWAY workflow list --kind transfer --json | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const j=JSON.parse(s);const l=(j.items??j);console.log(l[0].id)})')
BYTES1=$(link_bytes)
UP1=$(link_bytes clientToTarget)

say "5. The VM writes in the cloud (typed on its serial console)"
STAMP="written in the cloud at $(date -u +%FT%TZ)"
$SPILLWAY vm exec "$WORK/svc/vms/web@cloud-1" -- "hostname; echo '$STAMP' > /data/hello.txt && sync && cat /data/hello.txt"

say "6. Bring it back: stop, ship pending writes, snapshot the origin, undo adaptations, restart at dc-1"
$SPILLWAY bring-back web
UP2=$(link_bytes clientToTarget)

say "7. At the origin, the file the VM wrote in the cloud"
GOT=$($SPILLWAY vm exec "$WORK/svc/vms/web@dc-1" -- "cat /data/hello.txt")
echo "   /data/hello.txt: $GOT"
[ "$(echo "$GOT" | tr -d '\r')" = "$STAMP" ] || { echo "demo: the write did not come back" >&2; exit 1; }

say "Summary"
$SPILLWAY workflow show "$BURST" --json | node -e '
let s = ""; process.stdin.on("data", (d) => (s += d)).on("end", () => {
  const w = JSON.parse(s); const v = w.outputs.verify ?? {}; const p = w.outputs.place ?? {};
  console.log(`   burst:          ${w.state}; host ${p.host} (${p.explanation})`);
  console.log(`   boot in cloud:  guest ready ${((v.bootMs ?? 0) / 1000).toFixed(1)} s after QEMU started`);
  console.log(`   chunk reads:    ${v.reads?.cache ?? 0} from the cache, ${v.reads?.link ?? 0} over the link`);
});'
echo "   link bytes:     $((BYTES1 - BYTES0)) to the cloud during the burst (the disk is $(du -b "$WORK/web-root.img" | cut -f1)); $((UP2 - UP1)) back to the origin for the bring-back (the VM's writes)"
echo "   write:          '$STAMP' is on the origin disk"
echo
echo "   API:            $SPILLWAY_API   (OpenAPI: $SPILLWAY_API/openapi.json)"
echo "   token:          export SPILLWAY_TOKEN_FILE=$WORK/svc/operator.token"
echo "   try:            node dist/cli.js workflow list; node dist/cli.js clone web --name web-2"
echo "   stop it all:    bash scripts/demo.sh stop"
