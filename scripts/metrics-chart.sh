#!/usr/bin/env bash
# Renders docs/img/metrics-during-load.svg from a real scrape: starts
# ringtftpd with --metrics on loopback, runs a bounded loadtest against it
# (downloads, some with 5 % simulated loss, and requests for a missing
# file), scrapes /metrics every 0.5 s and draws, per second, what the
# dashboard's first panels show: transfers finished, bytes sent,
# retransmissions and refusals (docs/grafana/ringtftpd.json has the same
# queries for Grafana). Bounded: the load stops by itself (--max-time), and
# the server is stopped by its PID.
#
#   scripts/metrics-chart.sh [OUT.svg]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

out=${1:-docs/img/metrics-during-load.svg}
cargo build --release --quiet -p ringtftpd -p loadtest
bin=target/release
work=$(mktemp -d /tmp/ringtftpd-chart.XXXXXX)
server=""
cleanup() {
    [[ -n $server ]] && kill "$server" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/root"
head -c $((4 << 20)) /dev/urandom >"$work/root/kernel"
head -c $((256 << 10)) /dev/urandom >"$work/root/initrd"
chmod 0644 "$work/root"/*
port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$bin/ringtftpd" --address "127.0.0.1:$port" --metrics "127.0.0.1:$mport" -q "$work/root" 2>"$work/server.log" &
server=$!
for _ in $(seq 1 50); do
    curl -sf "http://127.0.0.1:$mport/readyz" >/dev/null && break
    sleep 0.1
done

scrape() {
    local t=0
    while kill -0 "$server" 2>/dev/null && [[ ! -e $work/done ]]; do
        printf '### %s\n' "$(date +%s.%N)" >>"$work/scrapes"
        curl -sf "http://127.0.0.1:$mport/metrics" >>"$work/scrapes" || true
        sleep 0.5
        t=$((t + 1))
        [[ $t -lt 240 ]] || break
    done
}
scrape &
scraper=$!

load() { "$bin/loadtest" --server "127.0.0.1:$port" --max-time 20 "$@" >/dev/null 2>&1 || true; }
sleep 1
load --file kernel --expect "$work/root/kernel" -n 60 -c 8 --blksize 1432
load --file initrd --expect "$work/root/initrd" -n 200 -c 20 --blksize 1432 --loss 0.05 &
lossy=$!
# iPXE's first request of a boot: a script that is not there (ERROR 1).
python3 - "$port" <<'PY' &
import socket, sys, time
port = int(sys.argv[1])
for i in range(300):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1.0)
    s.sendto(b"\x00\x01autoexec.ipxe\x00octet\x00", ("127.0.0.1", port))
    try:
        s.recvfrom(600)
    except OSError:
        pass
    s.close()
    time.sleep(0.01)
PY
missing=$!
wait "$lossy" "$missing" || true
sleep 0.2
load --file kernel --expect "$work/root/kernel" -n 40 -c 4 --blksize 1432 --windowsize 8
sleep 1.5
touch "$work/done"
wait "$scraper" || true
kill "$server" 2>/dev/null || true
wait "$server" 2>/dev/null || true
server=""

mkdir -p "$(dirname "$out")"
python3 - "$work/scrapes" "$out" <<'EOF'
import re, sys

scrapes, out = sys.argv[1], sys.argv[2]
samples = []  # (time, {series: value})
current = None
for line in open(scrapes):
    if line.startswith('### '):
        current = (float(line[4:]), {})
        samples.append(current)
    elif current and line and not line.startswith('#'):
        m = re.match(r'^([a-zA-Z_:][\w:]*(\{[^}]*\})?) ([0-9.eE+-]+|NaN)$', line.strip())
        if m:
            current[1][m.group(1)] = float(m.group(3))

def total(sample, name, match=''):
    return sum(v for k, v in sample.items() if k.split('{')[0] == name and match in k)

panels = [
    ('transfers finished / s', 'ringtftpd_transfers_finished_total', ''),
    ('MB sent / s', 'ringtftpd_data_bytes_total', 'direction="sent"'),
    ('retransmissions / s', 'ringtftpd_retransmissions_total', ''),
    ('refusals / s (not_found)', 'ringtftpd_refusals_total', 'reason="not_found"'),
]
t0 = samples[0][0] if samples else 0
W, H, PAD, PH = 760, 150, 48, 110
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H * len(panels) + 30}" font-family="sans-serif" font-size="11">',
       f'<text x="{PAD}" y="16" font-size="13">ringtftpd --metrics, scraped every 0.5 s during a bounded load ({len(samples)} scrapes)</text>']
for i, (title, name, match) in enumerate(panels):
    pts = []
    for (ta, a), (tb, b) in zip(samples, samples[1:]):
        dt = tb - ta
        if dt > 0:
            rate = (total(b, name, match) - total(a, name, match)) / dt
            if 'bytes' in name:
                rate /= 1e6
            pts.append((tb - t0, max(rate, 0.0)))
    top = max([p[1] for p in pts] + [1.0])
    tmax = max([p[0] for p in pts] + [1.0])
    y0 = 30 + i * H
    svg.append(f'<text x="{PAD}" y="{y0 + 12}" font-size="12">{title} (max {top:.1f})</text>')
    svg.append(f'<rect x="{PAD}" y="{y0 + 18}" width="{W - 2 * PAD}" height="{PH}" fill="none" stroke="#999"/>')
    path = ' '.join(f'{PAD + (t / tmax) * (W - 2 * PAD):.1f},{y0 + 18 + PH - (v / top) * PH:.1f}' for t, v in pts)
    if path:
        svg.append(f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{path}"/>')
    svg.append(f'<text x="{W - PAD}" y="{y0 + 18 + PH + 12}" text-anchor="end">{tmax:.0f} s</text>')
    svg.append(f'<text x="{PAD - 4}" y="{y0 + 22}" text-anchor="end">{top:.0f}</text>')
    svg.append(f'<text x="{PAD - 4}" y="{y0 + 18 + PH}" text-anchor="end">0</text>')
svg.append('</svg>')
open(out, 'w').write('\n'.join(svg) + '\n')
last = samples[-1][1] if samples else {}
print(f'{out}: {len(samples)} scrapes; at the end: '
      f'{total(last, "ringtftpd_transfers_finished_total"):.0f} transfers finished, '
      f'{total(last, "ringtftpd_data_bytes_total", "sent") / 1e6:.1f} MB sent, '
      f'{total(last, "ringtftpd_retransmissions_total"):.0f} retransmissions, '
      f'{total(last, "ringtftpd_refusals_total", "not_found"):.0f} not_found refusals')
EOF
