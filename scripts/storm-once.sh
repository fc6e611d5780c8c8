#!/usr/bin/env bash
# One boot storm by hand, outside compare: CLIENTS iPXE-like clients (in loadtest processes of
# 5,000, under this machine's 20,000-descriptor limit) each ask for a missing autoexec.ipxe,
# then fetch a 1 MiB file at blksize 1432, against a release ringtftpd on 127.0.0.1 pinned to
# CPU 1 (clients on CPU 0). Extra arguments go to the server, e.g. --port-range 2000:31999
# (transfer ports outside the kernel's ephemeral range, which the clients' own ports fill).
#
#   scripts/storm-once.sh [SERVER ARGS...]        CLIENTS=15000 by default
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CLIENTS=${CLIENTS:-15000}
TARGET=${CARGO_TARGET_DIR:-target}
cargo build --release -q -p ringtftpd -p loadtest
B="$TARGET/release"
TMP=$(mktemp -d /tmp/storm-once.XXXXXX)
SP=""
PIDS=()
cleanup() {
    for p in "${PIDS[@]}" $SP; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT
mkdir -p "$TMP/root"
head -c $((1 << 20)) /dev/urandom >"$TMP/root/boot.bin"
chmod -R a+rX "$TMP"
PORT=$((40000 + RANDOM % 1000))
taskset -c 1 "$B/ringtftpd" --address "127.0.0.1:$PORT" --threads 1 --max-per-client 1048576 \
    --request-rate 0 "$@" "$TMP/root" >"$TMP/server.log" 2>&1 &
SP=$!
sleep 1
procs=$(((CLIENTS + 4999) / 5000))
start=$(date +%s.%N)
for i in $(seq 1 "$procs"); do
    n=$((CLIENTS - (i - 1) * 5000))
    ((n > 5000)) && n=5000
    taskset -c 0 "$B/loadtest" --server "127.0.0.1:$PORT" --json --file boot.bin \
        --probe-missing autoexec.ipxe --expect "$TMP/root/boot.bin" -n "$n" -c "$n" \
        --blksize 1432 --timeout 0.25 --backoff --retries 10 --max-time 120 --stall 60 \
        --seed "$i" >"$TMP/lt$i.json" 2>"$TMP/lt$i.err" &
    PIDS+=($!)
done
rc=0
wait "${PIDS[@]}" || rc=1
PIDS=()
end=$(date +%s.%N)
kill "$SP"
wait "$SP" || true
SP=""
echo "storm: $(echo "$end - $start" | bc) s"
for i in $(seq 1 "$procs"); do
    grep -o '"completed":[0-9]*\|"failed":[0-9]*\|"failures":{[^}]*}\|"first_data_ms":{[^}]*}' \
        "$TMP/lt$i.json" | tr '\n' ' '
    echo
done
grep '^shard_exit' "$TMP/server.log" | tr ' ' '\n' | grep -E '^(refused_busy|busy_deferred|started|finished|send_errors)='
exit $rc
