#!/usr/bin/env bash
# Soak: a bounded mixed load against a release ringtftpd on loopback, with
# the server's RSS and open descriptors sampled into a CSV. Not part of the
# default test run (scripts/test.sh); issue #9 asks for 10 minutes:
#
#   scripts/soak.sh            # 600 s
#   scripts/soak.sh 60         # a short run
#
# Environment: SOAK_INTERVAL (seconds between samples, default 5),
# SOAK_OUT (CSV path, default target/soak/soak-<UTC time>.csv), SOAK_PORT
# (default: a free one), SOAK_NO_BUILD=1 (use the binaries already built).
#
# Load, in rounds until the duration is used up (each round bounded by the
# load generator's --max-time, cut at the end of the duration): many small
# files at concurrency 100; 1 MiB windowed with tsize; 5 % injected loss;
# 8 MiB lock-step; plus requests for missing files, WRQs and junk through
# bash's /dev/udp. Every downloaded byte is checked by loadtest.
#
# Exit status: 0 if the server ran to the end and no round failed (cut
# rounds aside), 1 otherwise, 2 on a usage error.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() { printf 'soak.sh: %s\n' "$*" >&2; exit 2; }

duration=${1:-600}
[[ $duration =~ ^[0-9]+$ && $duration -ge 10 && $duration -le 86400 ]] ||
    die "duration must be 10..86400 seconds, got '$duration'"
interval=${SOAK_INTERVAL:-5}
[[ $interval =~ ^[0-9]+$ && $interval -ge 1 && $interval -le 600 ]] ||
    die "SOAK_INTERVAL must be 1..600 seconds"

target=${CARGO_TARGET_DIR:-target}
if [[ ${SOAK_NO_BUILD:-} != 1 ]]; then
    cargo build --release -q -p ringtftpd -p loadtest
fi
server_bin=$target/release/ringtftpd
load_bin=$target/release/loadtest
[[ -x $server_bin && -x $load_bin ]] || die "missing $server_bin or $load_bin (build them)"

port=${SOAK_PORT:-}
if [[ -z $port ]]; then
    port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null || echo 16969)
fi
server=127.0.0.1:$port

mkdir -p "$target/soak"
out=${SOAK_OUT:-$target/soak/soak-$(date -u +%Y%m%dT%H%M%SZ).csv}
work=$(mktemp -d "$target/soak/run.XXXXXX")
root=$work/root
mkdir -p "$root"

pid=
sampler=
cleanup() {
    # Only the processes this script started, by PID.
    [[ -n $sampler ]] && kill "$sampler" 2>/dev/null || true
    [[ -n $pid ]] && kill "$pid" 2>/dev/null || true
    [[ -n $pid ]] && wait "$pid" 2>/dev/null || true
    rm -rf "$root"
}
trap cleanup EXIT

# Fixtures: sizes around block edges, 64 KiB, 1 MiB, 8 MiB.
for spec in f1:1 f512:512 f513:513 f1500:1500 f64k:65536 f1m:1048576 f8m:8388608; do
    head -c "${spec#*:}" /dev/urandom >"$root/${spec%%:*}"
done
chmod -R a+rX "$work"

# All load comes from 127.0.0.1: lift the per-address request limit and
# session cap, which would otherwise take the whole load for one client.
"$server_bin" --address "$server" --quiet --request-rate 0 --max-per-client 100000 \
    "$root" 2>"$work/server.log" &
pid=$!
# Ready when a small download succeeds (bounded: 10 s).
for _ in $(seq 1 50); do
    if "$load_bin" --server "$server" --file f1 --expect "$root/f1" -n 1 --timeout 0.2 --retries 1 \
        --max-time 1 >/dev/null 2>&1; then
        break
    fi
    kill -0 "$pid" 2>/dev/null || { cat "$work/server.log" >&2; die "server exited at start"; }
    sleep 0.2
done

start=$(date +%s)
echo "t_s,rss_kib,hwm_kib,fds,threads" >"$out"
sample() {
    local status rss hwm thr fds
    status=$(cat "/proc/$pid/status" 2>/dev/null) || return 1
    rss=$(awk '/^VmRSS:/ { print $2 }' <<<"$status")
    hwm=$(awk '/^VmHWM:/ { print $2 }' <<<"$status")
    thr=$(awk '/^Threads:/ { print $2 }' <<<"$status")
    fds=$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
    echo "$(($(date +%s) - start)),$rss,$hwm,$fds,$thr" >>"$out"
}
(
    # Bounded: stops with the server or a little after the duration.
    while kill -0 "$pid" 2>/dev/null && (($(date +%s) - start <= duration + 40)); do
        sample || break
        sleep "$interval"
    done
) &
sampler=$!

# Junk and refusals through bash's /dev/udp (connected sockets; one per
# datagram, so many source ports). 200 per round.
junk() {
    local i
    for ((i = 0; i < 200; i++)); do
        case $((i % 4)) in
            0) printf '\0\001missing-%d.bin\0octet\0' "$i" ;;
            1) printf '\0\002upload.bin\0octet\0' ;;
            2) printf '\0\011garbage' ;;
            3) printf '\0\001f1\0morse\0' ;;
        esac >"/dev/udp/127.0.0.1/$port" 2>/dev/null || true
    done
}

rounds=0 ok=0 failed=0 cut=0 transfers=0
rounds_csv=${out%.csv}-rounds.csv
echo "t_s,round,exit,completed,elapsed_s" >"$rounds_csv"
failures=()
round() {
    local name=$1 left max json status=0
    shift
    left=$((duration - ($(date +%s) - start)))
    ((left > 0)) || return 1
    max=$((left < 60 ? left : 60))
    json=$("$load_bin" --server "$server" --json --max-time "$max" "$@" 2>>"$work/load.err") || status=$?
    rounds=$((rounds + 1))
    local completed secs
    completed=$(grep -o '"completed":[0-9]*' <<<"$json" | cut -d: -f2)
    secs=$(grep -o '"elapsed_s":[0-9.]*' <<<"$json" | cut -d: -f2)
    printf '%s,%s,%s,%s,%s\n' "$(($(date +%s) - start))" "$name" "$status" "${completed:-0}" "${secs:-}" >>"$rounds_csv"
    transfers=$((transfers + ${completed:-0}))
    if ((status == 0)); then
        ok=$((ok + 1))
    elif ((max < 60)) && (($(date +%s) - start >= duration)); then
        cut=$((cut + 1)) # aborted by the end of the duration
    else
        failed=$((failed + 1))
        failures+=("$name (exit $status): $(grep -o '"failures":{[^}]*}' <<<"$json")")
    fi
    kill -0 "$pid" 2>/dev/null
}

printf 'soak: %s s against %s (pid %s), sampling every %s s into %s\n' "$duration" "$server" "$pid" "$interval" "$out"
while (($(date +%s) - start < duration)); do
    junk
    round small --files f1,f512,f513,f1500,f64k --expect-dir "$root" -n 3000 -c 100 || break
    round windowed --file f1m --expect "$root/f1m" -n 200 -c 10 --blksize 1428 --windowsize 16 --tsize || break
    round lossy --files f513,f64k --expect-dir "$root" -n 200 -c 20 --loss 0.05 --timeout 0.2 --retries 20 || break
    round lockstep --file f8m --expect "$root/f8m" -n 8 -c 4 --blksize 1468 || break
done
elapsed=$(($(date +%s) - start))
alive=yes
kill -0 "$pid" 2>/dev/null || alive=no
[[ $alive == yes ]] && sample || true
kill "$sampler" 2>/dev/null || true
wait "$sampler" 2>/dev/null || true
sampler=

printf 'soak: %s s, %s rounds (%s ok, %s failed, %s cut at the end), %s verified transfers; server alive at the end: %s\n' \
    "$elapsed" "$rounds" "$ok" "$failed" "$cut" "$transfers" "$alive"
for f in "${failures[@]}"; do printf 'soak: failed round: %s\n' "$f"; done
awk -F, 'NR == 2 { fr = $2; ff = $4 } NR > 1 { n++; lr = $2; lf = $4; if ($2 > mr) mr = $2; if ($4 > mf) mf = $4 }
    END { printf "soak: %d samples; RSS KiB first %d, last %d, max %d; fds first %d, last %d, max %d\n", n, fr, lr, mr, ff, lf, mf }' "$out"
printf 'soak: CSV %s (rounds: %s)\n' "$out" "$rounds_csv"
if [[ $alive == no ]]; then
    printf 'soak: server exited; log:\n' >&2
    cat "$work/server.log" >&2
fi
[[ $alive == yes && $failed -eq 0 ]]
