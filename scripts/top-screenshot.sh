#!/usr/bin/env bash
# Screenshot of `ringtftpd top` during a load, for docs/img/top-during-load.svg.
#
#   scripts/top-screenshot.sh [OUT.svg]
#
# Starts a release ringtftpd on 127.0.0.1 (2 threads, --metrics), a bounded loadtest against it
# (paced lock-step downloads at several blksizes, requests for missing pxelinux.cfg names), runs
# `ringtftpd top` in a tmux server of its own, captures the pane after a few seconds
# (`tmux capture-pane -p`) and renders that text as an SVG. Loopback only; every process it
# starts is stopped by PID.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:-docs/img/top-during-load.svg}
TARGET=${CARGO_TARGET_DIR:-target}
cargo build --release -q -p ringtftpd -p loadtest
BIN="$TARGET/release"

TMP=$(mktemp -d /tmp/top-shot.XXXXXX)
SERVER_PID=""
LOAD_PIDS=()
SOCK="$TMP/tmux.sock"
cleanup() {
    tmux -S "$SOCK" kill-server 2>/dev/null || true
    for p in "${LOAD_PIDS[@]}" $SERVER_PID; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

ROOT="$TMP/root"
mkdir -p "$ROOT/boot"
head -c $((24 << 20)) /dev/urandom >"$ROOT/boot/initrd.img"
head -c $((8 << 20)) /dev/urandom >"$ROOT/boot/vmlinuz"
head -c 122308 /dev/urandom >"$ROOT/ldlinux.c32"
head -c 46468 /dev/urandom >"$ROOT/pxelinux.0"
chmod -R a+rX "$TMP"

PORT=$((20000 + RANDOM % 20000))
MPORT=$((PORT + 1))
"$BIN/ringtftpd" --address "127.0.0.1:$PORT" --threads 2 --metrics "127.0.0.1:$MPORT" "$ROOT" \
    >"$TMP/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 50); do
    curl -fs "http://127.0.0.1:$MPORT/readyz" >/dev/null 2>&1 && break
    sleep 0.1
done

# Paced lock-step clients (a firmware's pace, not loopback's), each stopping by itself after
# 20 s with an ERROR to the server; plus requests for missing pxelinux.cfg names.
python3 - "$PORT" >"$TMP/clients.log" 2>&1 <<'PY' &
import socket, struct, sys, threading, time
port = int(sys.argv[1])
def fetch(name, blksize, pace, src):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src, 0))
    s.settimeout(1.0)
    opts = b"blksize\0%d\0" % blksize if blksize != 512 else b""
    s.sendto(b"\0\1" + name.encode() + b"\0octet\0" + opts, ("127.0.0.1", port))
    end = time.time() + 20
    tid = None
    while time.time() < end:
        try:
            data, tid = s.recvfrom(65536)
        except socket.timeout:
            continue
        op = struct.unpack("!H", data[:2])[0]
        if op == 6:
            block = 0
        elif op == 3:
            block = struct.unpack("!H", data[2:4])[0]
        else:
            return
        time.sleep(pace)
        s.sendto(struct.pack("!HH", 4, block), tid)
        if op == 3 and len(data) - 4 < blksize:
            return
    if tid:
        s.sendto(b"\0\5\0\0done\0", tid)
jobs = [("boot/initrd.img", 1468, 0.004), ("boot/initrd.img", 1468, 0.002),
        ("boot/initrd.img", 512, 0.003), ("boot/vmlinuz", 1468, 0.001),
        ("boot/vmlinuz", 1468, 0.006), ("boot/vmlinuz", 512, 0.002),
        ("boot/vmlinuz", 1432, 0.003), ("ldlinux.c32", 512, 0.02),
        ("ldlinux.c32", 512, 0.01), ("boot/initrd.img", 1432, 0.008),
        ("boot/vmlinuz", 1468, 0.0005), ("boot/initrd.img", 1468, 0.0015)]
threads = [threading.Thread(target=fetch, args=(n, b, p, "127.0.0.%d" % (10 + i)))
           for i, (n, b, p) in enumerate(jobs)]
for t in threads: t.start()
for t in threads: t.join()
PY
LOAD_PIDS+=($!)
for mac in 01-52-54-00-12-34-56 01-52-54-00-ab-cd-ef C0A8000A C0A800 C0A8; do
    tftp 127.0.0.1 "$PORT" -c get "pxelinux.cfg/$mac" "$TMP/miss" >/dev/null 2>&1 || true
done
"$BIN/loadtest" --server "127.0.0.1:$PORT" --files pxelinux.0 --expect-dir "$ROOT" -n 200 -c 4 \
    --max-time 10 >/dev/null 2>&1 || true

tmux -S "$SOCK" new-session -d -x 150 -y 38 "$BIN/ringtftpd top 127.0.0.1:$MPORT --interval 0.5"
sleep 5
tmux -S "$SOCK" capture-pane -p >"$TMP/screen.txt"

python3 - "$TMP/screen.txt" "$OUT" <<'EOF'
import html, sys
lines = open(sys.argv[1], encoding="utf-8").read().rstrip("\n").split("\n")
cw, lh, pad = 7.2, 15, 10
width = int(max(len(l) for l in lines) * cw + 2 * pad)
height = int(len(lines) * lh + 2 * pad)
out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
       f'viewBox="0 0 {width} {height}">',
       f'<rect width="100%" height="100%" fill="#1e1e1e"/>',
       '<g font-family="DejaVu Sans Mono, Menlo, Consolas, monospace" font-size="12" fill="#d4d4d4">']
for i, line in enumerate(lines):
    y = pad + (i + 1) * lh - 4
    out.append(f'<text x="{pad}" y="{y}" xml:space="preserve">{html.escape(line)}</text>')
out += ['</g>', '</svg>']
open(sys.argv[2], "w", encoding="utf-8").write("\n".join(out) + "\n")
EOF
cat "$TMP/screen.txt"
echo "top-screenshot.sh: wrote $OUT" >&2
