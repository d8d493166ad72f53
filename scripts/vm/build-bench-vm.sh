#!/usr/bin/env bash
# Build the VM image of the boot benchmark (bench/boot.ts) from this Debian machine's installed
# files only (no network):
#   OUTDIR/base/vmlinuz, OUTDIR/base/initramfs.cpio.gz   from scripts/vm/build-vm.sh (kernel,
#                       static busybox + virtio/ext4 modules; mounts the root disk, switch_roots)
#   OUTDIR/root.img     ext4 (mkfs.ext4 -d, default 3G) whose /init starts a real, dynamically
#                       linked workload: the system Python (/usr/bin/python3.11, its shared
#                       libraries and stdlib) imports ~130 stdlib modules, then reads and hashes
#                       every file of /opt/app (text, already-compressed data, host binaries,
#                       ~56 MiB in ~700 files), prints SPILLWAY-BENCH-READY <guest uptime s>
#                       and powers off. The rest of the filesystem (host /usr/lib/x86_64-linux-gnu
#                       and /usr/share, generated media and logs: >= 1 GiB) is never read by the
#                       boot, but a copy-first deployment must move it.
#   OUTDIR/image.json   sizes (file system, allocated, read by the workload, unread filler) and
#                       the digest the workload must print
# Outputs are rebuilt only when missing, older than this script, or built with other options.
# See bench/README.md ("bench/boot").
set -euo pipefail

usage() {
  cat >&2 <<USAGE
usage: $0 [OUTDIR] [--size 3G] [--force]
  OUTDIR     default: .work/bench-vm in the repository (gitignored)
  --size     size of root.img as understood by mkfs.ext4 (default 3G; at least 2G)
  --force    rebuild even if the outputs are up to date
USAGE
  exit 2
}

die() {
  echo "build-bench-vm: error: $*" >&2
  exit 1
}

SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
REPO="$(cd "$(dirname "$SCRIPT")/../.." && pwd)"
OUTDIR=""
SIZE="3G"
FORCE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --size) [ $# -ge 2 ] || usage; SIZE="$2"; shift 2 ;;
    --size=*) SIZE="${1#--size=}"; shift ;;
    --force) FORCE=1; shift ;;
    -h|--help) usage ;;
    -*) echo "build-bench-vm: unknown option $1" >&2; usage ;;
    *) [ -z "$OUTDIR" ] || usage; OUTDIR="$1"; shift ;;
  esac
done
OUTDIR="${OUTDIR:-$REPO/.work/bench-vm}"
[[ "$SIZE" =~ ^[0-9]+G$ ]] || die "--size must be whole GiB like 3G (got '$SIZE')"
[ "${SIZE%G}" -ge 2 ] || die "--size must be at least 2G"

EPOCH="${SOURCE_DATE_EPOCH:-1704067200}"
FS_UUID="5b111a7e-0000-4000-8000-00000000b007"
# The system interpreter (not a pyenv or venv shim on PATH): the guest runs this very binary.
PY=/usr/bin/python3.11
PYLIB=/usr/lib/python3.11
MULTIARCH=x86_64-linux-gnu
# Host trees copied in as data the boot never reads (paths relative to /), and what is left out
# of them (one libLLVM is plenty; package lists and locales are not part of a VM's /usr).
FILLER=(usr/lib/$MULTIARCH usr/share)
FILLER_EXCLUDES=(usr/lib/$MULTIARCH/libLLVM-15.so* usr/share/package-lists usr/share/locale)

export PATH="$PATH:/usr/sbin:/sbin"
export LC_ALL=C

need() {
  command -v "$1" >/dev/null 2>&1 ||
    die "'$1' not found; install it with: apt-get install -y --no-install-recommends $2"
}
need mkfs.ext4 e2fsprogs
need debugfs e2fsprogs
need tar tar
need flock util-linux
need ldd libc-bin
[ -x "$PY" ] || die "$PY not found; install it with: apt-get install -y --no-install-recommends python3.11"
[ -f "$PYLIB/os.py" ] || die "$PYLIB/os.py not found; install it with: apt-get install -y --no-install-recommends libpython3.11-stdlib"
BUSYBOX="$(command -v busybox)" || die "busybox not found; install it with: apt-get install -y --no-install-recommends busybox-static"

mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
exec 9> "$OUTDIR/.build.lock"
flock 9

# Kernel and initramfs: the test VM's, built (or found up to date) in OUTDIR/base.
bash "$REPO/scripts/vm/build-vm.sh" "$OUTDIR/base" >&2

OUTPUTS=("$OUTDIR/root.img" "$OUTDIR/image.json")
PARAMS="size=$SIZE epoch=$EPOCH python=$(md5sum < "$PY" | cut -d' ' -f1) kernel=$(md5sum < "$OUTDIR/base/vmlinuz" | cut -d' ' -f1) busybox=$(md5sum < "$BUSYBOX" | cut -d' ' -f1)"

up_to_date() {
  local f
  [ "$FORCE" = 0 ] || return 1
  [ -f "$OUTDIR/.build-params" ] || return 1
  [ "$(cat "$OUTDIR/.build-params")" = "$PARAMS" ] || return 1
  for f in "${OUTPUTS[@]}"; do
    [ -f "$f" ] || return 1
    [ "$f" -nt "$SCRIPT" ] || return 1
  done
}

report() {
  echo "build-bench-vm: $1 in $OUTDIR:"
  "$PY" - "$OUTDIR/image.json" <<'PYREPORT'
import json, sys
r = json.load(open(sys.argv[1]))
mib = lambda n: f"{n / 2**20:,.1f} MiB"
print(f"  root.img        file system {mib(r['fsBytes'])}, allocated in the image file {mib(r['allocatedBytes'])}")
print(f"  read at boot    {mib(r['workload']['assetBytes'])} in {r['workload']['assetFiles']} files of /opt/app, plus Python, its libraries and {r['workload']['modules']} stdlib modules")
print(f"  never read      {mib(r['unread']['bytes'])}: " + ", ".join(f"{k} {mib(v)}" for k, v in r['unread']['by'].items()))
print(f"  files           {r['files']} in the file system; workload digest {r['workload']['digest'][:16]}...")
PYREPORT
}

if up_to_date; then
  report "up to date"
  exit 0
fi

STAGE="$(mktemp -d "$OUTDIR/.stage.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
ROOT="$STAGE/rootfs"
mkdir -p "$ROOT"/{bin,dev,proc,sys,tmp,root,etc,opt/app,usr/bin,usr/lib,usr/lib64,var/lib,var/log}
ln -s usr/lib "$ROOT/lib"
ln -s usr/lib64 "$ROOT/lib64"

# busybox, one symlink per applet.
cp "$BUSYBOX" "$ROOT/bin/busybox"
chmod 0755 "$ROOT/bin/busybox"
for applet in $("$BUSYBOX" --list | sort); do
  [ "$applet" = busybox ] || ln -sf busybox "$ROOT/bin/$applet"
done

# Host data the boot never reads, and Python's stdlib (tar keeps modes, links and mtimes).
echo "build-bench-vm: copying ${FILLER[*]} and $PYLIB from this machine…" >&2
excludes=()
for x in "${FILLER_EXCLUDES[@]}"; do excludes+=("--exclude=$x"); done
tar -C / -cf - "${excludes[@]}" --exclude='*/__pycache__' "${FILLER[@]}" "${PYLIB#/}" | tar -C "$ROOT" -xf -
cp "$PY" "$ROOT/usr/bin/python3.11"
ln -s python3.11 "$ROOT/usr/bin/python3"
# Byte code as an installed system has it, but checked by hash of nothing: unchecked-hash .pyc
# files are used as they are, whatever the timestamps we set below.
"$PY" -m compileall -q -f -j 0 --invalidation-mode unchecked-hash -d "$PYLIB" "$ROOT$PYLIB" > /dev/null ||
  die "compileall of the stdlib copy failed"

# The dynamic loader and every shared library the interpreter and its extension modules need
# (most are in the copied usr/lib/$MULTIARCH already; /lib paths live under /usr/lib here).
copy_lib() {
  local src="$1" dst="${1#/}"
  case "$dst" in lib/*|lib64/*) dst="usr/$dst" ;; esac
  if [ ! -e "$ROOT/$dst" ]; then
    mkdir -p "$(dirname "$ROOT/$dst")"
    cp -L "$src" "$ROOT/$dst"
  fi
}
for bin in "$PY" "$PYLIB"/lib-dynload/*.so; do
  ldd "$bin" | awk '/=> \//{print $3} /^\t\/.*ld-linux/{print $1}'
done | sort -u | while read -r lib; do copy_lib "$lib"; done
LOADER="$(ldd "$PY" | awk '/ld-linux/{print $1}' | head -n 1)"
[ -e "$ROOT/${LOADER#/}" ] || die "the dynamic loader $LOADER is missing from the image"

# Data: what the workload reads (/opt/app) and generated data it does not (/var).
"$PY" - "$ROOT" <<'PYGEN'
# Deterministic generated content (fixed seeds; no clock, no host state but /usr/bin files).
import gzip, os, random, stat, sys

root = sys.argv[1]
app = os.path.join(root, 'opt/app')

def mkdirs(p):
    os.makedirs(p, exist_ok=True)

def words(rng, n):
    # A vocabulary of pseudo-words with a Zipf-like use, so text compresses like prose or logs.
    return [''.join(rng.choice('etaoinshrdlucmfwypvbgkjqxz') for _ in range(rng.randint(2, 9))) for _ in range(n)]

def text_writer(seed):
    rng = random.Random(seed)
    vocab = words(rng, 3000)
    weights = [1 / (i + 1) for i in range(len(vocab))]
    hosts = [f'node-{i:02d}.cluster.internal' for i in range(24)]
    paths = ['/api/v1/items', '/api/v1/users', '/api/v2/orders', '/static/app.js', '/health', '/login', '/search']
    levels = ['INFO'] * 12 + ['DEBUG'] * 6 + ['WARN'] * 2 + ['ERROR']
    t = 1704067200.0

    def line(kind):
        nonlocal t
        t += rng.expovariate(40)
        ts = f'2024-01-{1 + int((t - 1704067200) // 86400) % 28:02d}T{int(t) % 86400 // 3600:02d}:{int(t) % 3600 // 60:02d}:{t % 60:06.3f}Z'
        if kind == 'log':
            msg = ' '.join(rng.choices(vocab, weights, k=rng.randint(3, 12)))
            return (f'{ts} {rng.choice(hosts)} app[{rng.randint(1000, 9999)}]: {rng.choice(levels)} '
                    f'req={rng.getrandbits(64):016x} path={rng.choice(paths)}/{rng.randint(1, 99999)} '
                    f'status={rng.choice((200, 200, 200, 201, 204, 304, 404, 500))} dur_ms={rng.uniform(0.2, 900):.1f} msg="{msg}"\n')
        if kind == 'csv':
            return (f'{rng.randint(1, 10**9)},{ts},{rng.choice(vocab)} {rng.choice(vocab)},{rng.choice(hosts)},'
                    f'{rng.uniform(-1000, 1000):.4f},{rng.randint(0, 65535)},{rng.choice(vocab)}\n')
        if kind == 'json':
            tags = ', '.join(f'"{w}"' for w in rng.choices(vocab, weights, k=rng.randint(1, 5)))
            return (f'{{"id": {rng.randint(1, 10**9)}, "created": "{ts}", "name": "{rng.choice(vocab)} {rng.choice(vocab)}", '
                    f'"owner": "{rng.choice(vocab)}@{rng.choice(hosts)}", "score": {rng.uniform(0, 1):.6f}, "tags": [{tags}], '
                    f'"note": "{" ".join(rng.choices(vocab, weights, k=rng.randint(4, 20)))}"}}\n')
        return (f"INSERT INTO events VALUES ({rng.randint(1, 10**9)}, '{ts}', '{rng.choice(vocab)}', "
                f"'{' '.join(rng.choices(vocab, weights, k=rng.randint(2, 10)))}', {rng.uniform(0, 1e6):.2f});\n")

    # Files are drawn from a pool of distinct lines per kind (a few MiB each, far beyond any
    # compressor's window), which is much faster than composing every line.
    pools = {}

    def write(path, kind, size):
        if kind not in pools:
            pools[kind] = [line(kind).encode() for _ in range(30000)]
        pool = pools[kind]
        parts, n = [], 0
        while n < size:
            chunk = rng.choices(pool, k=256)
            parts.extend(chunk)
            n += sum(map(len, chunk))
        data = b''.join(parts)[:size]
        with open(path, 'wb') as f:
            f.write(data)
        return data

    return rng, write

rng, write_text = text_writer(1)
kinds = ['log', 'csv', 'json', 'sql']
ext = {'log': 'log', 'csv': 'csv', 'json': 'jsonl', 'sql': 'sql'}

# /opt/app/data: text the application loads (~18 MiB, 256 files of 16-128 KiB).
for i in range(256):
    kind = kinds[i % 4]
    d = os.path.join(app, 'data', kind)
    mkdirs(d)
    write_text(os.path.join(d, f'{kind}-{i:04d}.{ext[kind]}'), kind, rng.randint(16, 128) * 1024)

# /opt/app/static: already-compressed data (~18 MiB): gzip'd text and incompressible media.
sd = os.path.join(app, 'static')
mkdirs(sd)
for i in range(64):
    kind = kinds[i % 4]
    raw = write_text(os.path.join(sd, 'tmp'), kind, rng.randint(128, 512) * 1024)
    with open(os.path.join(sd, f'bundle-{i:03d}.{ext[kind]}.gz'), 'wb') as f:
        f.write(gzip.compress(raw, 6, mtime=0))
os.unlink(os.path.join(sd, 'tmp'))
for i in range(96):
    with open(os.path.join(sd, f'img-{i:03d}.{("jpg", "png", "webp")[i % 3]}'), 'wb') as f:
        f.write(rng.randbytes(rng.randint(32, 160) * 1024))

# /opt/app/bin: host executables (ELF) the application checks at start (~20 MiB).
bd = os.path.join(app, 'bin')
mkdirs(bd)
budget = 20 * 2**20
for base in ('/usr/bin', '/usr/sbin'):
    for name in sorted(os.listdir(base)):
        p = os.path.join(base, name)
        try:
            st = os.stat(p)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or name.startswith('python') or not 64 * 1024 <= st.st_size <= 3 * 2**20:
            continue
        with open(p, 'rb') as f:
            data = f.read()
        if data[:4] != b'\x7fELF' or st.st_size > budget:
            continue
        with open(os.path.join(bd, name), 'wb') as f:
            f.write(data)
        os.chmod(os.path.join(bd, name), 0o755)
        budget -= st.st_size
        if budget < 64 * 1024:
            break
    if budget < 64 * 1024:
        break

# The manifest: every file the application reads, in path order.
files = []
for dirpath, dirnames, filenames in os.walk(app):
    dirnames.sort()
    for n in sorted(filenames):
        files.append(os.path.relpath(os.path.join(dirpath, n), root))
with open(os.path.join(app, 'manifest.txt'), 'w') as f:
    f.write(''.join('/' + p + '\n' for p in sorted(files)))

# Data the boot never reads: media and log archives.
md = os.path.join(root, 'var/lib/app/media')
mkdirs(md)
for i in range(16):
    with open(os.path.join(md, f'asset-{i:03d}.mp4'), 'wb') as f:
        f.write(rng.randbytes(4 * 2**20))
ld = os.path.join(root, 'var/log/app')
mkdirs(ld)
for i in range(16):
    write_text(os.path.join(ld, f'app.log.{i}'), 'log', 2 * 2**20)
PYGEN

cat > "$ROOT/opt/app/workload.py" <<'WORKLOAD'
# Spillway boot benchmark workload: an application starting up. It imports a large part of the
# standard library, then reads and hashes every file listed in /opt/app/manifest.txt, and prints
#   SPILLWAY-BENCH-DIGEST <sha256 over every file's path and sha256> <bytes> <files>
#   SPILLWAY-BENCH-READY <seconds since the guest kernel started>
# `--root DIR` runs it on the build host against the image's source tree.
import importlib
import sys
import time

MODULES = """
abc argparse array ast asyncio base64 binascii bisect bz2 calendar cmath cmd codecs collections
colorsys compileall concurrent.futures configparser contextlib contextvars copy cProfile csv
ctypes dataclasses datetime dbm decimal difflib dis doctest email email.mime.multipart
email.mime.text email.parser email.policy encodings.idna enum errno filecmp fileinput fnmatch
fractions ftplib functools getopt getpass gettext glob graphlib gzip hashlib heapq hmac html
html.parser http.client http.cookiejar http.cookies http.server imaplib importlib.metadata
importlib.resources inspect io ipaddress itertools json json.decoder linecache locale logging
logging.config logging.handlers lzma mailbox math mimetypes mmap multiprocessing
multiprocessing.pool netrc numbers operator optparse pathlib pickle pkgutil platform plistlib
poplib pprint profile pstats py_compile pydoc queue quopri random re reprlib runpy sched secrets
select selectors shelve shlex shutil signal smtplib socket socketserver sqlite3 ssl stat
statistics string stringprep struct subprocess sysconfig tarfile tempfile textwrap threading
timeit tokenize tomllib trace traceback types typing unicodedata unittest unittest.mock
urllib.parse urllib.request urllib.robotparser uuid warnings wave weakref wsgiref.simple_server
xml.dom.minidom xml.etree.ElementTree xml.sax xmlrpc.client xmlrpc.server zipapp zipfile
zipimport zlib zoneinfo
""".split()


def main() -> int:
    root = '/'
    if len(sys.argv) == 3 and sys.argv[1] == '--root':
        root = sys.argv[2]
    for name in MODULES:
        importlib.import_module(name)
    import hashlib
    import os

    with open(os.path.join(root, 'opt/app/manifest.txt')) as f:
        files = f.read().split()
    total = hashlib.sha256()
    nbytes = 0
    buf = bytearray(256 * 1024)
    view = memoryview(buf)
    for path in files:
        h = hashlib.sha256()
        with open(os.path.join(root, path.lstrip('/')), 'rb', buffering=0) as f:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                h.update(view[:n])
                nbytes += n
        total.update(path.encode() + b'\0' + h.digest())
    print(f'SPILLWAY-BENCH-DIGEST {total.hexdigest()} {nbytes} {len(files)} {len(MODULES)}', flush=True)
    if root == '/':
        with open('/proc/uptime') as f:
            up = f.read().split()[0]
    else:
        up = f'{time.process_time():.2f}'
    print(f'SPILLWAY-BENCH-READY {up}', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
WORKLOAD

cat > "$ROOT/init" <<'INIT'
#!/bin/sh
# Spillway boot benchmark VM, root filesystem stage (PID 1): start the workload, power off.
export PATH=/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
# (No 2>/dev/null here: the root file system is read-only and /dev is empty until this mount.)
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
# Only emergencies reach the console from here on, so no kernel message splits a marker line.
dmesg -n 1
echo "SPILLWAY-BENCH-INIT $(cut -d' ' -f1 /proc/uptime)"
export HOME=/root LC_ALL=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 PYTHONHASHSEED=0
if /usr/bin/python3.11 /opt/app/workload.py; then
  :
else
  status=$?
  dmesg | tail -n 40
  echo "SPILLWAY-BENCH-FAIL: the workload exited $status"
fi
poweroff -f
INIT
chmod 0755 "$ROOT/init"

# What the guest must print: the workload run here against the tree (also checks the imports).
WL="$(cd "$STAGE" && "$PY" -B "$ROOT/opt/app/workload.py" --root "$ROOT")" || die "the workload failed on the build host"
read -r _ DIGEST ASSET_BYTES ASSET_FILES NMODULES <<< "$(grep '^SPILLWAY-BENCH-DIGEST ' <<< "$WL")"
[ -n "${NMODULES:-}" ] || die "the workload printed no digest: $WL"

find "$ROOT" -exec touch -h -d "@$EPOCH" {} +
FILES="$(find "$ROOT" | wc -l)"
echo "build-bench-vm: mkfs.ext4 -d of $(du -sh "$ROOT" | cut -f1) in $FILES files…" >&2
E2FSPROGS_FAKE_TIME="$EPOCH" mkfs.ext4 -q -F -L spillway-bench -U "$FS_UUID" \
  -E "hash_seed=$FS_UUID,root_owner=0:0" -d "$ROOT" "$STAGE/root.img" "$SIZE" > /dev/null ||
  die "mkfs.ext4 failed"
# mkfs.ext4 -d copies each file's ctime, which touch cannot set: pin it with debugfs.
(cd "$ROOT" && find . | sort | while read -r p; do
  p="${p#.}"
  echo "sif \"${p:-/}\" ctime @$EPOCH"
done) > "$STAGE/ctimes.debugfs"
E2FSPROGS_FAKE_TIME="$EPOCH" debugfs -w -f "$STAGE/ctimes.debugfs" "$STAGE/root.img" > /dev/null 2> "$STAGE/debugfs.log" ||
  die "debugfs failed: $(tail -n 5 "$STAGE/debugfs.log")"

# Sizes.
unread_json="$(
  for d in "${FILLER[@]}" var/lib/app var/log/app; do
    printf '"/%s": %s,' "$d" "$(du -s --block-size=1 "$ROOT/$d" | cut -f1)"
  done
)"
cat > "$STAGE/image.json" <<JSON
{
  "fsBytes": $(stat -c %s "$STAGE/root.img"),
  "allocatedBytes": $(( $(stat -c %b "$STAGE/root.img") * $(stat -c %B "$STAGE/root.img") )),
  "files": $FILES,
  "workload": { "digest": "$DIGEST", "assetBytes": $ASSET_BYTES, "assetFiles": $ASSET_FILES, "modules": $NMODULES, "python": "$PY" },
  "unread": { "by": { ${unread_json%,} } },
  "kernel": "base/vmlinuz",
  "initrd": "base/initramfs.cpio.gz",
  "rootImg": "root.img",
  "params": "$PARAMS"
}
JSON
"$PY" - "$STAGE/image.json" <<'PYSUM'
import json, sys
p = sys.argv[1]
r = json.load(open(p))
r['unread']['bytes'] = sum(r['unread']['by'].values())
json.dump(r, open(p, 'w'), indent=2)
PYSUM

rm -f "$OUTDIR/.build-params"
mv -f "$STAGE/root.img" "$OUTDIR/root.img"
mv -f "$STAGE/image.json" "$OUTDIR/image.json"
echo "$PARAMS" > "$OUTDIR/.build-params"
report "built"
